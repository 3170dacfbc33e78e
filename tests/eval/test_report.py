"""The report stage on fabricated evaluate/dvclive outputs: tables, generated verdicts, figures."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from geodistill.eval.report import write_report
from geodistill.eval.results import MODELS
from geodistill.eval.tasks import EVAL_TASKS, combine, headline, no_set_reason

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Headline accuracies per model; student_kd beats the control clearly on scene OA only.
SCORES = {
    "teacher": {"OA": 0.90, "vqa": 0.70, "g5": 0.40, "r1": 0.50},
    "student_sft": {"OA": 0.60, "vqa": 0.50, "g5": 0.20, "r1": 0.30},
    "student_control": {"OA": 0.62, "vqa": 0.52, "g5": 0.21, "r1": 0.31},
    "student_kd": {"OA": 0.80, "vqa": 0.53, "g5": 0.22, "r1": 0.32},
}
N = 400
PREDICTIONS = ["{<10><10><40><50>|<30>}", "no idea", "{<5><5><30><30>}{<50><50><90><95>|<-20>}"]


def _details(name: str) -> dict:
    s = SCORES[name]
    cell = {
        "n_items": 2,
        "n_gt": 3,
        "n_pred": 3,
        "acc@0.5": s["g5"],
        "acc@0.25": s["g5"] + 0.1,
        "unparsed": 1,
    }
    return {
        "model": name,
        "split": "test",
        # Two scene sets (200 items each) around the model's OA, one set for every other task.
        "scene": combine("scene", {
            name: {"OA": s["OA"] + d, "AA": s["OA"] + d - 0.01, "per_class": {"a": s["OA"]},
                   "confusion": [[1, 0]], "rows": ["a"], "cols": ["a", "<other>"], "n": N // 2, "unparsed": 7}
            for name, d in (("aid", -0.02), ("ucm", 0.02))}),
        "vqa": combine("vqa", {"lr": {"accuracy": {"presence": s["vqa"], "count": s["vqa"] - 0.1},
                "n": {"presence": 200, "count": 200}, "mOA": s["vqa"], "OA": s["vqa"] - 0.05,
                "n_total": N, "empty": 0}}),
        "referring": combine("referring", {"geochat": {"n_items": N, "n_gt": 500, "n_pred": 450,
                      "acc@0.5": s["g5"], "acc@0.25": s["g5"] + 0.1,
                      "unparsed": 11, "by_size": {"small": cell, "large": {**cell, "acc@0.5": 0.333}},
                      "by_objects": {"single": cell, "multi": {**cell, "acc@0.5": 0.125}}}}),
        "region_caption": combine("region_caption", {"geochat": {"n": N, "empty": 0, "rouge1": s["r1"],
                       "rougeL": s["r1"] - 0.02, "meteor": s["r1"] / 2}}),
        "efficiency": {"params": {"total": 7_000_000_000 if name == "teacher" else 3_085_504,
                                  "language_model": 2_885_888}, "flops_per_sample": 839_057_408,
                       "new_tokens": 6, "latency_s": 0.25, "tokens_per_s": 24.0,
                       "peak_memory_mb": 560.0, "device": "cpu"},
    }  # fmt: skip


def _fake_pipeline(root: Path, models=MODELS) -> None:
    """metrics/, reports/eval/<model>/ (metrics, predictions, confusion) and dvclive/ as the stages write."""
    images = root / "data" / "prepared" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(images / f"test{i}.png")
    (root / "metrics").mkdir()
    for k, name in enumerate(models):
        d = _details(name)
        (root / "metrics" / f"{name}.json").write_text(
            json.dumps({"headline": headline(d), "scene": {"OA": 0}})
        )
        ev = root / "reports" / "eval" / name
        ev.mkdir(parents=True)
        (ev / "metrics.json").write_text(json.dumps(d))
        for scene_set in ("aid", "ucm"):
            Image.new("RGB", (20, 20), (k * 50, 0, 0)).save(ev / f"confusion_{scene_set}.png")
        rows = []
        for i in range(3):
            pred = PREDICTIONS[(i + k) % 3]
            rows.append({"task": "referring", "id": f"t{i}", "image": f"data/prepared/images/test{i}.png",
                         "question": f"<image>\n[refer] <p>the ship {i}</p>", "prediction": pred,
                         "reference": "{<10><10><40><50>}",
                         "meta": {"boxes": ["{<10><10><40><50>|<10>}"], "width": 64, "height": 48,
                                  "size": ["small", "large", "small"][i], "multi": False}})  # fmt: skip
        rows.append({"task": "scene", "id": "s0", "image": "x.png", "question": "q", "prediction": "a",
                     "reference": "a", "meta": {}})  # fmt: skip
        (ev / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for run, names in {"teacher": ["loss", "ce"], "student_sft": ["loss"], "student_control": ["loss", "ce"],
                       "student_kd": ["loss", "kl", "align", "pt", "ce", "lr"]}.items():  # fmt: skip
        folder = root / "dvclive" / run / "plots" / "metrics"
        folder.mkdir(parents=True)
        for n in names:
            (folder / f"{n}.tsv").write_text(f"step\t{n}\n" + "".join(f"{s}\t{3.0 / s}\n" for s in (1, 2, 4)))
        (root / "dvclive" / run / "metrics.json").write_text(
            json.dumps({"loss": 0.75, "val_loss": 1.5, "val_token_acc": 0.4321, "step": 4})
        )


def _is_png(path: Path) -> bool:
    with path.open("rb") as f:
        if f.read(8) != PNG_MAGIC:
            return False
    with Image.open(path) as im:
        im.verify()
    return True


def test_full_report(tmp_path):
    _fake_pipeline(tmp_path)
    out = write_report(tmp_path)
    md = out.read_text()
    assert out == tmp_path / "reports" / "report.md"
    for section in ("Scene classification", "VQA", "Referring (boxes)", "Region captions", "Efficiency",
                    "What distillation adds"):  # fmt: skip
        assert f"## {section}" in md
    # Numbers come from the full details, as percentages with one decimal.
    # One column group per set (the paper's layout), then the task's mean over its sets.
    assert "| model | aid n | aid OA | aid AA | aid no class named | ucm n | ucm OA | ucm AA | " in md
    assert "| student_kd | 200 | 78.0 | 77.0 | 7 | 200 | 82.0 | 81.0 | 7 | 80.0 | 79.0 |" in md
    assert "| model | lr n | lr presence | lr count | lr mOA |" in md  # one set: no mean columns
    assert "| teacher | 400 | 70.0 | 60.0 | 70.0 |" in md  # presence, count, mOA
    assert "| student_sft | 400 | 20.0 | 30.0 | 20.0 | 33.3 | 20.0 | 12.5 | 11 |" in md
    assert "| student_control | 400 | 31.0 | 29.0 | 15.5 | 0 |" in md
    assert "7.00 G" in md and "3.09 M" in md and "839.06 M (6 new tok)" in md and "250.0" in md
    assert md.index("| teacher |") < md.index("| student_sft |") < md.index("| student_control |")
    # The generated comparison: +18 points on scene OA is far beyond noise at n=400, the rest is not.
    para = md.split("## What distillation adds")[1].split("## Figures")[0]
    assert "| scene OA | +18.0 ± " in para
    assert "Against student_control" in para and "higher beyond noise on scene OA +18.0 points" in para
    assert "In short: distillation adds measurable quality over equal compute on scene OA and scene AA." in (
        para
    )
    assert "the same or within noise on VQA mOA" in para
    assert "scene 400" in para and "referring 400" in para
    # Teacher gap on scene OA is 30 points; student_kd closes 20/30 of it.
    assert "scene OA 67%" in para
    assert "val token acc" in md and "43.2" in md
    figures = tmp_path / "reports" / "figures"
    confusions = ("confusion_student_kd_aid.png", "confusion_student_kd_ucm.png")
    for name in ("referring.png", "losses.png", *confusions):
        assert _is_png(figures / name), name
        assert f"figures/{name}" in md
    with Image.open(figures / "referring.png") as im:
        assert im.width > 400 and im.height > 300  # 4 model columns, 3 image rows
    assert "Not evaluated" not in md and "warning" not in md
    assert "Sources: teacher: reports/eval/teacher/metrics.json" in md


def test_missing_models_and_summary_fallback(tmp_path):
    _fake_pipeline(tmp_path, ("teacher", "student_sft", "student_kd"))
    # student_kd has only the DVC summary: the tables still fill from it, the figure skips its column.
    d = _details("student_kd")
    (tmp_path / "metrics" / "student_kd.json").write_text(json.dumps({"headline": headline(d), **d}))
    for f in (tmp_path / "reports" / "eval" / "student_kd").iterdir():
        f.unlink()
    md = write_report(tmp_path).read_text()
    assert "Not evaluated, skipped: student_control." in md
    assert "| student_control |" not in md.split("## Figures")[0]  # (its training run is still listed)
    assert "| student_kd | 200 | 78.0 | 77.0 | 7 | 200 | 82.0 | 81.0 | 7 | 80.0 | 79.0 |" in md
    assert "student_control has not been evaluated" in md
    assert "cannot be told apart from the extra training steps" in md
    assert "No confusion matrix of student_kd" in md
    assert "(student_kd: no referring predictions)" in md
    assert "(student_control: no dvclive logs)" not in md  # its logs exist even though it was not evaluated
    assert _is_png(tmp_path / "reports" / "figures" / "referring.png")
    assert not list((tmp_path / "reports" / "figures").glob("confusion_student_kd*.png"))


def test_stale_summary_is_flagged_and_nothing_evaluated_still_writes(tmp_path):
    _fake_pipeline(tmp_path, ("student_kd",))
    (tmp_path / "metrics" / "student_kd.json").write_text(json.dumps({"headline": {"scene_OA": 0.1}}))
    md = write_report(tmp_path).read_text()
    assert "warning:" in md and "scene OA" in md.split("warning:")[1].splitlines()[0]
    assert "student_sft has not been evaluated" in md

    empty = tmp_path / "empty"
    empty.mkdir()
    md = write_report(empty).read_text()
    assert "No model has been evaluated yet" in md and "No training curves" in md
    assert "there is no box figure" in md


def test_tasks_without_items_say_why_and_skips_are_counted(tmp_path):
    """Real training data and no benchmark configured: the report says which task has no set and which
    param gives it one, instead of tables of dashes alone."""
    _fake_pipeline(tmp_path, ("student_kd",))
    d = _details("student_kd")
    split = "data/prepared/test.jsonl"
    d["sets"] = {
        t: {"main": {"source": split, "n": 0, "skipped": 0, "note": no_set_reason(t, split)}}
        for t in EVAL_TASKS
    }
    d["sets"]["scene"] = {"aid": {"source": "AID", "n": 398, "skipped": 2}}
    for task in ("vqa", "referring", "region_caption"):
        del d[task]
    (tmp_path / "metrics" / "student_kd.json").write_text(json.dumps({"headline": headline(d)}))
    (tmp_path / "reports" / "eval" / "student_kd" / "metrics.json").write_text(json.dumps(d))
    md = write_report(tmp_path).read_text()
    notes = md.split("Tasks without evaluation items")[1].split("\n\n")[1]
    assert "vqa: no evaluation items" in notes and "set eval.benchmarks.vqa" in notes
    assert "set eval.benchmarks.referring" in notes and "eval.benchmarks.region_caption" in notes
    assert "scene" not in notes
    assert "| model | scene/aid | vqa/main | referring/main | region_caption/main |" in md
    assert "| student_kd | 398 (2 skipped) | 0 | 0 | 0 |" in md
    assert "| student_kd | – | – | – |" in md  # the region caption table: dashes, explained above
