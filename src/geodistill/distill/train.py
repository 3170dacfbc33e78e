"""The one training loop, shared by teacher SFT, student SFT, the control and distillation.

The loop knows nothing about losses: a ``step_fn(batch, step) -> {"loss": tensor, **terms}`` computes
them. It owns what every run needs identically: AdamW with warm-up + cosine decay, gradient clipping,
skipping (and counting) non-finite losses with an abort past a limit, atomic checkpoints with exact
resume (model, optimizer, RNG and data position), dvclive logging, and optional DDP / DeepSpeed ZeRO.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from geodistill.config import TrainConfig
from geodistill.distributed import Dist
from geodistill.errors import TrainingError

B = TypeVar("B")
StepFn = Callable[[Any, int], dict[str, torch.Tensor]]
CKPT = "checkpoint"


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at the last step (``step = cfg.steps - 1``)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - 1 - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class LoopResult:
    steps: int
    skipped_nonfinite: int
    seconds: float
    last: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generator": None if generator is None else generator.get_state(),
    }


def _gather_rng(generator: torch.Generator | None, dctx: Dist) -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective: all ranks call it).

    Ranks draw different randomness (e.g. on-policy sampling seeds by rank), so a checkpoint written
    by rank 0 must hold each rank's own state for the resume to be exact.
    """
    state = _rng_state(generator)
    if dctx.world_size == 1:
        return [state]
    states: list[Any] = [None] * dctx.world_size
    dist.all_gather_object(states, state)
    return states


def _restore_rng(states: list[dict[str, Any]], generator: torch.Generator | None, dctx: Dist) -> None:
    state = states[dctx.rank % len(states)]  # another world size cannot resume exactly anyway
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


def _save_checkpoint(
    out: Path,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    skipped: int,
    rng: list[dict[str, Any]],
    run_key: str,
) -> None:
    """Write to a temporary folder, then swap it in: a kill at any point leaves a usable checkpoint."""
    tmp, final, old = out / f"{CKPT}.tmp", out / CKPT, out / f"{CKPT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "run_key": run_key,
        "step": step,
        "skipped": skipped,
        "model": {k: v for k, v in module.state_dict().items()},
        "optimizer": opt.state_dict(),
        "rng": rng,  # per rank
    }
    torch.save(state, tmp / "state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path) -> dict[str, Any] | None:
    for name in (CKPT, f"{CKPT}.old"):  # .old survives a kill between the two renames
        path = out / name / "state.pt"
        if path.exists():
            return torch.load(path, weights_only=False, map_location="cpu")
    return None


def _all_finite(loss: torch.Tensor, dctx: Dist) -> bool:
    ok = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)  # nccl needs it on the GPU
    if dctx.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips together, or none does
    return bool(ok.item())


