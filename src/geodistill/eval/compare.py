"""'What distillation adds': student_kd against its control and its baseline, judged against noise.

Every sentence is generated from the numbers (signs, sizes and a noise band from the number of test
items), never written in advance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from geodistill.eval.results import ModelResults
from geodistill.eval.tables import count, join
from geodistill.eval.tasks import HEADLINE
from geodistill.markdown import table

COMPARISONS = (
    ("student_control", "the equal-compute control: same initialisation and extra steps, no teacher"),
    ("student_sft", "the baseline it started from"),
)
"""What student_kd is compared against, and why each comparison matters."""


@dataclass(frozen=True)
class Delta:
    """a - b on one headline metric, in percentage points, with a noise band from the item counts."""

    label: str
    diff: float
    band: float
    n: int | None

    @property
    def verdict(self) -> str:
        if abs(self.diff) < 0.05:
            return "same"
        if self.band and abs(self.diff) <= self.band:
            return "within noise"
        return "higher" if self.diff > 0 else "lower"


def noise_band(a: float, b: float, n_a: int | None, n_b: int | None) -> float:
    """Two standard errors (percentage points) of the difference of two scores in [0, 1] over n items.

    Uses the unpaired bound sqrt(a(1-a)/n_a + b(1-b)/n_b): exact for accuracies of independent models,
    conservative for paired ones (same items, positively correlated errors), and an upper bound for
    ROUGE/METEOR (a variable in [0, 1] with mean m has variance <= m(1-m)). Infinite without counts.
    """
    if not n_a or not n_b:
        return math.inf
    a, b = min(max(a, 0.0), 1.0), min(max(b, 0.0), 1.0)
    return 200 * math.sqrt(a * (1 - a) / n_a + b * (1 - b) / n_b)


def deltas(a: ModelResults, b: ModelResults) -> list[Delta]:
    out = []
    for h in HEADLINE:
        va, vb = h.value(a.metrics), h.value(b.metrics)
        if va is None or vb is None:
            continue
        na, nb = h.n(a.metrics), h.n(b.metrics)
        out.append(Delta(h.label, 100 * (va - vb), noise_band(va, vb, na, nb), na))
    return out


def _signed(d: Delta) -> str:
    band = "n unknown" if math.isinf(d.band) else f"noise ±{d.band:.1f}"
    return f"{d.label} {d.diff:+.1f} points ({band})"


def comparison_sentence(a: str, b: str, ds: Sequence[Delta], why: str) -> str:
    """One generated sentence: where ``a`` beats / trails ``b`` beyond noise, and how many are within."""
    up = [_signed(d) for d in ds if d.verdict == "higher"]
    down = [_signed(d) for d in ds if d.verdict == "lower"]
    flat = [d for d in ds if d.verdict in ("same", "within noise")]
    parts = []
    if up:
        parts.append(f"higher beyond noise on {join(up)}")
    if down:
        parts.append(f"lower beyond noise on {join(down)}")
    if flat:
        names = join([d.label for d in flat])
        parts.append(f"the same or within noise on {names} ({len(flat)} of {len(ds)})")
    return f"Against {b} ({why}), {a} is " + "; ".join(parts) + "."


def teacher_gap_sentence(by: Mapping[str, ModelResults], kd_vs_sft: Mapping[str, Delta]) -> str | None:
    """Where the teacher leads the baseline, and which share of that lead student_kd closes."""
    if "teacher" not in by or "student_sft" not in by:
        return None
    gap = {d.label: d for d in deltas(by["teacher"], by["student_sft"])}
    ahead = [lab for lab, d in gap.items() if d.verdict == "higher"]
    if not ahead:
        return (
            "The teacher is not ahead of student_sft beyond noise on any headline metric, so there is "
            "little it can transfer: distillation should not be expected to beat the control here."
        )
    closed = [f"{lab} {100 * kd_vs_sft[lab].diff / gap[lab].diff:.0f}%" for lab in ahead if lab in kd_vs_sft]
    return f"The teacher leads student_sft beyond noise on {join(ahead)}" + (
        f"; student_kd closes this share of that gap: {join(closed)}." if closed else "."
    )


def verdict_sentence(control: Mapping[str, Delta]) -> str:
    """The one-line conclusion of student_kd against the equal-compute control."""
    up = [lab for lab, d in control.items() if d.verdict == "higher"]
    down = [lab for lab, d in control.items() if d.verdict == "lower"]
    if up and not down:
        verdict = f"distillation adds measurable quality over equal compute on {join(up)}."
    elif down and not up:
        verdict = f"distillation does worse than equal compute on {join(down)}."
    elif up and down:
        verdict = f"mixed: better than equal compute on {join(up)}, worse on {join(down)}."
    else:
        verdict = "no difference between distillation and equal compute is resolvable at these test sizes."
    return "In short: " + verdict


def counts_sentence(kd: ModelResults) -> str | None:
    """Test items per task (the metrics of a task share their items) and how to read the noise band."""
    counts: dict[str, int] = {}
    for h in HEADLINE:
        n = h.n(kd.metrics)
        if n is not None:
            counts.setdefault(h.task, n)
    if not counts:
        return None
    return (
        "Test items per task for student_kd: " + ", ".join(f"{t} {n}" for t, n in counts.items()) + ". The "
        "noise band is two standard errors of an unpaired difference of proportions (conservative for "
        "these paired comparisons, an upper bound for ROUGE/METEOR); differences inside it are not "
        "evidence either way."
    )


def deltas_table(rows: Mapping[str, Mapping[str, Delta]]) -> str | None:
    """student_kd minus each compared model on every headline metric, ± its noise band."""
    trows = []
    for h in HEADLINE:
        cells = [rows[o].get(h.label) for o in rows]
        if all(c is None for c in cells):
            continue
        n = next((c.n for c in cells if c is not None), None)
        trows.append([h.label, *(f"{c.diff:+.1f} ± {c.band:.1f}" if c else "–" for c in cells), count(n)])
    return table(["metric", *(f"student_kd − {o}" for o in rows), "n"], trows) if rows and trows else None


def distillation_paragraph(results: Sequence[ModelResults]) -> str:
    """The generated 'what distillation adds' section (deltas table + sentences)."""
    by = {r.name: r for r in results}
    kd = by.get("student_kd")
    if kd is None:
        return "student_kd has not been evaluated, so there is nothing to compare yet."
    lines: list[str | None] = []
    rows: dict[str, dict[str, Delta]] = {}
    for other, why in COMPARISONS:
        if other not in by:
            lines.append(f"{other} has not been evaluated: no comparison against {why.split(':')[0]}.")
            continue
        ds = deltas(kd, by[other])
        rows[other] = {d.label: d for d in ds}
        if ds:
            lines.append(comparison_sentence("student_kd", other, ds, why))
    if "student_control" not in by and "student_sft" in by:
        lines.append(
            "Without the control, a gain over student_sft cannot be told apart from the extra training "
            "steps alone."
        )
    lines.append(teacher_gap_sentence(by, rows.get("student_sft", {})))
    if rows.get("student_control"):
        lines.append(verdict_sentence(rows["student_control"]))
    lines.append(counts_sentence(kd))
    deltas_md = deltas_table(rows)
    text = " ".join(line for line in lines if line)
    return f"{deltas_md}\n\n{text}" if deltas_md else text
