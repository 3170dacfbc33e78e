"""The shared training loop, the batch order, and distillation end to end on tiny models (CPU).

Fast tests: the learning-rate schedule; ``run_loop`` on a toy module (exact resume, run keys, non-finite
losses); ``shuffled_batches``; ``run_distill`` on the tiny workspace of conftest.py (loss terms, export,
teacher loading, on-policy, LoRA, resume); the cache-to-student alignment of ``gather_targets``.
Slow tests (``pytest -m slow``): two processes under torchrun (gloo): plain DDP, DeepSpeed ZeRO-2, and
ZeRO-3 with CPU offload (with LoRA in run_distill).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlavaForConditionalGeneration

from geodistill.cache.build import build_cache, cache_fingerprint, record_key
from geodistill.cache.store import CacheReader
from geodistill.config import (
    CacheConfig,
    DeepSpeedConfig,
    DistillConfig,
    LoraConfig,
    OnPolicyConfig,
    StudentConfig,
    TrainConfig,
)
from geodistill.data.collate import iter_examples, shuffled_batches, text_length
from geodistill.data.shards import load_manifest
from geodistill.distill import kd, sft
from geodistill.distill.kd import gather_targets, run_distill
from geodistill.distill.losses import distill_kl, reverse_kl
from geodistill.distill.sft import Collator, RunPaths, sft_stage
from geodistill.distill.train import LoopResult, lr_factor, run_loop
from geodistill.errors import CacheError, ConfigError, TrainingError
from geodistill.models.checkpoints import load_for_training
from geodistill.models.llava import num_image_tokens

WORKER = Path(__file__).with_name("dist_worker.py")


# ------------------------------------------------------------------------------------ lr schedule


def test_lr_warmup_then_cosine_to_floor_at_last_step():
    cfg = TrainConfig(steps=21, warmup=4, lr=1.0)
    f = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert f[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # linear warm-up to the peak, decay from 4
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))  # non-increasing after the warm-up
    assert f[12] == pytest.approx(0.55)  # half-way through the cosine: half-way to the floor
    assert f[-1] == pytest.approx(0.1)  # the floor is reached at the last step
    assert min(f) >= 0.1 - 1e-12
    assert lr_factor(100, cfg) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_factor(0, TrainConfig(steps=5, warmup=0)) == pytest.approx(1.0)  # no warm-up: start at peak


# ------------------------------------------------------------------------------------ run_loop (toy)


class Toy(nn.Module):
    """A small MLP with dropout, so the global RNG matters to the result."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def toy_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic endless batches (a fresh iterator replays them from the start)."""
    i = 0
    while True:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, 4, generator=g)
        yield x, torch.sin(3 * x.sum(-1, keepdim=True))
        i += 1


class Crash(Exception):
    pass


LOOP = TrainConfig(steps=8, batch_size=8, lr=0.05, warmup=2, log_every=1, checkpoint_every=2)


