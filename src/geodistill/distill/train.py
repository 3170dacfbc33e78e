"""The one training loop, shared by teacher SFT, student SFT, the control and distillation.

The loop knows nothing about losses: a ``step_fn(batch, step) -> {"loss": tensor, **terms}`` computes
them. It owns what every run needs identically: AdamW with warm-up + cosine decay, gradient clipping,
skipping (and counting) non-finite losses with an abort past a limit, atomic checkpoints with exact
resume (model, optimizer, RNG, data position and the logged history), and optional DDP / DeepSpeed ZeRO.
``RunLog`` is the logger the stages use (dvclive).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from geodistill.config import DeepSpeedConfig, TrainConfig
from geodistill.distributed import Dist
from geodistill.errors import TrainingError
from geodistill.models.checkpoints import precision_dtype
from geodistill.models.llava import enable_checkpointing

StepFn = Callable[[Any, int], dict[str, torch.Tensor]]
Logger = Callable[[int, dict[str, float]], None]
CKPT = "checkpoint"
PROGRESS = "progress.json"
"""{"run_key", "step", "tag"}, written last into a checkpoint folder: which run it resumes, from where
(readable without loading the weights)."""


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
    """The step the run ended at (``cfg.steps``)."""
    resumed_from: int
    """The step this process started at: 0, or where it resumed a killed run's checkpoint."""
    skipped_nonfinite: int
    """Steps skipped for a non-finite loss, over the whole run (before a resume too)."""
    seconds: float
    """Training time of this process (its ``steps - resumed_from`` steps)."""
    last: dict[str, float] = field(default_factory=dict)
    """The values of the last step."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Every logged row of the run, from step 1 (after a resume, the checkpoint's rows first)."""


@dataclass
class _Progress:
    """What a checkpoint holds besides weights and optimizer state."""

    step: int = 0
    skipped: int = 0
    latest: dict[str, float] = field(default_factory=dict)
    """Each term's latest value: a term computed every N steps only (on-policy) rarely falls on a logged
    step, so it is logged with its latest value, which a resumed run must know too."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Every row logged so far. A resumed run hands them to its logger again: DVC deletes a stage's
    outputs (the dvclive folder too) before it re-runs it, so the checkpoint is where they survive."""


class StepModule(nn.Module):
    """``step_fn`` as the forward of a module holding everything trained: what DDP and DeepSpeed wrap.

    DDP averages the gradients of whatever one forward of its module computed, so a step may call any
    submodule any number of times (KD calls the student on the batch and on the L_PT texts, and the
    feature adapter) and still be one forward.
    """

    def __init__(self, module: nn.Module, step_fn: StepFn) -> None:
        super().__init__()
        self.module = module
        self.step_fn = step_fn

    def forward(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        return self.step_fn(batch, step)


@dataclass
class _Trainer:
    """The optimizer and what runs a step: the StepModule, DDP around it, or a DeepSpeed engine."""

    module: nn.Module
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    run_step: nn.Module
    device: torch.device
    engine: Any = None
    autocast: torch.dtype | None = None
    """Autocast dtype of the forward (bf16/fp16 without DeepSpeed); None: the weights' own dtype."""
    scaler: torch.amp.GradScaler | None = None
    """fp16's dynamic loss scaling (CUDA, without DeepSpeed, which scales fp16 losses itself)."""


def deepspeed_config(cfg: TrainConfig, ds: DeepSpeedConfig) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage and CPU offload, bf16/fp16 mode, clipping.

    In bf16/fp16 mode DeepSpeed keeps the module's weights in 16 bits and float32 masters and optimizer
    state in the (ZeRO-partitioned) optimizer. The optimizer is torch's AdamW, offloaded or not
    (DeepSpeedCPUAdam would be faster with offload, but JIT-compiles for minutes on first use).
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": cfg.precision == "fp16"},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
    }


