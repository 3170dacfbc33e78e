"""The GPU check script, run on the CPU at a tiny shape (the same code path bar the device)."""

from __future__ import annotations

import pytest
import torch

from geodistill.bench import gpu

TINY = ["--image-tokens", "16", "--records", "3", "--images", "2", "--steps", "1", "--vocab", "300"]
TINY += ["--teacher", "64", "2", "2", "--student", "32", "2", "2", "--vision", "32", "2", "2"]


def test_gpu_check_runs_every_part_on_cpu(capsys):
    out = gpu.main(["--device", "cpu", "--precision", "bf16", *TINY])
    assert set(out) == {"plain", "reuse", "step"}
    for t in out.values():
        assert t.seconds > 0 and t.flops > 0 and t.records == 6 and t.tokens > 6 * 16
    assert out["plain"].flops == out["reuse"].flops  # the same work, done once or shared
    assert out["step"].flops == pytest.approx(3 * gpu.forward_flops(*_student_and_batch()), rel=1e-9)
    text = capsys.readouterr().out
    assert "| teacher pass, prefix reuse |" in text and "| distillation step (student) |" in text


def _student_and_batch():
    args = gpu.parse_args(["--device", "cpu", *TINY])
    student = gpu.build(gpu.arch(*args.student, 16, args.vision), 300, torch.float32, torch.device("cpu"), 1)
    teacher = gpu.build(gpu.arch(*args.teacher, 16, args.vision), 300, torch.float32, torch.device("cpu"), 0)
    return student, gpu.batch_of(teacher, 2, 3, 300, seed=0)


def test_flops_follow_the_planner_and_mfu_uses_the_peak():
    student, batch = _student_and_batch()
    assert gpu.forward_flops(student, batch) > 0
    t = gpu.Timing(seconds=2.0, peak_bytes=2**30, flops=4e12, records=10, tokens=1000)
    cells = gpu.row("x", t, peak=10.0)
    assert cells[1:6] == ["5.0", "500", "2", "20.0", "1.00"]
    assert gpu.row("x", t, peak=None)[4] == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_without_a_gpu_it_says_how_to_run_on_the_cpu():
    with pytest.raises(SystemExit, match=r"no CUDA GPU here.*--device cpu"):
        gpu.main(TINY)
