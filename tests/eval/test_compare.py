"""The generated comparison: noise bands, verdicts and sentences."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from geodistill.eval.compare import Delta, comparison_sentence, deltas, noise_band
from geodistill.eval.results import ModelResults


def test_noise_band_and_verdicts():
    # Two standard errors of the difference of two proportions, in points.
    assert noise_band(0.5, 0.5, 100, 100) == pytest.approx(200 * math.sqrt(0.005))
    assert noise_band(0.0, 0.0, 10, 10) == 0.0
    assert math.isinf(noise_band(0.5, 0.5, None, 100))
    assert Delta("x", 0.01, 5.0, 10).verdict == "same"
    assert Delta("x", 4.0, 5.0, 10).verdict == "within noise"
    assert Delta("x", -6.0, 5.0, 10).verdict == "lower"
    assert Delta("x", 100.0, 0.0, 10).verdict == "higher"  # 0 % vs 100 %: no noise at all
    assert Delta("x", 3.0, math.inf, None).verdict == "within noise"


def test_deltas_cover_the_headline_metrics_both_models_have():
    a = ModelResults("a", {"scene": {"OA": 0.9, "AA": 0.8, "n": 100}, "vqa": {"mOA": 0.5}}, "", Path())
    b = ModelResults("b", {"scene": {"OA": 0.5, "AA": 0.8, "n": 100}}, "", Path())
    ds = {d.label: d for d in deltas(a, b)}
    assert set(ds) == {"scene OA", "scene AA"}
    assert ds["scene OA"].diff == pytest.approx(40.0) and ds["scene OA"].n == 100
    sentence = comparison_sentence("a", "b", list(ds.values()), "why")
    assert sentence.startswith("Against b (why), a is higher beyond noise on scene OA +40.0 points")
    assert "the same or within noise on scene AA (1 of 2)" in sentence