def _setup(
    module: nn.Module, step_fn: StepFn, cfg: TrainConfig, ds: DeepSpeedConfig | None, dctx: Dist
) -> _Trainer:
    """AdamW over what is trainable in ``module``, and what runs a step in this process group, on this
    process's device, in ``cfg.precision`` (float32 master weights and optimizer state in every case)."""
    device = dctx.device
    dtype = precision_dtype(cfg.precision, device, "train.precision")
    if cfg.gradient_checkpointing:
        enable_checkpointing(module)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    run_step: nn.Module = StepModule(module, step_fn)
    if ds is not None and ds.enabled:
        import deepspeed  # optional: imported only when asked for

        ds_cfg = deepspeed_config(cfg, ds)
        engine, opt, _, _ = deepspeed.initialize(model=run_step, optimizer=opt, config=ds_cfg)
        return _Trainer(module, params, opt, engine, device, engine)
    module.to(device)
    if dctx.world_size > 1:
        # Some parameters get no gradient in every step (CLIP's post_layernorm under LLaVA, the feature
        # adapter when align_weight = 0): DDP must look for them, or its reduction waits for them forever
        # and fails at the next step.
        run_step = DistributedDataParallel(run_step, find_unused_parameters=True)
    autocast = None if dtype == torch.float32 else dtype
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return _Trainer(module, params, opt, run_step, device, autocast=autocast, scaler=scaler)


def _all_finite(loss: torch.Tensor, dctx: Dist) -> bool:
    ok = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)  # nccl needs it on the GPU
    if dctx.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips together, or none does
    return bool(ok.item())


def _train_step(
    tr: _Trainer, batch: Any, step: int, cfg: TrainConfig, dctx: Dist
) -> dict[str, torch.Tensor] | None:
    """One optimizer step; None (and no update on any rank) when the loss is not finite on some rank."""
    for g in tr.opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(step, cfg)
    # autocast covers the forward only: backward runs each op in the dtype its forward used
    with torch.autocast(tr.device.type, dtype=tr.autocast or torch.float32, enabled=tr.autocast is not None):
        terms = tr.run_step(batch, step)
    loss = terms["loss"]
    if not _all_finite(loss, dctx):
        return None  # before backward: DDP and ZeRO have synchronised no gradient yet
    if tr.engine is not None:
        tr.engine.backward(loss)  # ZeRO reduces the gradients and clips them in step()
        tr.engine.step()
        return terms
    if tr.scaler is None:
        loss.backward()  # under DDP, the averaged gradients over every rank
    else:
        tr.scaler.scale(loss).backward()
        tr.scaler.unscale_(tr.opt)  # clip the true gradients
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(tr.params, cfg.grad_clip)
    if tr.scaler is None:
        tr.opt.step()
    else:
        tr.scaler.step(tr.opt)  # skipped when the scaled gradients overflowed
        tr.scaler.update()
    tr.opt.zero_grad(set_to_none=True)
    return terms


def _gather_deepspeed_weights(tr: _Trainer, dctx: Dist) -> None:
    """After a DeepSpeed run: the whole float32 weights back into ``tr.module`` as plain tensors (a
    collective: every rank calls it), so merging LoRA, evaluating and saving work as after any run.

    ZeRO-3 leaves each rank a partition of every parameter, and bf16/fp16 mode leaves 16-bit copies in
    the module; the float32 masters live in the optimizer (trainable parameters) and the partitions
    (frozen ones).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(tr.module.parameters())
    full: list[torch.Tensor] = []
    zero3 = any(hasattr(p, "ds_id") for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        for p in params:
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            full.append((p.data if master is None else master).detach().float().clone())
    tr.engine.destroy()  # removes ZeRO-3's hooks, which would gather and re-partition in every forward
    for p, value in zip(params, full, strict=True):
        p.data = value.to(tr.device)


# ---------------------------------------------------------------------------------------- checkpoints


def _gather_rng(generator: torch.Generator | None, dctx: Dist) -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective: all ranks call it).

    Ranks draw different randomness (e.g. on-policy sampling seeds by rank), so a checkpoint written
    by rank 0 must hold each rank's own state for the resume to be exact.
    """
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generator": None if generator is None else generator.get_state(),
    }
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


