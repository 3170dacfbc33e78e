"""METEOR's JVM: synonyms on, text that would desynchronise its pipe, no Java, a stuck JVM."""

from __future__ import annotations

import pytest

from geodistill.errors import GeodistillError
from geodistill.eval import meteor as meteor_mod
from geodistill.eval.meteor import MeteorScorer


def test_meteor_scores_synonyms_above_unrelated_words(meteor):
    _, (syn, other) = meteor.score(["a large building", "a purple building"], [["a big building"]] * 2)
    assert syn > other + 0.3
    _, (car, fruit) = meteor.score(
        ["a red automobile parked on the road", "a red banana parked on the road"],
        [["a red car parked on the road"]] * 2,
    )
    assert car > fruit + 0.3


def test_meteor_survives_empty_newlines_and_separators(meteor):
    preds = ["", "a car\non the ||| road", "  \t ", "a car on the road"]
    refs = [["a car"], ["a car on the road"], ["a house"], ["a car on the road\n", "an automobile"]]
    corpus, per = meteor.score(preds, refs)
    assert per[0] == 0.0 and per[2] == 0.0 and per[1] > 0.9 and per[3] > 0.9
    assert 0.0 <= corpus <= 1.0
    assert meteor.score([], []) == (0.0, [])
    with pytest.raises(ValueError, match="reference lists"):
        meteor.score(["a"], [])


def test_meteor_without_java_names_what_to_install(monkeypatch):
    monkeypatch.setattr(meteor_mod.shutil, "which", lambda _: None)
    with pytest.raises(GeodistillError, match="Java runtime"):
        MeteorScorer()


def test_meteor_stuck_jvm_is_stopped_not_waited_for():
    # Start-up alone takes seconds, so a 0.3 s budget must end in a clear error, not a hang.
    with pytest.raises(GeodistillError, match="did not answer within"):
        MeteorScorer(timeout_s=0.3)
