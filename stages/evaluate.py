"""Evaluate one pipeline model on scene classification, VQA, referring and region captions,
plus parameters, FLOPs, latency and memory.

    python stages/evaluate.py student_kd        # models/student_kd -> metrics/student_kd.json

dvc.yaml runs it for every model (foreach). Reads params `eval.*`. Full results (confusion matrix,
per-class and per-size breakdowns, every prediction, skipped bad items) go to reports/eval/<model>/.
A task without evaluation items is named, with the param that gives it a set.
"""

import json
import sys
from pathlib import Path

from geodistill.config import load_section
from geodistill.data.prepare import image_root
from geodistill.eval.run import evaluate_model, input_notes, scalars
from geodistill.eval.tasks import headline

PREPARED = Path("data/prepared")

if __name__ == "__main__":
    name = sys.argv[1]
    details = Path("reports/eval") / name
    cfg = load_section("eval")
    metrics = evaluate_model(
        Path("models") / name, name, cfg, PREPARED, image_root(PREPARED), details, on_error=cfg.on_error
    )
    (details / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    Path("metrics").mkdir(exist_ok=True)
    summary = {"headline": headline(metrics), **scalars(metrics)}
    Path(f"metrics/{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    for line in input_notes(metrics):
        print(f"evaluate {name}: {line}")
    print(json.dumps({"model": name, **summary["headline"]}))
