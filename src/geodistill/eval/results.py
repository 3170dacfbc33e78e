"""What the report reads: each model's evaluation, its predictions and its training logs.

Paths relative to ``root``, the repository root::

    metrics/<model>.json                      evaluate's summary (headline + scalars; what DVC tracks)
    reports/eval/<model>/metrics.json         evaluate's full details (preferred when present)
    reports/eval/<model>/predictions.jsonl    every prediction (the referring ones feed the box figure)
    dvclive/<model>/plots/metrics/*.tsv       training curves; dvclive/<model>/metrics.json final values

A training run's logs are named by the model it trains (dvclive/student_kd is the distilled student's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geodistill.errors import DataError
from geodistill.eval.tasks import HEADLINE

MODELS = ("teacher", "student_sft", "student_control", "student_kd")
"""Reported models, in table order (the pipeline's ``evaluate`` foreach and its training runs)."""

Curve = tuple[list[float], list[float]]
"""(steps, values) of one logged metric."""


def lookup(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` or None when any level is missing."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-run the stage that writes it") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class ModelResults:
    """The evaluation of one model as the report reads it."""

    name: str
    metrics: Mapping[str, Any]
    """Full details when present, else the DVC summary (scalars only: enough for every table)."""
    source: str
    """Which file ``metrics`` came from (for the report's sources list)."""
    eval_dir: Path
    """reports/eval/<model>: predictions.jsonl and confusion_<set>.png (any may be missing)."""
    warnings: tuple[str, ...] = ()


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _stale(
    name: str, summary: Mapping[str, Any], details: Mapping[str, Any], files: tuple[str, str]
) -> list[str]:
    """A warning when summary and details (written by one evaluate run) disagree on a headline number."""
    stale = [h.label for h in HEADLINE if not _close(lookup(summary, "headline", h.key), h.value(details))]
    if not stale:
        return []
    return [
        f"{files[0]} and {files[1]} disagree on {', '.join(stale)}: one is stale; "
        f"re-run `dvc repro evaluate@{name}`"
    ]


def load_results(root: Path, models: Sequence[str] = MODELS) -> tuple[list[ModelResults], list[str]]:
    """The evaluated models (in ``models`` order) and the names of those with no metrics at all."""
    found, missing = [], []
    for name in models:
        summary_file = root / "metrics" / f"{name}.json"
        eval_dir = root / "reports" / "eval" / name
        details_file = eval_dir / "metrics.json"
        summary = read_json(summary_file) if summary_file.is_file() else None
        details = read_json(details_file) if details_file.is_file() else None
        if details is not None:
            files = (str(summary_file.relative_to(root)), str(details_file.relative_to(root)))
            warnings = _stale(name, summary, details, files) if summary is not None else []
            found.append(ModelResults(name, details, files[1], eval_dir, tuple(warnings)))
        elif summary is not None:
            found.append(ModelResults(name, summary, str(summary_file.relative_to(root)), eval_dir))
        else:
            missing.append(name)
    return found, missing


def read_predictions(path: Path, task: str) -> list[dict[str, Any]]:
    """The rows of one task in a predictions.jsonl (empty when the file is missing)."""
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e}); re-run the evaluate stage") from e
            if row.get("task") == task:
                rows.append(row)
    return rows


def read_tsv(path: Path) -> Curve:
    """(steps, values) of a dvclive plots/metrics TSV (columns ``[timestamp] step <name>``)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        return [], []
    header = lines[0].split("\t")
    if "step" not in header or len(header) < 2:
        raise DataError(f"{path}: expected a dvclive TSV with a 'step' column, got header {header}")
    xi = header.index("step")
    yi = header.index(path.stem) if path.stem in header else len(header) - 1
    xs, ys = [], []
    for n, line in enumerate(lines[1:], 2):
        cells = line.split("\t")
        try:
            xs.append(float(cells[xi]))
            ys.append(float(cells[yi]))
        except (IndexError, ValueError) as e:
            raise DataError(f"{path}, line {n}: not a number row ({line!r})") from e
    return xs, ys


def training_curves(
    root: Path, models: Sequence[str] = MODELS
) -> tuple[dict[str, dict[str, Curve]], list[str]]:
    """Every logged curve per model (dvclive/<model>/plots/metrics/<name>.tsv), and the models with none."""
    curves: dict[str, dict[str, Curve]] = {}
    missing = []
    for model in models:
        folder = root / "dvclive" / model / "plots" / "metrics"
        if folder.is_dir():
            curves[model] = {f.stem: read_tsv(f) for f in sorted(folder.glob("*.tsv"))}
        else:
            missing.append(model)
    return curves, missing


def final_training_values(root: Path, models: Sequence[str] = MODELS) -> dict[str, dict[str, Any]]:
    """The last logged values of each model's training run (dvclive/<model>/metrics.json)."""
    return {
        m: read_json(root / "dvclive" / m / "metrics.json")
        for m in models
        if (root / "dvclive" / m / "metrics.json").is_file()
    }
