"""One METEOR JVM (~7 s to start) for every evaluation test that scores captions."""

from __future__ import annotations

import pytest

from geodistill.errors import GeodistillError
from geodistill.eval.meteor import MeteorScorer


@pytest.fixture(scope="session")
def meteor():
    """A running scorer; its teardown checks that close() ends the JVM and that a closed scorer refuses."""
    m = MeteorScorer(timeout_s=600)  # only a guard against a hung JVM: start-up is slow on busy cores
    yield m
    proc = m._m.meteor_p
    m.close()
    assert proc.poll() is not None, "the METEOR JVM outlived close()"
    m.close()  # idempotent
    with pytest.raises(GeodistillError, match="closed"):
        m.score(["a"], [["a"]])