def run_loop(
    module: nn.Module,
    batches: Iterator[B],
    step_fn: StepFn,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    logger: Callable[[int, dict[str, float]], None] | None = None,
    generator: torch.Generator | None = None,
    deepspeed_stage: int | None = None,
    resume: bool = True,
    run_key: str = "",
) -> LoopResult:
    """Train ``module`` (everything trainable in it) for ``cfg.steps`` steps.

    ``batches`` must be deterministic: on resume the loop skips the batches already consumed, so a
    resumed run sees the same data as an uninterrupted one. ``generator`` (sampling randomness of the
    step function) is checkpointed too. Checkpoints go to ``out_dir/checkpoint`` every
    ``cfg.checkpoint_every`` steps. ``out_dir`` should not be a DVC output (DVC deletes those before a
    re-run); ``run_key`` (a hash of everything that defines the run) keeps a checkpoint of another
    configuration from being resumed.
    """
    dctx = Dist.from_env()
    dctx.init()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    engine = None
    if deepspeed_stage is not None:
        import deepspeed  # optional: imported only when asked for

        ds_cfg = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": deepspeed_stage},
            "zero_allow_untested_optimizer": True,
            "fp16": {"enabled": False},
            "bf16": {"enabled": False},
            "steps_per_print": 10**9,
        }
        engine, opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_cfg)
    elif dctx.world_size > 1:
        # Gradients are averaged by hand (below) so step_fn may call any submodule, not just forward().
        for p in params:
            dist.broadcast(p.data, src=0)

    start, skipped = 0, 0
    if resume:
        if engine is not None:
            ckpt_dir = out_dir / CKPT
            key_file = ckpt_dir / "run_key.txt"
            if (ckpt_dir / "latest").exists() and key_file.exists() and key_file.read_text() == run_key:
                _, client = engine.load_checkpoint(str(ckpt_dir))
                start, skipped = client["step"], client["skipped"]
                _restore_rng(client["rng"], generator, dctx)
        elif (
            (state := _load_checkpoint(out_dir)) is not None
            and state.get("run_key") == run_key
            and "rng" in state
        ):
            module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            _restore_rng(state["rng"], generator, dctx)
            start, skipped = state["step"], state["skipped"]
    for _ in range(start):  # same data position as the uninterrupted run
        next(batches)

    module.train()
    result = LoopResult(start, skipped, 0.0)
    # Terms computed every N steps only (on-policy) rarely fall on a logged step: log their latest value.
    latest: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        batch = next(batches)
        terms = step_fn(batch, step)
        loss = terms["loss"]
        if not _all_finite(loss, dctx):
            skipped += 1
            opt.zero_grad(set_to_none=True)
            if skipped > cfg.max_nonfinite:
                raise TrainingError(
                    f"{skipped} non-finite losses (limit train.max_nonfinite={cfg.max_nonfinite}) "
                    f"at step {step}; lower the learning rate or check the inputs"
                )
            continue
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            if dctx.world_size > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= dctx.world_size
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        done = step + 1
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["lr"] = opt.param_groups[0]["lr"]
        result.last = values
        latest.update(values)
        if done % cfg.log_every == 0 or done == cfg.steps:
            values = dict(latest)
            values["step"] = done
            result.history.append(values)
            if logger is not None and dctx.is_main:
                logger(done, values)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            rng = _gather_rng(generator, dctx)
            if engine is not None:
                client = {"step": done, "skipped": skipped, "rng": rng}
                engine.save_checkpoint(str(out_dir / CKPT), client_state=client)
                if dctx.is_main:
                    (out_dir / CKPT / "run_key.txt").write_text(run_key)
            elif dctx.is_main:
                _save_checkpoint(out_dir, module, opt, done, skipped, rng, run_key)
            if dctx.world_size > 1:
                dist.barrier()
    result.steps = cfg.steps
    result.skipped_nonfinite = skipped
    result.seconds = time.perf_counter() - t0
    return result


def clear_checkpoint(out_dir: Path) -> None:
    """Remove resumable state once the final model is saved (it is not a pipeline output)."""
    for name in (CKPT, f"{CKPT}.tmp", f"{CKPT}.old"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def dvclive_logger(
    directory: str | Path, resume: bool = False
) -> tuple[Callable[[int, dict[str, float]], None], Any]:
    """A logger for ``run_loop`` writing dvclive metrics and plots to ``directory``; returns (log, live).

    Call ``live.end()`` after training. DVC itself tracks the folder (dvc.yaml), so dvclive must not
    create experiments or edit dvc.yaml. Only rank 0 writes: other ranks get a logger that keeps
    nothing, so they never race on the same files.
    """
    from dvclive import Live

    if not Dist.from_env().is_main:
        return (lambda _step, _values: None), _NullLive()
    live = Live(str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None)

    def log(step: int, values: dict[str, float]) -> None:
        live.step = step
        for name, value in values.items():
            if name != "step":
                live.log_metric(name, value)

    return log, live


class _NullLive:
    """What non-zero ranks get instead of a dvclive.Live."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    def end(self) -> None:
        pass
