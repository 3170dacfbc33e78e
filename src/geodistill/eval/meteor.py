"""METEOR 1.5 through pycocoevalcap's Java implementation: one JVM, a watchdog and a stderr drain.

METEOR (exact, stem, WordNet-synonym and paraphrase matching) exists as a Java jar; pycocoevalcap pipes
captions to it line by line. This module owns that process: it starts it once, checks that synonym
matching is on, stops a JVM that hangs, keeps its stderr to explain a crash and always ends it.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geodistill.errors import GeodistillError

_WS_RE = re.compile(r"\s+")


def _meteor_clean(s: str) -> str:
    """One line the METEOR jar can read: it splits on '|||' and reads line by line, so a newline (or any
    Unicode line break) or a '|||' in the text desynchronises the pipe and the wrapper hangs."""
    return _WS_RE.sub(" ", s.replace("|||", " ")).strip()


def _meteor_paths() -> tuple[Path, Path]:
    try:
        from pycocoevalcap.meteor import meteor as mod
    except ImportError as e:  # pragma: no cover - pycocoevalcap is a dependency
        raise GeodistillError("METEOR needs pycocoevalcap: pip install 'pycocoevalcap>=1.2'") from e
    here = Path(mod.__file__).parent
    return here / mod.METEOR_JAR, here / "data" / "paraphrase-en.gz"


def _drain(stream: Any, tail: list[bytes]) -> None:
    for line in iter(stream.readline, b""):
        tail.append(line)
        del tail[:-20]


class MeteorScorer:
    """METEOR 1.5 (exact, stem, WordNet-synonym and paraphrase matching) in one JVM, via pycocoevalcap.

    Starting costs ~7 s (the paraphrase table loads); scoring is then fast. Use as a context manager or
    call :meth:`close`. At start a synonym probe ("large" vs "big") must outscore an unrelated word, so a
    METEOR without its synonym module is never used silently.
    """

    def __init__(self, timeout_s: float = 900.0) -> None:
        jar, para = _meteor_paths()
        if shutil.which("java") is None:
            raise GeodistillError(
                "METEOR needs a Java runtime (>= 8) on PATH and none was found; install one, e.g. "
                "`apt-get install openjdk-17-jre-headless` (Debian/Ubuntu) or `conda install openjdk`"
            )
        for f in (jar, para):
            if not f.is_file():
                raise GeodistillError(
                    f"METEOR file {f} is missing; reinstall pycocoevalcap "
                    "(`pip install --force-reinstall 'pycocoevalcap>=1.2'`)"
                )
        from pycocoevalcap.meteor.meteor import Meteor

        self.timeout_s = timeout_s
        self._stderr: list[bytes] = []
        self._closed = False
        self._m = Meteor()  # starts `java -jar meteor-1.5.jar - - -stdio -l en -norm`
        # The wrapper never reads stderr: drain it so a chatty JVM cannot block on a full pipe, and keep
        # the tail to explain a crash. The thread holds only the pipe and the list, not self, so a
        # forgotten scorer can still be collected (and closed by __del__).
        threading.Thread(target=_drain, args=(self._m.meteor_p.stderr, self._stderr), daemon=True).start()
        probe, _ = self._score_raw(["a large house", "a purple house"], [["a big house"], ["a big house"]])
        s_syn, s_other = probe
        if not s_syn > s_other + 0.1:
            self.close()
            raise GeodistillError(
                f"METEOR synonym matching is not active (probe 'large' vs 'big' scored {s_syn:.3f}, "
                f"unrelated {s_other:.3f}); check the pycocoevalcap installation"
            )

    def _kill(self) -> None:
        self._timed_out = True
        self._m.meteor_p.kill()

    def _score_raw(self, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[list[float], float]:
        if self._closed:
            raise GeodistillError("this MeteorScorer is closed")
        res = {i: [_meteor_clean(p)] for i, p in enumerate(preds)}
        gts = {i: [_meteor_clean(r) for r in rs] for i, rs in enumerate(refs)}
        # A stuck JVM would block readline() forever: kill it after the timeout, which ends the read.
        self._timed_out = False
        watchdog = threading.Timer(self.timeout_s, self._kill)
        watchdog.start()
        try:
            corpus, scores = self._m.compute_score(gts, res)
        except (ValueError, OSError) as e:
            self.close()
            tail = b"".join(self._stderr).decode(errors="replace").strip()
            why = (
                f"did not answer within timeout_s={self.timeout_s:g} s (the first call includes ~7 s of "
                "start-up) and was stopped"
                if self._timed_out
                else f"stopped answering ({type(e).__name__}: {e})"
            )
            raise GeodistillError(f"the METEOR JVM {why}" + (f"; its stderr: {tail}" if tail else "")) from e
        finally:
            watchdog.cancel()
        scores = [float(s) for s in scores]
        bad = [s for s in [*scores, corpus] if not (math.isfinite(s) and -1e-9 <= s <= 1 + 1e-9)]
        if len(scores) != len(preds) or bad:
            self.close()
            raise GeodistillError(
                f"METEOR returned {len(scores)} scores for {len(preds)} captions, out of range: {bad[:5]}"
            )
        return scores, float(corpus)

    def score(self, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """(corpus METEOR, per-caption METEOR); each prediction against all of its references."""
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} captions but {len(refs)} reference lists")
        if not preds:
            return 0.0, []
        scores, corpus = self._score_raw(preds, refs)
        return corpus, scores

    def close(self) -> None:
        """End the JVM (closing its stdin ends its read loop) and wait for it; idempotent."""
        if self._closed:
            return
        self._closed = True
        p = self._m.meteor_p
        with contextlib.suppress(OSError):  # a broken pipe: the process is already gone
            p.stdin.close()
        try:
            p.wait(timeout=10)
        except Exception:  # TimeoutExpired: it ignores EOF, so stop it
            p.kill()
            p.wait()
        # The wrapper's compute_score() leaves its lock held when it raises; its __del__ would then
        # block forever on that lock at garbage collection.
        if self._m.lock.locked():
            self._m.lock.release()

    def __del__(self) -> None:
        if hasattr(self, "_m"):
            self.close()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