def _find_checkpoint(out_dir: Path, run_key: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint folder of the run ``run_key`` and its progress record, or None."""
    for name in (CKPT, f"{CKPT}.old"):  # .old survives a kill between the two renames of a plain save
        path = out_dir / name / PROGRESS
        if path.exists() and (progress := json.loads(path.read_text()))["run_key"] == run_key:
            return out_dir / name, progress
    return None


def _save(
    tr: _Trainer, out_dir: Path, progress: _Progress, rng: list[dict[str, Any]], run_key: str, dctx: Dist
) -> None:
    """Write a checkpoint that a kill at any point leaves whole: the new one, or the previous one."""
    client = {**asdict(progress), "rng": rng}
    record = {"run_key": run_key, "step": progress.step, "tag": f"step{progress.step}"}
    folder = out_dir / CKPT
    if tr.engine is not None:  # every rank writes its ZeRO partition into folder/<tag>
        tr.engine.save_checkpoint(str(folder), tag=record["tag"], client_state=client, save_latest=False)
        if dctx.world_size > 1:
            dist.barrier()
        if dctx.is_main:  # the new tag is complete on every rank: point at it, drop the older ones
            (folder / PROGRESS).write_text(json.dumps(record))
            for old in folder.iterdir():
                if old.is_dir() and old.name != record["tag"]:
                    shutil.rmtree(old)
    elif dctx.is_main:  # write a temporary folder, then swap it in
        tmp, old = out_dir / f"{CKPT}.tmp", out_dir / f"{CKPT}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {**client, "model": tr.module.state_dict(), "optimizer": tr.opt.state_dict()}
        if tr.scaler is not None:
            state["scaler"] = tr.scaler.state_dict()
        torch.save(state, tmp / "state.pt")
        (tmp / PROGRESS).write_text(json.dumps(record))
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    if dctx.world_size > 1:
        dist.barrier()


def _resume(
    tr: _Trainer, out_dir: Path, run_key: str, generator: torch.Generator | None, dctx: Dist
) -> _Progress:
    """Load this run's checkpoint from ``out_dir`` if there is one; the progress to continue from."""
    found = _find_checkpoint(out_dir, run_key)
    if found is None:
        return _Progress()
    folder, record = found
    if tr.engine is not None:
        _, client = tr.engine.load_checkpoint(str(folder), tag=record["tag"])
    else:
        client = torch.load(folder / "state.pt", weights_only=False, map_location="cpu")
        tr.module.load_state_dict(client.pop("model"))
        tr.opt.load_state_dict(client.pop("optimizer"))
        if tr.scaler is not None and "scaler" in client:
            tr.scaler.load_state_dict(client.pop("scaler"))
    _restore_rng(client["rng"], generator, dctx)
    return _Progress(client["step"], client["skipped"], client["latest"], client["history"])


def clear_checkpoint(out_dir: Path) -> None:
    """Remove resumable state once the final model is saved (it is not a pipeline output)."""
    for name in (CKPT, f"{CKPT}.tmp", f"{CKPT}.old"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


# ---------------------------------------------------------------------------------------- the loop


def _record(
    progress: _Progress, values: dict[str, float], cfg: TrainConfig, logger: Logger | None, dctx: Dist
) -> None:
    """Keep a finished step's values; every ``log_every`` steps (and at the end) log them."""
    progress.latest.update(values)
    if progress.step % cfg.log_every == 0 or progress.step == cfg.steps:
        row = {**progress.latest, "step": progress.step}
        progress.history.append(row)
        if logger is not None and dctx.is_main:
            logger(progress.step, row)


def run_loop(
    module: nn.Module,
    batches: Iterator[Any],
    step_fn: StepFn,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    logger: Logger | None = None,
    generator: torch.Generator | None = None,
    deepspeed: DeepSpeedConfig | None = None,
    resume: bool = True,
    run_key: str = "",
) -> LoopResult:
    """Train ``module`` (everything trainable in it) for ``cfg.steps`` steps.

    ``batches`` must be deterministic: on resume the loop skips the batches already consumed, so a
    resumed run sees the same data as an uninterrupted one. ``generator`` (sampling randomness of the
    step function) is checkpointed too. Checkpoints go to ``out_dir/checkpoint`` every
    ``cfg.checkpoint_every`` steps. ``out_dir`` should not be a DVC output (DVC deletes those before a
    re-run); ``run_key`` (a hash of everything that defines the run) keeps a checkpoint of another
    configuration from being resumed. Under a process group, gradients are averaged by DDP, or by
    DeepSpeed ZeRO with ``deepspeed`` (enabled). ``module`` is moved to this process's device (its CUDA
    GPU, else the CPU): step functions move their batches to it. ``cfg.precision`` and
    ``cfg.gradient_checkpointing`` apply to everything in ``module``. When the run ends, ``module`` holds
    the whole float32 weights on every rank (after ZeRO-3 and 16-bit DeepSpeed modes too).
    """
    dctx = Dist.from_env()
    dctx.init()
    tr = _setup(module, step_fn, cfg, deepspeed, dctx)
    progress = _resume(tr, out_dir, run_key, generator, dctx) if resume else _Progress()
    start, last = progress.step, {}
    if start and dctx.is_main:
        print(f"resumed from step {start} of {cfg.steps} ({out_dir / CKPT})", flush=True)
        if logger is not None:
            for row in progress.history:  # what the killed process logged up to the checkpoint
                logger(int(row["step"]), row)
    for _ in range(start):  # same data position as the uninterrupted run
        next(batches)
    tr.run_step.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        terms = _train_step(tr, next(batches), step, cfg, dctx)
        if terms is None:
            progress.skipped += 1
            if progress.skipped > cfg.max_nonfinite:
                raise TrainingError(
                    f"{progress.skipped} non-finite losses (limit train.max_nonfinite={cfg.max_nonfinite}) "
                    f"at step {step}; lower the learning rate or check the inputs"
                )
            continue
        progress.step = step + 1
        last = {k: float(v.detach()) for k, v in terms.items()} | {"lr": tr.opt.param_groups[0]["lr"]}
        _record(progress, last, cfg, logger, dctx)
        if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 and progress.step < cfg.steps:
            _save(tr, out_dir, progress, _gather_rng(generator, dctx), run_key, dctx)
    seconds = time.perf_counter() - t0
    if tr.engine is not None:
        _gather_deepspeed_weights(tr, dctx)
    return LoopResult(cfg.steps, start, progress.skipped, seconds, last, progress.history)


# ---------------------------------------------------------------------------------------- dvclive


class RunLog:
    """A ``run_loop`` logger writing dvclive metrics and plots to ``directory``.

    The folder starts anew with every process: a resumed ``run_loop`` logs the checkpoint's history
    again first, so each step is in it once, as in an uninterrupted run (only the timestamps of those
    rows are the resume's). DVC tracks the folder itself (dvc.yaml), so dvclive must not create
    experiments or edit dvc.yaml. Only rank 0 writes: other ranks keep nothing, so they never race on
    the same files.
    """

    def __init__(self, directory: Path) -> None:
        self.live: Any = None
        if Dist.from_env().is_main:
            from dvclive import Live

            self.live = Live(str(directory), save_dvc_exp=False, dvcyaml=None)

    def __call__(self, step: int, values: dict[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = step
        for name, value in values.items():
            if name != "step":
                self.live.log_metric(name, value)

    def end(self, summary: dict[str, float]) -> None:
        """Write the final values (``metrics.json``) with ``summary`` added."""
        if self.live is None:
            return
        self.live.summary.update(summary)
        self.live.end()