def toy_run(
    out: Path,
    logged: list[dict[str, float]],
    *,
    cfg: TrainConfig = LOOP,
    crash_at: int | None = None,
    bad: dict[int, float] | None = None,
    key: str = "a",
) -> tuple[Toy, LoopResult]:
    """run_loop on a fresh Toy; the step function also draws from its own checkpointed generator."""
    model = Toy()
    gen = torch.Generator().manual_seed(7)

    def step_fn(batch: tuple[torch.Tensor, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if step == crash_at:
            raise Crash
        x, y = batch
        noise = 0.1 * torch.randn(y.shape, generator=gen)  # (8, 1)
        loss = F.mse_loss(model(x), y + noise)
        if bad and step in bad:
            loss = loss * bad[step]
        return {"loss": loss, "mse": loss.detach()}

    result = run_loop(
        model,
        toy_batches(),
        step_fn,
        cfg,
        out,
        logger=lambda _s, v: logged.append(v),
        generator=gen,
        run_key=key,
    )
    return model, result


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture
def uninterrupted(tmp_path: Path) -> tuple[torch.Tensor, list[dict[str, float]]]:
    torch.manual_seed(0)
    logged: list[dict[str, float]] = []
    model, _ = toy_run(tmp_path / "ref", logged)
    return weights(model), logged


@pytest.mark.parametrize("survivor", ["checkpoint", "checkpoint.old"])
def test_run_loop_resumes_exactly(tmp_path, uninterrupted, survivor):
    ref_w, ref_log = uninterrupted
    assert [v["step"] for v in ref_log] == list(range(1, 9))
    out = tmp_path / "run"
    logged: list[dict[str, float]] = []
    torch.manual_seed(0)
    with pytest.raises(Crash):
        toy_run(out, logged, crash_at=4)  # steps 0-3 done, checkpoint after step 4 (checkpoint_every=2)
    assert [v["step"] for v in logged] == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint/progress.json").read_text())["step"] == 4
    if survivor == "checkpoint.old":  # killed between the two renames of a checkpoint save
        (out / "checkpoint").rename(out / "checkpoint.old")
    torch.manual_seed(1234)  # the resumed process has other RNG state: the checkpoint must restore it
    random.seed(1234)
    again: list[dict[str, float]] = []
    model, result = toy_run(out, again)
    assert result.resumed_from == 4 and result.steps == 8
    # the resumed run logs the checkpoint's rows (steps 1-4) first, then its own: the whole history once
    assert again == result.history == ref_log  # same losses, lr and steps, bit for bit
    assert torch.equal(weights(model), ref_w)


def test_checkpoint_of_another_run_key_is_not_resumed(tmp_path, uninterrupted):
    ref_w, ref_log = uninterrupted
    out = tmp_path / "run"
    torch.manual_seed(0)
    with pytest.raises(Crash):
        toy_run(out, [], crash_at=4, key="a")
    assert (out / "checkpoint").exists()
    logged: list[dict[str, float]] = []
    torch.manual_seed(0)
    model, result = toy_run(out, logged, key="b")
    assert result.history[0]["step"] == 1  # started over
    assert logged == ref_log and torch.equal(weights(model), ref_w)


def test_lr_logged_follows_schedule(uninterrupted):
    _, ref_log = uninterrupted
    for v in ref_log:
        assert v["lr"] == pytest.approx(LOOP.lr * lr_factor(int(v["step"]) - 1, LOOP))


def test_nonfinite_losses_are_skipped_and_counted(tmp_path):
    logged: list[dict[str, float]] = []
    cfg = dataclasses.replace(LOOP, max_nonfinite=2)
    model, result = toy_run(tmp_path, logged, cfg=cfg, bad={2: math.nan, 5: math.inf})
    assert result.skipped_nonfinite == 2 and result.steps == cfg.steps
    assert [v["step"] for v in logged] == [1, 2, 4, 5, 7, 8]  # steps 3 and 6 (indices 2, 5) skipped
    assert torch.isfinite(weights(model)).all()
    assert all(math.isfinite(v["loss"]) for v in logged)


def test_too_many_nonfinite_losses_abort(tmp_path):
    cfg = dataclasses.replace(LOOP, max_nonfinite=1)
    with pytest.raises(TrainingError, match=r"2 non-finite losses.*max_nonfinite=1.*step 3"):
        toy_run(tmp_path, [], cfg=cfg, bad={1: math.nan, 3: math.nan})


def test_nothing_to_train_is_an_error(tmp_path):
    model = Toy().requires_grad_(False)
    with pytest.raises(TrainingError, match="frozen"):
        run_loop(model, toy_batches(), lambda b, s: {"loss": model(b[0]).sum()}, LOOP, tmp_path)


# ------------------------------------------------------------------------------------ batch order


def keys(batch: list) -> list[str]:
    return [record_key(ex.sample_key, ex.index) for ex in batch]


def take(it: Iterator[list], n: int) -> list[list[str]]:
    return [keys(next(it)) for _ in range(n)]


def test_shuffled_batches_deterministic_and_partial_batches_carry_over(workspace):
    train = workspace.shards / "train"
    n_records = load_manifest(train)["totals"]["records"]
    assert n_records % 7 != 0  # batch 7 leaves a partial batch at each epoch end
    n_batches = 2 * n_records // 7 + 1
    a = take(shuffled_batches(train, 7, seed=3), n_batches)
    assert a == take(shuffled_batches(train, 7, seed=3), n_batches)
    assert a != take(shuffled_batches(train, 7, seed=4), n_batches)
    assert all(len(b) == 7 for b in a)  # never a short batch: the partial one is filled from the next epoch
    stream = [k for b in a for k in b]
    epoch0, epoch1 = stream[:n_records], stream[n_records : 2 * n_records]
    assert len(set(epoch0)) == len(set(epoch1)) == n_records  # every record once per epoch, none dropped
    assert set(epoch0) == set(epoch1) and epoch0 != epoch1  # each epoch reshuffled
    boundary = a[n_records // 7]  # the batch that straddles the two epochs
    assert set(boundary[: n_records % 7]) <= set(epoch0) and set(boundary[n_records % 7 :]) <= set(epoch1)


def test_shuffled_batches_split_records_across_ranks(workspace):
    train = workspace.shards / "train"
    n_records = load_manifest(train)["totals"]["records"]
    seen = [
        set(k for b in take(shuffled_batches(train, 1, 0, rank=r, world_size=2), 30) for k in b)
        for r in (0, 1)
    ]
    assert not seen[0] & seen[1]
    full = {k for b in take(shuffled_batches(train, 1, 0), n_records) for k in b}
    assert len(full) == n_records


def test_length_groups_reorder_the_stream_within_groups_and_cut_padding(workspace):
    train = workspace.shards / "train"
    by_key = {record_key(ex.sample_key, ex.index): text_length(ex) for ex in iter_examples(train)}
    b, g, n_groups = 4, 3, 12  # 144 records: more than an epoch (88), so groups straddle epochs
    plain = take(shuffled_batches(train, b, seed=2), g * n_groups)
    grouped = take(shuffled_batches(train, b, seed=2, length_group=g), g * n_groups)
    assert grouped == take(shuffled_batches(train, b, seed=2, length_group=g), g * n_groups)
    for i in range(n_groups):  # each group holds exactly the records of the same stretch of the stream
        same_stretch = plain[i * g : (i + 1) * g]
        group = grouped[i * g : (i + 1) * g]
        assert sorted(k for bt in group for k in bt) == sorted(k for bt in same_stretch for k in bt)
        spans = sorted((min(by_key[k] for k in bt), max(by_key[k] for k in bt)) for bt in group)
        assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(spans))  # sorted cuts

    def padding(batches: list[list[str]]) -> int:
        return sum(max(by_key[k] for k in bt) * len(bt) - sum(by_key[k] for k in bt) for bt in batches)

    assert padding(grouped) < 0.7 * padding(plain)
    firsts = [max(by_key[k] for k in bt) for bt in grouped[::g]]
    seconds = [max(by_key[k] for k in bt) for bt in grouped[1::g]]
    assert any(a > b for a, b in zip(firsts, seconds, strict=True))  # shuffled, not shortest first


def test_control_and_distill_see_the_same_batches(workspace, tmp_path, monkeypatch):
    """stages/student_control.py (sft_stage with distill.train) and run_distill: one batch order."""
    train = TrainConfig(steps=14, batch_size=8, seed=5, max_len=512, length_group=3)
    seen: dict[str, list[list[str]]] = {}

    def recording_loop(name: str):
        def fake(module, batches, step_fn, cfg, out_dir, **kw) -> LoopResult:
            seen[name] = take(batches, cfg.steps)
            return LoopResult(cfg.steps, 0, 0, 0.0)

        return fake

    monkeypatch.setattr(sft, "run_loop", recording_loop("control"))
    monkeypatch.setattr(kd, "run_loop", recording_loop("distill"))
    student, tok, transform = load_for_training(workspace.student)
    sft_stage(student, tok, transform, train, workspace.shards, paths_in(tmp_path / "control"), key="k")
    run_distill(
        DistillConfig(train=train), workspace.cache_cfg, StudentConfig(), **inputs(workspace, tmp_path)
    )
    assert seen["control"] == seen["distill"]
    assert len({k for b in seen["control"] for k in b}) > 80  # more than an epoch of 88 records


# ------------------------------------------------------------------------------------ run_distill


def paths_in(folder: Path) -> RunPaths:
    return RunPaths(folder / "model", folder / "dvclive", folder / "checkpoints")


def inputs(ws, folder: Path) -> dict[str, Any]:
    """run_distill's path arguments: the workspace's inputs, every output inside ``folder``."""
    return dict(
        shards=ws.shards,
        cache_path=ws.cache,
        base_dir=ws.student,
        teacher_dir=ws.teacher,
        prepared=ws.prepared,
        paths=paths_in(folder),
    )


def tiny_distill(**changes: Any) -> DistillConfig:
    """Cached (offline) terms only unless ``onpolicy`` is given: the default config has them on."""
    train = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup=1, log_every=1, max_len=512)
    offline = OnPolicyConfig(enabled=False)
    return dataclasses.replace(DistillConfig(pt_batch_size=4, train=train, onpolicy=offline), **changes)


@pytest.fixture
def load_calls(monkeypatch) -> list[Path]:
    """Every model folder run_distill loads (its student, and the teacher only for on-policy)."""
    calls: list[Path] = []

    def recording(load):
        def recording_load(model_dir, **kwargs):
            calls.append(Path(model_dir).resolve())
            return load(model_dir, **kwargs)

        return recording_load

    monkeypatch.setattr(kd, "load_for_training", recording(kd.load_for_training))
    monkeypatch.setattr(kd, "load_for_inference", recording(kd.load_for_inference))
    return calls


def read_metric(log_dir: Path, name: str) -> list[float]:
    return [value for _step, value in logged_rows(log_dir)[name]]


def logged_rows(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every dvclive metric file under ``log_dir``: (step, value) rows, in file order (no timestamps)."""
    rows = {}
    for tsv in sorted((log_dir / "plots/metrics").rglob("*.tsv")):
        header, *lines = [line.split("\t") for line in tsv.read_text().splitlines()]
        step = header.index("step")
        rows[tsv.stem] = [(int(r[step]), float(r[-1])) for r in lines]
    return rows


def saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_run_distill_end_to_end(workspace, tmp_path, load_calls, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # only to check that nothing is written where it was not asked for
    paths = paths_in(tmp_path / "run")
    args = inputs(workspace, tmp_path / "run")
    summary = run_distill(tiny_distill(), workspace.cache_cfg, StudentConfig(), **args)
    assert list(cwd.iterdir()) == []
    assert summary["steps"] == summary["steps_run"] == 3 and summary["resumed_from"] == 0
    assert summary["skipped_nonfinite"] == 0
    assert json.loads((paths.out / "train_summary.json").read_text()) == summary
    for term in ("kl", "align", "pt", "loss"):
        values = read_metric(paths.log_dir, term)
        assert len(values) == 3 and all(math.isfinite(v) for v in values), term
        assert math.isfinite(summary["train"][term])
    assert json.loads((paths.log_dir / "metrics.json").read_text())["val_loss"] == summary["val"]["loss"]
    assert summary["train"]["kl"] > 0 and summary["train"]["align"] > 0
    assert not any(k.startswith("onpolicy") for k in summary["train"])
    assert math.isfinite(summary["val"]["loss"])
    # the teacher model was never loaded: everything came from the cache
    assert load_calls == [workspace.student.resolve()]
    # a plain transformers checkpoint with exactly the student's weights (the feature adapter dropped)
    model = LlavaForConditionalGeneration.from_pretrained(paths.out, local_files_only=True)
    base, trained = saved_tensors(workspace.student), saved_tensors(paths.out)
    assert set(trained) == set(base)
    assert not any("adapter" in k or "lora" in k for k in trained)
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # it trained
    assert model.config.text_config.hidden_size == 32
    assert (paths.out / "fingerprint.json").exists()
    assert not (paths.checkpoints / "checkpoint").exists()  # resumable state cleared


def test_run_distill_refuses_an_empty_pt_corpus(workspace, tmp_path):
    """pt_weight > 0 with nothing to train L_PT on is an error naming the file and the param."""
    (tmp_path / "pretrain.jsonl").write_text("")
    args = {**inputs(workspace, tmp_path / "run"), "prepared": tmp_path}
    with pytest.raises(ConfigError, match=r"distill.pt_weight is 0.1 .*pretrain.jsonl is empty"):
        run_distill(tiny_distill(pt_weight=0.1), workspace.cache_cfg, StudentConfig(), **args)
    assert not (tmp_path / "run").exists()  # refused before anything was trained or written


def test_run_distill_onpolicy_terms(workspace, tmp_path, load_calls):
    onpolicy = OnPolicyConfig(enabled=True, every=1, batch_size=2, max_new_tokens=3)
    summary = run_distill(
        tiny_distill(onpolicy=onpolicy), workspace.cache_cfg, StudentConfig(), **inputs(workspace, tmp_path)
    )
    assert workspace.teacher.resolve() in load_calls
    for term in ("onpolicy_single", "onpolicy_long", "onpolicy_total", "onpolicy_w", "onpolicy_length"):
        values = read_metric(tmp_path / "dvclive", term)
        assert len(values) == 3 and all(math.isfinite(v) for v in values), term
    assert 1 <= summary["train"]["onpolicy_length"] <= 3
    assert summary["train"]["onpolicy_single"] >= 0


def test_run_distill_lora_exports_merged_plain_model(workspace, tmp_path):
    out = paths_in(tmp_path).out
    student = StudentConfig(lora=LoraConfig(enabled=True, r=4, alpha=8))
    run_distill(tiny_distill(), workspace.cache_cfg, student, **inputs(workspace, tmp_path))
    base, merged = saved_tensors(workspace.student), saved_tensors(out)
    assert set(merged) == set(base)  # plain keys: no base_model.model. prefix, no lora_A/lora_B
    LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    q = [k for k in base if "language_model" in k and "q_proj.weight" in k]
    k_proj = [k for k in base if "language_model" in k and "k_proj.weight" in k]
    assert q and all(not torch.equal(base[k], merged[k]) for k in q)  # the adapters were folded in
    assert all(torch.equal(base[k], merged[k]) for k in k_proj)  # untouched by LoRA: frozen


def test_run_distill_resumes_exactly(workspace, tmp_path, monkeypatch):
    """Killed after a checkpoint and re-run: the same student as an uninterrupted run (L_PT batches too)
    and the same logged history, each step once (the rows logged after the checkpoint are replaced)."""
    cfg = tiny_distill(train=dataclasses.replace(tiny_distill().train, steps=4, checkpoint_every=2))

    def run_in(folder: Path) -> dict[str, Any]:
        return run_distill(cfg, workspace.cache_cfg, StudentConfig(), **inputs(workspace, folder))

    reference = run_in(tmp_path / "a")
    offline = kd.offline_terms

    def crash_at_step_3(kd_module, batch, targets, cfg_, pool, pt):
        crash_at_step_3.calls += 1
        if crash_at_step_3.calls == 4:
            raise Crash
        return offline(kd_module, batch, targets, cfg_, pool, pt)

    crash_at_step_3.calls = 0
    monkeypatch.setattr(kd, "offline_terms", crash_at_step_3)
    with pytest.raises(Crash):
        run_in(tmp_path / "b")
    assert (tmp_path / "b/checkpoints/checkpoint/state.pt").exists()
    steps = [s for s, _ in logged_rows(tmp_path / "b/dvclive")["loss"]]
    assert steps == [1, 2, 3]  # step 3 was logged after the checkpoint
    monkeypatch.setattr(kd, "offline_terms", offline)
    torch.manual_seed(99)
    resumed = run_in(tmp_path / "b")
    assert resumed["resumed_from"] == 2 and resumed["steps_run"] == 2
    a, b = saved_tensors(tmp_path / "a/model"), saved_tensors(tmp_path / "b/model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_rows(tmp_path / "b/dvclive") == logged_rows(tmp_path / "a/dvclive")
    assert resumed["train"] == reference["train"]


# ------------------------------------------------------------------------------------ gather_targets


@pytest.fixture(scope="module")
def full_cache(workspace, tmp_path_factory) -> tuple[CacheReader, CacheConfig]:
    """A cache of the same teacher with k = V: its top-k is the whole distribution."""
    tok = load_for_training(workspace.student)[1]
    cfg = dataclasses.replace(workspace.cache_cfg, k=len(tok))
    path = tmp_path_factory.mktemp("full") / "cache.zarr"
    build_cache(workspace.teacher, workspace.shards / "train", path, cfg, progress=False)
    manifest = load_manifest(workspace.shards / "train")
    fp = cache_fingerprint(workspace.teacher, manifest, cfg, len(tok), 512)
    return CacheReader(path, fp, manifest, max_shards=None), cfg


@pytest.mark.parametrize("max_len", [512, 110])
def test_gather_targets_aligns_cache_rows_with_student_positions(workspace, full_cache, max_len):
    reader, _ = full_cache
    student, tok, transform = load_for_training(workspace.student)
    teacher = load_for_training(workspace.teacher)[0]
    examples = [ex for b in take_examples(workspace, 2) for ex in b]  # 16 records from several shards
    batch = Collator(tok, transform, num_image_tokens(student), max_len)(examples)
    if max_len == 110:
        assert batch.truncated > 0  # the student sees fewer answer tokens than were cached
    targets = gather_targets(reader, examples, batch)
    mask = targets.kl_mask  # (B, T-1)
    assert targets.topk_ids.shape == (int(mask.sum()), len(tok))
    with torch.no_grad():
        q_logits = student(**model_inputs(batch)).logits[:, :-1]  # (B, T-1, V)
        p_logits = teacher(**model_inputs(batch)).logits[:, :-1]
    log_q = q_logits[mask].log_softmax(-1)  # (M, V)
    log_p = p_logits[mask].log_softmax(-1)
    direct = (log_q.exp() * (log_q - log_p)).sum(-1)  # (M,) exact reverse KL per supervised token
    cached = reverse_kl(q_logits[mask], targets.topk_ids, targets.topk_logprobs)  # (M,) k = V: exact
    torch.testing.assert_close(cached, direct, rtol=2e-3, atol=2e-3)  # float16 cache values
    mean = distill_kl("reverse", q_logits, targets.topk_ids, targets.topk_logprobs, mask)
    torch.testing.assert_close(mean, direct.mean(), rtol=2e-3, atol=2e-3)
    # the comparison can tell: rows shifted by one token are far off
    shifted = reverse_kl(q_logits[mask], targets.topk_ids.roll(1, 0), targets.topk_logprobs.roll(1, 0))
    assert (shifted - direct).abs().max() > 1.0
    assert direct.mean() > 1.0  # a sharp teacher, far from the random student


def take_examples(ws, n: int) -> list[list]:
    it = shuffled_batches(ws.shards / "train", 8, seed=0)
    return [next(it) for _ in range(n)]


def model_inputs(batch) -> dict[str, torch.Tensor]:
    return dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
    )


def test_gather_targets_refuses_a_stale_cache(workspace):
    """More supervised tokens than cached rows means another tokenizer/template built the cache."""
    student, tok, transform = load_for_training(workspace.student)
    manifest = load_manifest(workspace.shards / "train")
    fp = cache_fingerprint(workspace.teacher, manifest, workspace.cache_cfg, len(tok), 512)
    reader = CacheReader(workspace.cache, fp, manifest)

    class ShortReader:
        def tokens(self, keys):
            return [
                dataclasses.replace(t, ids=t.ids[:-1], logprobs=t.logprobs[:-1]) for t in reader.tokens(keys)
            ]

        def features(self, keys) -> np.ndarray:
            return reader.features(keys)

    examples = take_examples(workspace, 1)[0]
    batch = Collator(tok, transform, num_image_tokens(student), 512)(examples)
    gather_targets(reader, examples, batch)  # the real cache fits
    with pytest.raises(CacheError, match="stale"):
        gather_targets(ShortReader(), examples, batch)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ precision


def sft_run(ws, folder: Path, **changes: Any) -> tuple[nn.Module, LoopResult]:
    """3 SFT steps of the workspace's student through run_loop with TrainConfig ``changes``."""
    model, tok, transform = load_for_training(ws.student)
    collator = Collator(tok, transform, num_image_tokens(model), 512)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup=1, log_every=1, **changes)
    batches = shuffled_batches(ws.shards / "train", 8, seed=0)
    step = lambda examples, _step: sft.sft_step(model, collator(examples))  # noqa: E731
    return model, run_loop(model, batches, step, cfg, folder, resume=False)


def test_bf16_training_steps_are_finite_and_close_to_fp32(workspace, tmp_path):
    """bf16 autocast over float32 master weights and optimizer state, 3 steps: finite losses within 0.1 %
    of fp32's, and the weights' change within 20 % of fp32's change (relative L2 norm). Measured here:
    losses within 1.5e-5 relative, change 4.8 % apart (AdamW's first steps move each weight by ~lr, with
    the sign of its gradient, so a few tiny gradients that bf16 flips count fully)."""
    init = flat_params(load_for_training(workspace.student)[0])
    ref, ref_run = sft_run(workspace, tmp_path / "fp32")
    model, run = sft_run(workspace, tmp_path / "bf16", precision="bf16")
    losses = [row["loss"] for row in run.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses == pytest.approx([row["loss"] for row in ref_run.history], rel=1e-3)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the masters stay float32
    moved = flat_params(ref) - init
    rel = float((flat_params(model) - init - moved).norm() / moved.norm())
    assert rel < 0.2


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_bf16_gradients_are_close_to_fp32(workspace):
    """One backward under the autocast run_loop uses (bf16 on CPU) against float32: cosine > 0.999 and
    relative L2 error < 2 % (measured here: cosine 0.999999, relative error 0.38 %, about bf16's 2^-8)."""
    model, tok, transform = load_for_training(workspace.student)
    batch = Collator(tok, transform, num_image_tokens(model), 512)(take_examples(workspace, 1)[0])

    def gradient(bf16: bool) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sft.sft_step(model, batch)["loss"]
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    g32, g16 = gradient(False), gradient(True)
    cos = float(F.cosine_similarity(g32, g16, dim=0))
    rel = float((g32 - g16).norm() / g32.norm())
    assert cos > 0.999 and rel < 0.02


def test_fp16_training_needs_a_gpu(tmp_path):
    model = nn.Linear(2, 1)
    cfg = TrainConfig(steps=1, batch_size=1, precision="fp16")
    with pytest.raises(ConfigError, match=r"train\.precision is fp16, which needs a CUDA GPU .*use bf16"):
        run_loop(model, iter([]), lambda b, s: {"loss": model.weight.sum()}, cfg, tmp_path)


def test_gradient_checkpointing_gives_the_same_training(workspace, tmp_path):
    """train.gradient_checkpointing recomputes activations in backward: the same weights after 3 steps."""
    ref, _ = sft_run(workspace, tmp_path / "plain")
    model, _ = sft_run(workspace, tmp_path / "ckpt", gradient_checkpointing=True)
    assert model.model.language_model.is_activation_checkpointing
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ two processes


def load_worker():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_worker(*args: str, procs: int = 2, cwd: Path | None = None, timeout: int = 600):
    """dist_worker.py in ``procs`` processes (torchrun), or in this one's own subprocess (procs = 1).

    The timeout is generous: each of these runs ~30-60 s on quiet cores, but 2-3 times that beside
    other jobs on a 2-core machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [*launcher, str(WORKER), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str, cwd: Path | None = None, timeout: int = 600) -> None:
    proc = run_worker(*args, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def single_process_reference(tmp_path: Path) -> torch.Tensor:
    w = load_worker()
    model = w.toy_model()
    run_loop(model, w.toy_batches(0, 1), w.toy_step(model), w.TOY, tmp_path / "ref", run_key="toy")
    return w.flat(model)


def check_ranks_match_reference(out: Path, reference: torch.Tensor) -> None:
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # the replicas never diverge
    # two halves of a batch with averaged gradients = the whole batch in one process (even after a resume)
    torch.testing.assert_close(ranks[0]["weights"], reference, rtol=0, atol=1e-6)
    # the resumed run's log: the checkpoint's rows (crashed in step 3, resumed at 2), then its own
    assert [v["step"] for v in ranks[0]["history"]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ddp_two_processes_same_weights_as_one(tmp_path):
    torchrun("toy", str(tmp_path), "--crash-at", "3")
    check_ranks_match_reference(tmp_path, single_process_reference(tmp_path))


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_same_weights_as_one(tmp_path):
    """ZeRO-2 (fp32, torch AdamW, gloo): the first use JIT-builds DeepSpeed's shm op (~90 s, then cached)."""
    torchrun("toy", str(tmp_path), "--deepspeed", "2", "--crash-at", "3")
    check_ranks_match_reference(tmp_path, single_process_reference(tmp_path))


@pytest.mark.slow
def test_deepspeed_zero3_offload_two_processes_same_weights_as_one(tmp_path):
    """ZeRO-3 (parameters partitioned too) with optimizer and parameters offloaded to CPU memory: the same
    weights as one process, across a crash and resume, gathered whole into the module. (Without offload it
    passed too; one case keeps `.ci/run` within its time: each costs ~3 min of two-process start-up.)"""
    torchrun("toy", str(tmp_path), "--deepspeed", "3", "--offload", "all", "--crash-at", "3")
    check_ranks_match_reference(tmp_path, single_process_reference(tmp_path))


def worker_args(ws, cfg: DistillConfig, student: StudentConfig | None = None) -> str:
    """dist_worker.py's ``distill`` arguments: configs and the workspace's inputs."""
    args = {
        "distill": dataclasses.asdict(cfg),
        "cache": dataclasses.asdict(ws.cache_cfg),
        "student": dataclasses.asdict(student or StudentConfig()),
        **{k: str(v) for k, v in inputs(ws, Path()).items() if k != "paths"},
    }
    return json.dumps(args)


@pytest.mark.slow
def test_deepspeed_zero2_run_distill(workspace, tmp_path):
    train = TrainConfig(
        steps=4, batch_size=4, lr=1e-3, warmup=1, log_every=1, checkpoint_every=2, max_len=512
    )
    cfg = tiny_distill(train=train, deepspeed=dataclasses.replace(DistillConfig().deepspeed, enabled=True))
    torchrun("distill", str(tmp_path), worker_args(workspace, cfg), cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    for r in ranks:
        assert r["summary"]["steps"] == 4 and r["summary"]["skipped_nonfinite"] == 0
        assert all(math.isfinite(r["summary"]["train"][t]) for t in ("kl", "align", "pt", "loss"))
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "model", local_files_only=True)
    assert set(saved_tensors(tmp_path / "model")) == set(saved_tensors(workspace.student))


@pytest.mark.slow
def test_deepspeed_zero3_offload_lora_run_distill(workspace, tmp_path):
    """run_distill under ZeRO-3 with LoRA and the optimizer offloaded to CPU memory, two processes: both
    ranks end with the same whole student (partitions gathered, LoRA merged into the targets only)."""
    train = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup=1, log_every=1, max_len=512)
    student = StudentConfig(lora=LoraConfig(enabled=True, r=4, alpha=8, targets=("q_proj", "o_proj")))
    ds = DeepSpeedConfig(enabled=True, zero_stage=3, offload="optimizer")
    cfg = tiny_distill(train=train, deepspeed=ds)
    torchrun("distill", str(tmp_path), worker_args(workspace, cfg, student), cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    for r in ranks:
        assert r["summary"]["steps"] == 3 and r["summary"]["skipped_nonfinite"] == 0
        assert all(math.isfinite(r["summary"]["train"][t]) for t in ("kl", "align", "pt", "loss"))
    base, trained = saved_tensors(workspace.student), saved_tensors(tmp_path / "model")
    assert set(trained) == set(base)
    o_proj = [k for k in base if "language_model" in k and "o_proj.weight" in k]
    k_proj = [k for k in base if "language_model" in k and "k_proj.weight" in k]
    assert o_proj and all(not torch.equal(base[k], trained[k]) for k in o_proj)  # adapters merged in
    assert all(torch.equal(base[k], trained[k]) for k in k_proj)  # not a target: untouched


@pytest.mark.slow
def test_run_distill_killed_with_sigkill_resumes_with_its_history(workspace, tmp_path):
    """kill -9 mid-run (no clean-up of any kind), then re-run: the same student and the same logged
    history as an uninterrupted run, each step once; the on-policy terms (every 3 steps) are logged
    with their latest value across the resume too."""
    onpolicy = OnPolicyConfig(enabled=True, every=3, batch_size=2, max_new_tokens=3)
    cfg = tiny_distill(
        train=dataclasses.replace(tiny_distill().train, steps=6, checkpoint_every=2), onpolicy=onpolicy
    )
    run_distill(cfg, workspace.cache_cfg, StudentConfig(), **inputs(workspace, tmp_path / "ref"))
    out = tmp_path / "killed"
    args = ("distill", str(out), worker_args(workspace, cfg))
    killed = run_worker(*args, "--kill-at", "5", procs=1)  # steps 0-4 done, checkpointed at 4
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((out / "checkpoints/checkpoint/progress.json").read_text())["step"] == 4
    assert [s for s, _ in logged_rows(out / "dvclive")["loss"]] == [1, 2, 3, 4, 5]
    resumed = run_worker(*args, procs=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4 of 6" in resumed.stdout
    summary = torch.load(out / "rank0.pt", weights_only=False)["summary"]
    assert (summary["resumed_from"], summary["steps_run"], summary["steps"]) == (4, 2, 6)
    reference, again = saved_tensors(tmp_path / "ref/model"), saved_tensors(out / "model")
    assert set(again) == set(reference) and all(torch.equal(reference[k], again[k]) for k in reference)
    history = logged_rows(out / "dvclive")
    assert history == logged_rows(tmp_path / "ref/dvclive")
    assert [s for s, _ in history["onpolicy_single"]] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------ benchmark


def test_bench_distill_smoke(capsys):
    """``python -m geodistill.bench.distill`` runs end to end (tiny sizes) and prints its table."""
    from geodistill.bench.distill import main

    params = Path(__file__).parents[2] / "params.yaml"
    tiny = ["--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--repeats", "1", "--images", "3"]
    main([*tiny, "--params", str(params)])
    out = capsys.readouterr().out
    assert "kd-cache" in out and "kd-live" in out and "kd-full" in out
    row = out.strip().splitlines()[-1].split()  # batch, sft s/step, then "<s/step> (<ratio>x)" per variant
    assert row[0] == "2" and float(row[1]) > 0 and row[3].endswith("x)")


def test_bench_memory_smoke(capsys):
    """``python -m geodistill.bench.memory`` at a tiny shape: checkpointing lowers the measured peak."""
    from geodistill.bench.memory import main

    tiny = "--hidden 64 --layers 3 --vision-hidden 64 --image-size 112 --patch 14 --text-tokens 20 --batch 1"
    off, on = main(tiny.split())
    assert (off.checkpointing, on.checkpointing) == (False, True)
    assert 0 < on.peak_bytes < off.peak_bytes
    assert "| on |" in capsys.readouterr().out
