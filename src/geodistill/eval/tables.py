"""The report's tables: one row per evaluated model, one column group per evaluation set (the paper's
Tables 3-7), numbers formatted for reading ('–' when missing)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from geodistill.eval.results import ModelResults, lookup
from geodistill.eval.tasks import EVAL_TASKS, set_metrics
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


def set_names(results: Sequence[ModelResults], task: str) -> list[str]:
    """The sets of ``task`` any model was evaluated on, in evaluation order (one column group each)."""
    return list(dict.fromkeys(n for r in results for n in set_metrics(r.metrics, task)))


Column = tuple[str, Callable[[Any], str]]
"""A table column: its header and how a cell is read from one set's metrics."""


def per_set_table(results: Sequence[ModelResults], task: str, columns: Callable[[str], Sequence[Column]],
                  means: Sequence[Column]) -> str:  # fmt: skip
    """One row per model, one column group per set (the paper's Tables 3-7 layout), then the task's mean
    over sets when there is more than one. ``columns(set name)`` gives a set's columns, ``means`` read
    the task section."""
    names = set_names(results, task)
    groups = [(n, columns(n)) for n in names]
    with_means = len(names) != 1  # no set at all: the means' columns, dashes (the intro says why)
    header = ["model"] + [f"{n} {label}" for n, cols in groups for label, _ in cols]
    header += [f"mean {label}" for label, _ in means] if with_means else []
    rows = []
    for r in results:
        sets = set_metrics(r.metrics, task)
        row = [r.name] + [read(sets.get(n)) for n, cols in groups for _, read in cols]
        row += [read(r.metrics.get(task)) for _, read in means] if with_means else []
        rows.append(row)
    return table(header, rows)


def _pct(*keys: str) -> Callable[[Any], str]:
    return lambda m: pct(lookup(m, *keys))


def _count(*keys: str) -> Callable[[Any], str]:
    return lambda m: count(lookup(m, *keys))


def scene_table(results: Sequence[ModelResults]) -> str:
    cols = [("n", _count("n")), ("OA", _pct("OA")), ("AA", _pct("AA")),
            ("no class named", _count("unparsed"))]  # fmt: skip
    return per_set_table(results, "scene", lambda _: cols, [("OA", _pct("OA")), ("AA", _pct("AA"))])


def vqa_table(results: Sequence[ModelResults]) -> str:
    def columns(name: str) -> list[Column]:
        qtypes = _ordered(
            (t for r in results for t in (lookup(set_metrics(r.metrics, "vqa"), name, "accuracy") or {})),
            ("presence", "comparison", "rural_urban", "count"),
        )
        return [("n", _count("n_total")), *((t, _pct("accuracy", t)) for t in qtypes), ("mOA", _pct("mOA"))]

    return per_set_table(results, "vqa", columns, [("mOA", _pct("mOA"))])


def _groups(results: Sequence[ModelResults], name: str, by: str, first: Sequence[str] = ()) -> list[str]:
    keys = (k for r in results for k in (lookup(set_metrics(r.metrics, "referring"), name, by) or {}))
    return _ordered(keys, first)


def referring_table(results: Sequence[ModelResults]) -> str:
    def columns(name: str) -> list[Column]:
        cols = [("n", _count("n_items")), ("acc@0.5", _pct("acc@0.5")), ("acc@0.25", _pct("acc@0.25"))]
        for by, first in (("by_size", ("small", "medium", "large")), ("by_objects", ("single", "multi")),
                          ("by_type", ())):  # fmt: skip
            cols += [(k, _pct(by, k, "acc@0.5")) for k in _groups(results, name, by, first)]
        return [*cols, ("no box", _count("unparsed"))]

    means = [("acc@0.5", _pct("acc@0.5")), ("acc@0.25", _pct("acc@0.25"))]
    return per_set_table(results, "referring", columns, means)


def region_caption_table(results: Sequence[ModelResults]) -> str:
    metrics = [("ROUGE-1", _pct("rouge1")), ("ROUGE-L", _pct("rougeL")), ("METEOR", _pct("meteor"))]
    cols = [("n", _count("n")), *metrics, ("empty", _count("empty"))]
    return per_set_table(results, "region_caption", lambda _: cols, metrics)


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
    """Items evaluated per set and model, skipped bad items in brackets; None without that record."""
    columns = list(dict.fromkeys(
        (t, n) for r in results for t in EVAL_TASKS for n in (lookup(r.metrics, "sets", t) or {})
    ))  # fmt: skip
    rows = []
    for r in results:
        sets = r.metrics.get("sets")
        if not isinstance(sets, Mapping):
            continue
        cells = []
        for t, n in columns:
            items, skipped = lookup(sets, t, n, "n"), lookup(sets, t, n, "skipped")
            extra = f" ({skipped} skipped)" if isinstance(skipped, int) and skipped else ""
            cells.append(count(items) + extra)
        rows.append([r.name, *cells])
    return table(["model", *(f"{t}/{n}" for t, n in columns)], rows) if rows else None


def training_table(final: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Final logged values of each training run (dvclive/<model>/metrics.json); None without any."""
    rows = [[m, count(v.get("step")), num(v.get("loss"), ".4g"), num(v.get("val_loss"), ".4g"),
             pct(v.get("val_token_acc"))] for m, v in final.items()]  # fmt: skip
    return table(["model", "steps", "last loss", "val loss", "val token acc"], rows) if rows else None
