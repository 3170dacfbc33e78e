"""Will a run fit, and how long will it take? The arithmetic behind ``geodistill plan``.

    geodistill plan --preset geochat                  # presets/geochat.yaml: GeoChat-13B -> GeoChat-7B
    geodistill plan --params params.yaml --gpus 2     # any params file, e.g. the embedded default
    geodistill preset presets/geochat.yaml            # the preset as `dvc exp run` -S arguments

The teacher and the student are built on the meta device (transformers ``LlavaForConditionalGeneration``
from their configs: the real module tree, no weights, no memory), from a checkpoint's ``config.json`` when
the params point at an HF LLaVA folder, else from ``arch`` at the plan's vocabulary. Every figure is
arithmetic on those shapes, and the output says what each one assumes. Modules: ``inputs`` (presets,
params, the RunPlan; no torch), ``shapes`` (models on the meta device), ``arithmetic`` (FLOPs, memory, cache
bytes), ``report`` (the printed plan). Conventions:

- FLOPs are matrix-multiply FLOPs (2 per multiply-add): linear layers from the modules' own shapes,
  attention's QK^T and AV dense over T_q x T_kv (what eager and SDPA-math compute and what MFU figures
  count; causal kernels skip about half of it). Norms, activations, softmax and rotary are left out (<1 %).
- Backward: every matmul a gradient passes through costs 1x its forward for the input gradient (none for
  inputs that need no gradient: the pixels, a frozen tower's output), trained weights 1x more for the weight
  gradient; attention's QK^T and AV have two inputs, so 2x. Activation checkpointing recomputes the decoder's
  forward once. Forward and backward equal torch's FlopCounterMode on a real tiny LLaVA (tests/test_plan.py).
- Memory per trainable parameter follows ZeRO (Rajbhandari et al., 2020): in bf16/fp16 a 16-bit weight and
  gradient, an fp32 master copy and two fp32 AdamW moments (16 B); in fp32 weight, gradient and moments
  (16 B). Frozen parameters weigh their dtype only. ZeRO stage 1 shards the optimizer states over the GPUs,
  stage 2 also the gradients, stage 3 also every parameter (frozen ones included).
"""
