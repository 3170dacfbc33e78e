"""Worker of the multi-process tests in test_train.py (gloo, CPU), one process per rank (from tests/distill):

    torchrun --standalone --nproc_per_node 2 dist_worker.py toy OUT [--deepspeed STAGE] [--crash-at N]
    torchrun --standalone --nproc_per_node 2 dist_worker.py distill OUT ARGS_JSON
    python dist_worker.py distill OUT ARGS_JSON [--kill-at N]       # one process

``toy``: ``run_loop`` on a small MLP (under DeepSpeed ZeRO STAGE with ``--deepspeed``, ``--offload`` as
``distill.deepspeed.offload``), each rank on its half of a global batch; with ``--crash-at`` the
first run raises at that step and a second run resumes from its checkpoint. ``distill``: ``run_distill``
with the configs and input paths in ARGS_JSON, writing OUT/{model,dvclive,checkpoints}; with
``--kill-at`` the process kills itself with SIGKILL at that step. Each rank writes OUT/rank<r>.pt =
{"weights": flat vector, "history" or "summary"} (when it was not killed).
The toy functions are also imported by the tests for the single-process reference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from geodistill.config import (
    CacheConfig,
    DeepSpeedConfig,
    DistillConfig,
    StudentConfig,
    TrainConfig,
    from_dict,
)
from geodistill.distill.sft import RunPaths
from geodistill.distill.train import Dist, run_loop

TOY = TrainConfig(steps=6, batch_size=4, lr=0.05, warmup=2, log_every=1, checkpoint_every=2, grad_clip=1.0)
GLOBAL_BATCH = 8
"""Rows per step over all ranks: rank r of W takes rows [r * 8 / W, (r + 1) * 8 / W)."""


def toy_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def toy_batches(rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic endless (x (b, 4), y (b, 1)) batches, b = GLOBAL_BATCH / world_size."""
    per = GLOBAL_BATCH // world_size
    for i in itertools.count():
        g = torch.Generator().manual_seed(i)
        x = torch.randn(GLOBAL_BATCH, 4, generator=g)
        y = torch.sin(3 * x.sum(-1, keepdim=True))
        yield x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def toy_step(model: nn.Module, crash_at: int | None = None):
    """A step function: MSE (mean over the batch, so averaged rank gradients = the global gradient)."""

    def step_fn(batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if step == crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        x, y = batch
        return {"loss": F.mse_loss(model(x), y)}

    return step_fn


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def run_toy(out: Path, deepspeed: DeepSpeedConfig | None, crash_at: int | None) -> dict:
    d = Dist.from_env()
    history: list[dict[str, float]] = []
    ckpt = out / "ckpt"

    def log(step: int, values: dict[str, float]) -> None:
        history.append(values)

    model = toy_model()
    if crash_at is not None:
        try:
            run_loop(model, toy_batches(d.rank, d.world_size), toy_step(model, crash_at), TOY, ckpt,
                     logger=log, deepspeed=deepspeed, run_key="toy")  # fmt: skip
        except RuntimeError:
            pass
        else:
            raise AssertionError("the simulated crash did not happen")
        model = toy_model()  # a fresh process would start from the initial weights
        history.clear()  # and a fresh logger
    result = run_loop(model, toy_batches(d.rank, d.world_size), toy_step(model), TOY, ckpt,
                      logger=log, deepspeed=deepspeed, run_key="toy")  # fmt: skip
    # rank 0 logs; other ranks return their LoopResult history (rank 0's rows up to the checkpoint,
    # then their own local losses)
    return {"weights": flat(model), "history": history if d.is_main else result.history}


def run_distill_worker(out: Path, args: dict, kill_at: int | None = None) -> dict:
    """run_distill as stages/distill.py calls it, writing into ``out``; returns this rank's final student
    weights too. With ``kill_at`` the process kills itself (SIGKILL, as ``kill -9``) at that step."""
    from geodistill.distill import kd, sft

    final: dict[str, nn.Module] = {}
    merge = sft.merge_lora

    def capture(model: nn.Module) -> nn.Module:  # every rank passes its trained student through here
        final["student"] = merge(model)
        return final["student"]

    sft.merge_lora = capture
    if kill_at is not None:
        step = kd.DistillStep.__call__

        def killing_step(self, examples, step_index: int):
            if step_index == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, examples, step_index)

        kd.DistillStep.__call__ = killing_step
    summary = kd.run_distill(
        from_dict(DistillConfig, args["distill"], "distill"),
        from_dict(CacheConfig, args["cache"], "cache"),
        from_dict(StudentConfig, args["student"], "student"),
        shards=Path(args["shards"]),
        cache_path=Path(args["cache_path"]),
        base_dir=Path(args["base_dir"]),
        teacher_dir=Path(args["teacher_dir"]),
        prepared=Path(args["prepared"]),
        paths=RunPaths(out / "model", out / "dvclive", out / "checkpoints"),
    )
    return {"weights": flat(final["student"]), "summary": summary}


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["toy", "distill"])
    p.add_argument("out", type=Path)
    p.add_argument("args_json", nargs="?", default="{}")
    p.add_argument("--deepspeed", type=int, default=None, help="ZeRO stage")
    p.add_argument("--offload", default="none", help="distill.deepspeed.offload")
    p.add_argument("--crash-at", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None)
    a = p.parse_args()
    if a.mode == "toy":
        ds = None if a.deepspeed is None else DeepSpeedConfig(True, a.deepspeed, a.offload)
        res = run_toy(a.out, ds, a.crash_at)
    else:
        res = run_distill_worker(a.out, json.loads(a.args_json), a.kill_at)
    d = Dist.from_env()
    torch.save(res, a.out / f"rank{d.rank}.pt")


if __name__ == "__main__":
    main()
