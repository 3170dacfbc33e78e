"""The DVC pipeline from a clean checkout, on a tiny configuration, in a temporary copy.

The fast test runs `dvc repro shard`; the slow one runs everything, then checks that a `dvc exp run`
changing a distill param re-runs only distill -> evaluate(student_kd) (and reuses teacher and cache).
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from geodistill.config import LlavaArch

ROOT = Path(__file__).resolve().parents[1]

TINY_TRAIN = {"steps": 4, "batch_size": 4, "warmup": 1, "max_len": 200, "log_every": 2}


def _checkout(tmp: Path) -> Path:
    """A git repo holding this working tree's tracked and unignored files (what a clean clone has)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    dst = tmp / "repo"
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "snapshot"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


def _tiny_params(repo: Path, tiny_arch: Callable[..., LlavaArch]) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"]["synthetic"].update(
        image_size=32, grid=4, train_images=12, val_images=4, test_images=4, pretrain_texts=8
    )
    p["shard"]["maxcount"] = 5
    p["tokenizer"]["vocab_size"] = 300
    teacher = tiny_arch(hidden_size=48, intermediate_size=96)
    student = tiny_arch(hidden_size=32, intermediate_size=64, num_layers=1)
    p["teacher"]["arch"], p["student"]["arch"] = asdict(teacher), asdict(student)
    for section in ("teacher", "sft", "distill"):
        p[section]["train"].update(TINY_TRAIN)
    p["cache"]["batch_size"] = 8
    p["distill"]["pt_batch_size"] = 2
    p["eval"].update(limit=3, batch_size=4, max_new_tokens=8, latency_samples=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def test_dvc_repro_shard_from_clean_checkout(tmp_path, tiny_arch):
    repo = _checkout(tmp_path)
    _tiny_params(repo, tiny_arch)
    _dvc(repo, "repro", "shard")
    manifest = yaml.safe_load((repo / "data/shards/train/manifest.json").read_text())
    assert manifest["totals"]["samples"] == 12 and len(manifest["shards"]) == 3
    assert "didn't change" in _dvc(repo, "repro", "shard")


@pytest.mark.slow
def test_full_pipeline_and_experiment_reuse(tmp_path, tiny_arch):
    repo = _checkout(tmp_path)
    _tiny_params(repo, tiny_arch)
    _dvc(repo, "repro")
    for name in ("teacher", "student_sft", "student_control", "student_kd"):
        assert (repo / f"metrics/{name}.json").exists()
        assert (repo / f"dvclive/{name}/plots/metrics/loss.tsv").exists()
        summary = json.loads((repo / f"models/{name}/train_summary.json").read_text())
        assert summary["steps"] == summary["steps_run"] == TINY_TRAIN["steps"]
    assert not (repo / "checkpoints").exists() or not any((repo / "checkpoints").rglob("state.pt"))
    assert (repo / "reports/report.md").exists()
    out = _dvc(repo, "exp", "run", "-S", "distill.kl=forward")
    for stage in (
        "prepare",
        "shard",
        "tokenizer",
        "teacher",
        "teacher_cache",
        "student_sft",
        "student_control",
    ):
        assert f"Stage '{stage}' didn't change, skipping" in out, stage
    assert "Running stage 'distill'" in out
    assert "Running stage 'evaluate@student_kd'" in out
    assert "Running stage 'evaluate@teacher'" not in out
