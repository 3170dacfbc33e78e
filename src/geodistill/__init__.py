"""geodistill: offline-first knowledge distillation for remote-sensing multimodal LLMs."""

__version__ = "0.1.0"
