"""Peak memory of a training step with and without activation checkpointing.

    python -m geodistill.bench.memory [--hidden 256] [--layers 8] [--image-size 336 --patch 14]
                                      [--text-tokens 100] [--batch 2] [--precision fp32|bf16] [--lora R]

A LLaVA with random weights (the planner's vocabulary-only config, no tokenizer) whose shape makes
activations dominate: many image tokens (336 px / 14 px patches = 576, LLaVA-1.5's count) and text
tokens through a decoder of ``--layers`` layers, so what the layers keep for backward outgrows the weights,
gradients and AdamW state. For each setting one SFT-like step (forward over all text positions, backward,
AdamW) runs once untimed (AdamW allocates its state) and is then measured:

- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the memory held before the step; on the
  CPU the same quantity from torch's profiler (the running sum of every allocation and free in the step,
  its maximum), which counts torch's tensors only, as the CUDA figure does;
- the step's wall time, of an unprofiled step (checkpointing recomputes each layer's forward in backward).

Checkpointing is ``geodistill.models.llava.enable_checkpointing``, what ``train.gradient_checkpointing``
turns on: the language model's layers, and the vision tower's when it trains (``--freeze-vision`` off).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from geodistill.config import LlavaArch
from geodistill.distill.losses import lm_loss
from geodistill.markdown import table
from geodistill.models.checkpoints import precision_dtype
from geodistill.models.llava import apply_lora, enable_checkpointing, freeze_vision_tower
from geodistill.plan.shapes import model_config

VOCAB = 1024


@dataclass(frozen=True)
class Result:
    checkpointing: bool
    peak_bytes: int
    """Peak memory allocated during the step above what was held before it."""
    seconds: float


def _arch(a: argparse.Namespace) -> LlavaArch:
    return LlavaArch(
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 2,
        num_layers=a.layers,
        num_heads=a.hidden // 64,
        num_kv_heads=a.hidden // 64,
        vision_hidden_size=a.vision_hidden,
        vision_intermediate_size=a.vision_hidden * 2,
        vision_layers=a.vision_layers,
        vision_heads=a.vision_hidden // 64,
        image_size=a.image_size,
        patch_size=a.patch,
        max_position_embeddings=(a.image_size // a.patch) ** 2 + a.text_tokens + 1,
    )


def _model(a: argparse.Namespace, checkpointing: bool, device: torch.device) -> nn.Module:
    config, _ = model_config("build", "", _arch(a), VOCAB)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: nn.Module = LlavaForConditionalGeneration(config)
        if a.freeze_vision:
            freeze_vision_tower(model)
        if a.lora:
            model = apply_lora(model, a.lora, 2 * a.lora, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if checkpointing:
        enable_checkpointing(model)
    return model.to(device).train()


def _inputs(a: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    n_img = (a.image_size // a.patch) ** 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, VOCAB - 1, (a.batch, a.text_tokens), generator=g)
    ids = torch.cat([torch.full((a.batch, n_img), VOCAB - 1), text], 1)  # <image> is the last id
    labels = torch.cat([torch.full((a.batch, n_img), -100), text], 1)
    pixels = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "pixel_values": pixels.to(device)}


def _profiled_peak(fn: Callable[[], None]) -> int:
    """Peak of torch's CPU allocations during ``fn`` above the level before it (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op's *self* allocations minus frees (its children report their own; "[memory]" events are
    # frees outside any op), in start order: the running level at op granularity.
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def measure(a: argparse.Namespace, checkpointing: bool) -> Result:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = precision_dtype(a.precision, device, "--precision")
    model = _model(a, checkpointing, device)
    inputs = _inputs(a, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
            loss = lm_loss(logits, inputs["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on, as in every step of a run but the first
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # on the CPU a third step, profiled (the profiler slows it down)
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else _profiled_peak(step)
    return Result(checkpointing, peak, seconds)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="LLM width (heads of 64)")
    p.add_argument("--layers", type=int, default=8, help="LLM decoder layers")
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--text-tokens", type=int, default=100)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on the LLM's attention (0: full)")
    p.add_argument("--freeze-vision", action="store_true", help="freeze the CLIP tower (GeoChat's setup)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n_img = (a.image_size // a.patch) ** 2
    results = [measure(a, ckpt) for ckpt in (False, True)]
    base = results[0]
    mib = 2**20
    rows = [
        (
            "on" if r.checkpointing else "off",
            f"{r.peak_bytes / mib:.1f}",
            f"{r.peak_bytes / base.peak_bytes:.2f}",
            f"{r.seconds:.2f}",
            f"{r.seconds / base.seconds:.2f}",
        )
        for r in results
    ]
    mode = f"LoRA r{a.lora}" if a.lora else "full"
    print(
        f"Training step, LLM {a.hidden} x {a.layers} layers ({mode}), {n_img} image + {a.text_tokens} text "
        f"tokens, batch {a.batch}, {a.precision}, tower {'frozen' if a.freeze_vision else 'trained'}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'} ({a.threads} thread(s)):\n"
    )
    print(table(["checkpointing", "peak MiB", "x off", "step s", "x off"], rows))
    return results


if __name__ == "__main__":
    main()
