"""What the report reads: dvclive TSVs, nested lookups, training logs named by model."""

from __future__ import annotations

import pytest

from geodistill.errors import DataError
from geodistill.eval.results import lookup, read_tsv, training_curves


def test_read_tsv(tmp_path):
    f = tmp_path / "kl.tsv"
    f.write_text("timestamp\tstep\tkl\n1700000000\t2\t0.5\n1700000001\t4\t0.25\n")
    assert read_tsv(f) == ([2.0, 4.0], [0.5, 0.25])
    f.write_text("step\tkl\n2\tnan?\n")
    with pytest.raises(DataError, match="line 2"):
        read_tsv(f)
    f.write_text("kl\n0.5\n")
    with pytest.raises(DataError, match="step"):
        read_tsv(f)


def test_lookup():
    assert lookup({"a": {"b": 1}}, "a", "b") == 1
    assert lookup({"a": {"b": 1}}, "a", "c") is None and lookup(None, "a") is None


def test_training_curves_are_read_by_model_name(tmp_path):
    folder = tmp_path / "dvclive" / "student_kd" / "plots" / "metrics"
    folder.mkdir(parents=True)
    (folder / "kl.tsv").write_text("step\tkl\n1\t0.5\n")
    curves, missing = training_curves(tmp_path)
    assert curves == {"student_kd": {"kl": ([1.0], [0.5])}}
    assert missing == ["teacher", "student_sft", "student_control"]
