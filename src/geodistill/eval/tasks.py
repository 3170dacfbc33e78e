"""The four evaluation tasks: their names, their headline metrics and where a real set is configured.

One vocabulary from records to report: an evaluation task is named as the records name it
(``scene``, ``vqa``, ``referring``, ``region_caption``), and so are its section in ``metrics/<model>.json``
and the prefix of its headline keys (``referring_acc@0.5``, ``region_caption_meteor``).

A task is evaluated on one or more sets (AID and UCMerced for scene, as in the paper's tables), each
named: a task's section holds every set's metrics under ``sets`` and, for each headline metric, the
mean over its sets (the task's headline) with the items summed. Per set, the flat headline adds
``<task>/<set>_<metric>`` (``scene/aid_OA``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EVAL_TASKS = ("scene", "vqa", "referring", "region_caption")
"""Evaluated in this order; each is a record task (``data.records.TASKS``) and a metrics section."""

BENCHMARK_PARAMS = {task: f"eval.benchmarks.{task}" for task in EVAL_TASKS}
"""The params that point each task at a real benchmark instead of the prepared split."""


def no_set_reason(task: str, split_file: str) -> str:
    """Why ``task`` has nothing to evaluate, and the param that gives it a set."""
    return (
        f"{task}: no evaluation items ({split_file} holds none of this task, as with real training data, "
        f"and no benchmark is configured); set {BENCHMARK_PARAMS[task]}"
    )


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class Headline:
    """One headline metric of the paper: ``metrics[task][metric]``, over ``metrics[task][n_key]`` items."""

    task: str
    metric: str
    label: str
    """How tables and sentences name it."""
    n_key: str

    @property
    def key(self) -> str:
        """Its name in the flat headline of ``metrics/<model>.json`` (what `dvc metrics` shows)."""
        return f"{self.task}_{self.metric}"

    def value(self, metrics: Mapping[str, Any]) -> float | None:
        section = metrics.get(self.task)
        return _number(section.get(self.metric)) if isinstance(section, Mapping) else None

    def n(self, metrics: Mapping[str, Any]) -> int | None:
        section = metrics.get(self.task)
        v = section.get(self.n_key) if isinstance(section, Mapping) else None
        return v if isinstance(v, int) and not isinstance(v, bool) else None


HEADLINE = (
    Headline("scene", "OA", "scene OA", "n"),
    Headline("scene", "AA", "scene AA", "n"),
    Headline("vqa", "mOA", "VQA mOA", "n_total"),
    Headline("referring", "acc@0.5", "referring acc@0.5", "n_items"),
    Headline("referring", "acc@0.25", "referring acc@0.25", "n_items"),
    Headline("region_caption", "rouge1", "region caption ROUGE-1", "n"),
    Headline("region_caption", "rougeL", "region caption ROUGE-L", "n"),
    Headline("region_caption", "meteor", "region caption METEOR", "n"),
)
"""The paper's headline numbers, in table order: evaluate, report and geodistill.exps all read this."""

PRIMARY = tuple(h for i, h in enumerate(HEADLINE) if all(g.task != h.task for g in HEADLINE[:i]))
"""Each task's first headline metric, the one a task is judged by (sweep score, seeds verdict, ablations)."""


def set_metrics(metrics: Mapping[str, Any], task: str) -> dict[str, Mapping[str, Any]]:
    """Each set's metrics of ``task`` (set name -> section), in evaluation order; empty when none."""
    section = metrics.get(task)
    sets = section.get("sets") if isinstance(section, Mapping) else None
    return {k: v for k, v in sets.items() if isinstance(v, Mapping)} if isinstance(sets, Mapping) else {}


def combine(task: str, per_set: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A task's section from its sets' metrics: ``sets``, each headline metric's mean over the sets that
    have it (None when none does) and the items summed under the metric's ``n_key``."""
    out: dict[str, Any] = {"sets": dict(per_set)}
    for h in HEADLINE:
        if h.task != task:
            continue
        values = [v for s in per_set.values() if (v := _number(s.get(h.metric))) is not None]
        out[h.metric] = sum(values) / len(values) if values else None
        out[h.n_key] = sum(n for s in per_set.values() if isinstance(n := s.get(h.n_key), int))
    return out


def headline(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one model's metrics, flat (for `dvc metrics` and the report): each task's
    mean over its sets (``scene_OA``), then every set's own (``scene/aid_OA``)."""
    out = {h.key: h.value(metrics) for h in HEADLINE}
    for h in HEADLINE:
        for name, section in set_metrics(metrics, h.task).items():
            out[f"{h.task}/{name}_{h.metric}"] = _number(section.get(h.metric))
    return out
