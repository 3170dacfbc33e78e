"""GPU check: the teacher pass and a distillation step at a medium size, in bf16, on one CUDA GPU.

    python -m geodistill.bench.gpu [--precision bf16] [--image-tokens 576] [--records 5] [--images 8]
                                   [--steps 10] [--peak-tflops T]

What a user runs on a fresh GPU machine before the real job (13B teacher, 7B student) to see that the
stack works there and what it achieves. Models have random weights (speed does not depend on them) and a
medium shape: a CLIP ViT-L/14 tower at 336 px (576 image tokens; ``--image-tokens 1296`` is GeoChat's
504 px), a 32000-token vocabulary, a 16 x 2048 teacher LLM and an 8 x 1024 student LLM. Each batch is
``--images`` images with ``--records`` records each, as a shard sample gives them (~60-150 text tokens a
record).

Printed, as one markdown table per part:

- teacher pass (``cache.build.teacher_signals``, what ``build_cache`` runs) with and without per-image
  prefix reuse: records/s, tokens/s, achieved TFLOP/s, MFU, peak memory, and the reuse / plain time ratio;
- distillation step (``distill.kd.offline_terms``: reverse KL on the teacher's top-k, feature alignment;
  autocast over float32 master weights, AdamW), its tokens/s, TFLOP/s, MFU and peak memory.

FLOPs are the planner's arithmetic (``geodistill.plan.arithmetic``: matmuls only, so MFU is a lower bound)
for the tokens each pass actually computes: the plain pass's FLOPs per record are the work both passes do,
so reuse shows as a higher *effective* TFLOP/s. MFU is against ``--peak-tflops`` or the dense bf16 peak of a
known GPU (table ``PEAK_TFLOPS``). ``--device cpu`` runs the same code on the CPU at whatever shape you give
it (the tests use it with a tiny shape); its MFU column is empty.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration

from geodistill.bench.prefix import Vocab, image_batch, predicted
from geodistill.cache.build import teacher_signals
from geodistill.config import DistillConfig, LlavaArch
from geodistill.data.collate import IGNORE, Batch
from geodistill.distill.kd import CachedTargets, KDModule, offline_terms
from geodistill.distill.losses import make_adapter
from geodistill.markdown import table
from geodistill.models.checkpoints import PRECISIONS
from geodistill.models.llava import llava_config

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
"""Dense bf16 tensor-core peak (TFLOP/s, SXM parts) by a substring of ``torch.cuda.get_device_name``."""


@dataclass(frozen=True)
class Timing:
    seconds: float  # median per batch
    peak_bytes: int
    flops: float  # per batch (the plain pass's work for the teacher)
    records: int
    tokens: int


def arch(hidden: int, layers: int, heads: int, image_tokens: int, vision: Sequence[int]) -> LlavaArch:
    side = round(image_tokens**0.5)
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens {image_tokens}: must be a square patch grid, e.g. 576 or 1296")
    v_hidden, v_layers, v_heads = vision
    return LlavaArch(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        vision_hidden_size=v_hidden,
        vision_intermediate_size=4 * v_hidden,
        vision_layers=v_layers,
        vision_heads=v_heads,
        image_size=side * 14,
        patch_size=14,
        max_position_embeddings=image_tokens + 512,
    )


def build(a: LlavaArch, vocab: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(llava_config(a, Vocab(vocab)))  # type: ignore[arg-type]
    return model.to(dtype)


def batch_of(model: torch.nn.Module, images: int, records: int, vocab: int, seed: int) -> Batch:
    """``images`` images x ``records`` records each, right-padded into one batch."""
    gen = torch.Generator().manual_seed(seed)
    parts = [image_batch(model, records, vocab, gen) for _ in range(images)]
    t = max(p.input_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=fill)

    return Batch(
        torch.cat([pad(p.input_ids, 0) for p in parts]),
        torch.cat([pad(p.attention_mask, 0) for p in parts]),
        torch.cat([pad(p.labels, IGNORE) for p in parts]),
        torch.cat([p.pixel_values for p in parts]),
        [f"{i}/{r}" for i, p in enumerate(parts) for r in p.record_ids],
        [f"img{i}" for i, p in enumerate(parts) for _ in p.image_ids],
        0,
    )


def forward_flops(model: torch.nn.Module, batch: Batch) -> float:
    """The planner's matmul FLOPs of one plain forward over every record of ``batch``."""
    return predicted(model, batch)[0].total


