"""The teacher's edge over the baseline student on every task and set of the benchmark (validation split).

    python -m geodistill.bench.edge [--teacher-steps 200] [--sft-steps 150] [--train-images 600]
                                    [--val-images 100] [--set key=value ...] [--out reports/edge.json]

Run it in a clone of the repository (it runs `dvc exp run`, which leaves the experiment's results in the
workspace; commit or stash your own work first). It trains the teacher and the baseline (student_sft) with
the shortened settings given, evaluates both on the **validation** split (never test: this is a design
check of the benchmark, made before any number is reported) and prints, per task (mean over its sets)
and per set, teacher - student_sft with the report's noise band (two standard errors,
:func:`geodistill.eval.compare.noise_band`). A task the teacher does not win beyond that band is a
benchmark to fix (issue 10). Time: the shortened default is 1/5 of the pipeline's teacher and 1/2 of its
baseline training, plus two evaluations of the validation sets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geodistill.eval.compare import noise_band
from geodistill.eval.tasks import HEADLINE, set_metrics
from geodistill.markdown import table

MODELS = ("teacher", "student_sft")


def edge_rows(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> list[list[str]]:
    """One row per headline metric, task mean first, then each set: values, difference and noise band."""
    rows = []
    for h in HEADLINE:
        scopes = [("mean", teacher.get(h.task), student.get(h.task))]
        t_sets, s_sets = set_metrics(teacher, h.task), set_metrics(student, h.task)
        scopes += [(name, t_sets[name], s_sets.get(name)) for name in t_sets]
        for scope, ts, ss in scopes:
            if not isinstance(ts, Mapping) or not isinstance(ss, Mapping):
                continue
            a, b = ts.get(h.metric), ss.get(h.metric)
            if not isinstance(a, float | int) or not isinstance(b, float | int):
                continue
            band = noise_band(a, b, ts.get(h.n_key), ss.get(h.n_key))
            diff = 100 * (a - b)
            verdict = "teacher ahead" if diff > band else "behind" if diff < -band else "within noise"
            rows.append([h.label, scope, f"{100 * a:.1f}", f"{100 * b:.1f}", f"{diff:+.1f} ± {band:.1f}",
                         str(ts.get(h.n_key)), verdict])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-steps", type=int, default=200)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--train-images", type=int, default=600)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--set", action="append", default=[], help="extra -S overrides (dvc exp run)")
    ap.add_argument("--out", default="reports/edge.json")
    args = ap.parse_args(argv)
    overrides = [
        f"teacher.train.steps={args.teacher_steps}",
        f"sft.train.steps={args.sft_steps}",
        f"data.synthetic.train_images={args.train_images}",
        f"data.synthetic.val_images={args.val_images}",
        "eval.split=val",
        *args.set,
    ]
    cmd = [sys.executable, "-m", "dvc", "exp", "run", *(f"evaluate@{m}" for m in MODELS)]
    for o in overrides:
        cmd += ["-S", o]
    subprocess.run(cmd, check=True)
    metrics = {m: json.loads(Path(f"reports/eval/{m}/metrics.json").read_text()) for m in MODELS}
    rows = edge_rows(metrics["teacher"], metrics["student_sft"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"overrides": overrides, "rows": rows}, indent=2) + "\n")
    print(f"settings: {' '.join(overrides)}")
    print(table(["metric", "set", "teacher", "student_sft", "difference ± 2 SE", "n", "verdict"], rows))


if __name__ == "__main__":
    main()
