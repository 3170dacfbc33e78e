"""The report's tables: one row per evaluated model, numbers formatted for reading ('–' when missing)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from geodistill.eval.results import ModelResults, lookup
from geodistill.eval.tasks import EVAL_TASKS
from geodistill.markdown import table


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def pct(x: Any) -> str:
    """A fraction as a percentage with one decimal; '–' when missing."""
    return f"{100 * float(x):.1f}" if _is_number(x) else "–"


def si(x: Any, unit: str = "") -> str:
    """A count with an SI prefix (3085504 -> '3.09 M'); '–' when missing."""
    if not _is_number(x):
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:g} {unit}".strip()


def num(x: Any, fmt: str = ".3g") -> str:
    return format(float(x), fmt) if _is_number(x) else "–"


def count(x: Any) -> str:
    return str(x) if isinstance(x, int) and not isinstance(x, bool) else "–"


def join(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _ordered(keys: Iterable[str], first: Sequence[str]) -> list[str]:
    keys = set(keys)
    return [k for k in first if k in keys] + sorted(keys - set(first))


def scene_table(results: Sequence[ModelResults]) -> str:
    rows = []
    for r in results:
        s = r.metrics.get("scene")
        rows.append([r.name, count(lookup(s, "n")), pct(lookup(s, "OA")), pct(lookup(s, "AA")),
                     count(lookup(s, "unparsed"))])  # fmt: skip
    return table(["model", "n", "OA", "AA", "no class named"], rows)


def vqa_table(results: Sequence[ModelResults]) -> str:
    qtypes = _ordered(
        (t for r in results for t in (lookup(r.metrics, "vqa", "accuracy") or {})),
        ("presence", "comparison", "rural_urban", "count"),
    )
    rows = []
    for r in results:
        v = r.metrics.get("vqa")
        acc = lookup(v, "accuracy") or {}
        rows.append([r.name, count(lookup(v, "n_total")), *(pct(acc.get(t)) for t in qtypes),
                     pct(lookup(v, "mOA")), pct(lookup(v, "OA"))])  # fmt: skip
    return table(["model", "n", *qtypes, "mOA", "OA"], rows)


def _groups(results: Sequence[ModelResults], by: str, first: Sequence[str] = ()) -> list[str]:
    return _ordered((k for r in results for k in (lookup(r.metrics, "referring", by) or {})), first)


def referring_table(results: Sequence[ModelResults]) -> str:
    sizes = _groups(results, "by_size", ("small", "medium", "large"))
    objects = _groups(results, "by_objects", ("single", "multi"))
    kinds = _groups(results, "by_type")
    rows = []
    for r in results:
        g = r.metrics.get("referring")
        row = [r.name, count(lookup(g, "n_items")), pct(lookup(g, "acc@0.5")), pct(lookup(g, "acc@0.25"))]
        row += [pct(lookup(g, "by_size", k, "acc@0.5")) for k in sizes]
        row += [pct(lookup(g, "by_objects", k, "acc@0.5")) for k in objects]
        row += [pct(lookup(g, "by_type", k, "acc@0.5")) for k in kinds]
        row.append(count(lookup(g, "unparsed")))
        rows.append(row)
    return table(["model", "n", "acc@0.5", "acc@0.25", *sizes, *objects, *kinds, "no box"], rows)


def region_caption_table(results: Sequence[ModelResults]) -> str:
    rows = []
    for r in results:
        c = r.metrics.get("region_caption")
        rows.append([r.name, count(lookup(c, "n")), pct(lookup(c, "rouge1")), pct(lookup(c, "rougeL")),
                     pct(lookup(c, "meteor")), count(lookup(c, "empty"))])  # fmt: skip
    return table(["model", "n", "ROUGE-1", "ROUGE-L", "METEOR", "empty"], rows)


def efficiency_table(results: Sequence[ModelResults]) -> str:
    rows = []
    for r in results:
        e = r.metrics.get("efficiency")
        flops = si(lookup(e, "flops_per_sample"))
        new = lookup(e, "new_tokens")
        if flops != "–" and isinstance(new, int):
            flops += f" ({new} new tok)"  # FLOPs grow with the answer length: say which length
        latency = lookup(e, "latency_s")
        rows.append([
            r.name, si(lookup(e, "params", "total")), si(lookup(e, "params", "language_model")), flops,
            num(latency * 1000, ".1f") if _is_number(latency) else "–",
            num(lookup(e, "tokens_per_s"), ".1f"), num(lookup(e, "peak_memory_mb"), ".0f"),
            str(lookup(e, "device") or "–"),
        ])  # fmt: skip
    return table(
        ["model", "params (total)", "params (LLM)", "FLOPs / sample", "latency (ms)", "tokens/s",
         "peak memory (MB)", "device"],
        rows,
    )  # fmt: skip


def sets_table(results: Sequence[ModelResults]) -> str | None:
    """Items evaluated per task and model, skipped bad items in brackets; None without that record."""
    rows = []
    for r in results:
        sets = r.metrics.get("sets")
        if not isinstance(sets, Mapping):
            continue
        cells = []
        for t in EVAL_TASKS:
            n, skipped = lookup(sets, t, "n"), lookup(sets, t, "skipped")
            cells.append(count(n) + (f" ({skipped} skipped)" if isinstance(skipped, int) and skipped else ""))
        rows.append([r.name, *cells])
    return table(["model", *EVAL_TASKS], rows) if rows else None


def training_table(final: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Final logged values of each training run (dvclive/<model>/metrics.json); None without any."""
    rows = [[m, count(v.get("step")), num(v.get("loss"), ".4g"), num(v.get("val_loss"), ".4g"),
             pct(v.get("val_token_acc"))] for m, v in final.items()]  # fmt: skip
    return table(["model", "steps", "last loss", "val loss", "val token acc"], rows) if rows else None