def timed(fn: Callable[[], object], device: torch.device, steps: int) -> tuple[float, int]:
    """Median seconds of ``fn`` over ``steps`` runs after one warm-up, and the peak memory above the start."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    return statistics.median(times), peak


def teacher_pass(teacher: torch.nn.Module, batch: Batch, k: int, reuse: bool, steps: int) -> Timing:
    device = next(teacher.parameters()).device
    batch = batch.to(device)
    seconds, peak = timed(lambda: teacher_signals(teacher, batch, k, 1, prefix_reuse=reuse), device, steps)
    tokens = int(batch.attention_mask.sum())
    return Timing(seconds, peak, forward_flops(teacher, batch), len(batch.image_ids), tokens)


def distill_step(
    teacher: torch.nn.Module, student: torch.nn.Module, batch: Batch, k: int, dtype: torch.dtype, steps: int
) -> Timing:
    """One offline distillation step on the teacher's signals for ``batch`` (computed once, untimed)."""
    device = next(student.parameters()).device
    batch = batch.to(device)
    out = teacher_signals(teacher, batch, k, 1, prefix_reuse=True)
    targets = CachedTargets(
        torch.from_numpy(out.topk_ids).long().to(device),
        torch.from_numpy(out.topk_logprobs).float().to(device),
        batch.labels[:, 1:] != IGNORE,
        torch.from_numpy(out.features).float().to(device),
    )
    adapter = make_adapter(student.config.text_config.hidden_size, teacher.config.text_config.hidden_size)
    kd = KDModule(student, adapter.to(device) if adapter is not None else None).train()
    opt = torch.optim.AdamW([p for p in kd.parameters() if p.requires_grad], lr=1e-5)
    cfg = DistillConfig(pt_weight=0.0)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = offline_terms(kd, batch, targets, cfg, 1, None)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, peak = timed(step, device, steps)
    flops = 3 * forward_flops(student, batch)  # forward + backward (weights and inputs)
    return Timing(seconds, peak, flops, len(batch.image_ids), int(batch.attention_mask.sum()))


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_TFLOPS.items() if key in name), None)


def row(name: str, t: Timing, peak: float | None, ratio: str = "") -> list[str]:
    tflops = t.flops / t.seconds / 1e12
    mfu = f"{100 * tflops / peak:.1f}" if peak else ""
    return [
        name,
        f"{t.records / t.seconds:.1f}",
        f"{t.tokens / t.seconds:,.0f}",
        f"{tflops:.3g}",
        mfu,
        f"{t.peak_bytes / 2**30:.2f}",
        ratio,
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke run)")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    ap.add_argument("--image-tokens", type=int, default=576)
    ap.add_argument("--records", type=int, default=5, help="records per image")
    ap.add_argument("--images", type=int, default=8, help="images per batch")
    ap.add_argument("--steps", type=int, default=10, help="timed runs of each part (after one warm-up)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    shape = {"type": int, "nargs": 3, "metavar": ("HIDDEN", "LAYERS", "HEADS")}
    ap.add_argument("--teacher", default=[2048, 16, 16], help="teacher LLM", **shape)  # type: ignore[arg-type]
    ap.add_argument("--student", default=[1024, 8, 8], help="student LLM", **shape)  # type: ignore[arg-type]
    ap.add_argument("--vision", default=[1024, 24, 16], help="both CLIP towers", **shape)  # type: ignore[arg-type]
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak for MFU")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Timing]:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this is the GPU check (`--device cpu` runs it on the CPU)")
    dtype = PRECISIONS[a.precision]
    teacher = build(arch(*a.teacher, a.image_tokens, a.vision), a.vocab, dtype, device, seed=0).eval()
    student = build(arch(*a.student, a.image_tokens, a.vision), a.vocab, torch.float32, device, seed=1)
    batch = batch_of(teacher, a.images, a.records, a.vocab, seed=0)
    plain = teacher_pass(teacher, batch, a.k, False, a.steps)
    reuse = teacher_pass(teacher, batch, a.k, True, a.steps)
    step = distill_step(teacher, student, batch, a.k, dtype, a.steps)
    peak = peak_tflops(device, a.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{where}, {a.precision}; batch: {a.images} images x {a.records} records, "
        f"{a.image_tokens} image tokens, "
        f"{plain.tokens / plain.records:.0f} tokens/record on average; peak {peak or '?'} TFLOP/s\n"
    )
    columns = ["part", "records/s", "tokens/s", "TFLOP/s", "MFU %", "peak GiB", "reuse / plain"]
    rows = [
        row("teacher pass, plain", plain, peak),
        row("teacher pass, prefix reuse", reuse, peak, f"{reuse.seconds / plain.seconds:.2f}"),
        row("distillation step (student)", step, peak),
    ]
    print(table(columns, rows))
    return {"plain": plain, "reuse": reuse, "step": step}


if __name__ == "__main__":
    main()
