"""The ``prepare`` stage: normalised JSONL splits + images + a validation report.

Output folder layout::

    train.jsonl val.jsonl test.jsonl   records grouped by image (what ``shard`` needs)
    val_eval.jsonl                     the four evaluation tasks on the validation images (for tuning)
    pretrain.jsonl                     the text-only corpus D_PT ({"id", "text"} per line)
    images/                            synthetic images (real data stays where it is: see report)
    report.json                        counts per split/task, skipped records with reasons, image_root
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from geodistill.config import DataConfig
from geodistill.data import synthetic
from geodistill.data.records import IMAGE_PLACEHOLDER, ImageChecks, Record, parse_record
from geodistill.data.template import SYSTEM
from geodistill.errors import DataError

SPLITS = ("train", "val", "test")
REPORT = "report.json"


def _write_jsonl(path: Path, records: Iterable[Record]) -> Counter:
    tasks: Counter = Counter()
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")
            tasks[r.task] += 1
    return tasks


def prepare_synthetic(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """The generator's splits. Training and validation images carry every instruction type (on a plain
    or low_res rendering); each validation and test scene also gets one rendering per evaluation set
    (``<id>_aid``, ``_ucm``, ``_lr``, ``_hr``) holding that set's items (``synthetic.EVAL_SETS``)."""
    s = cfg.synthetic
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    sizes = {"train": s.train_images, "val": s.val_images, "test": s.test_images}
    for split in SPLITS:
        recs: list[Record] = []
        evals: list[Record] = []
        rng = np.random.default_rng([s.seed, SPLITS.index(split)])
        for i in range(sizes[split]):
            image_id = f"{split}{i:06d}"
            # Test scenes hold only the evaluation sets; validation scenes get both kinds, so held-out
            # losses and task metrics can be tuned on them without touching the test split.
            if split != "test":
                rendering = synthetic.train_rendering(image_id, s.seed)
                scene = synthetic.make_scene(image_id, s.seed, s.image_size, s.grid, rendering=rendering)
                (images / f"{image_id}.png").write_bytes(scene.image_png)
                recs.extend(synthetic.train_records(scene, s.grid, rng))
            if split != "train":
                for view, view_recs in synthetic.eval_scenes(image_id, s.seed, s.image_size, s.grid, rng):
                    (images / f"{view.image_id}.png").write_bytes(view.image_png)
                    evals.extend(view_recs)
        if split == "test":
            counts[split] = dict(_write_jsonl(out / "test.jsonl", evals))
        else:
            counts[split] = dict(_write_jsonl(out / f"{split}.jsonl", recs))
        if split == "val":
            counts["val_eval"] = dict(_write_jsonl(out / "val_eval.jsonl", evals))
    synthetic.write_pretrain(out / "pretrain.jsonl", s.seed, s.pretrain_texts)
    return {"source": "synthetic", "image_root": ".", "records": counts, "skipped": 0, "skips": []}


def load_geochat(
    json_path: Path, image_dir: Path, on_error: str
) -> tuple[list[Record], list[dict[str, str]]]:
    """Validate a GeoChat_Instruct-style JSON list; returns (records, skips) or raises DataError.

    Each record's image must lie inside ``image_dir`` (no absolute path, ``..`` or symlink out) and
    decode whole (a truncated file fails here, not in the middle of sharding or training).
    """
    try:
        raw = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    except OSError as e:
        raise DataError(f"{json_path}: cannot read ({e}); set data.geochat.train_json") from e
    if not isinstance(raw, list):
        raise DataError(f"{json_path}: expected a JSON list of records, got {type(raw).__name__}")
    records, skips = [], []
    images = ImageChecks(image_dir)
    for i, obj in enumerate(raw):
        try:
            rec = parse_record(obj, source=str(json_path), index=i, require_task=False)
            why = images.problem(rec.image)
            if why is not None:
                raise DataError(f"{json_path}: record {rec.id!r}, field 'image': {why}")
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"{e}\n(set data.on_error: skip to skip and count bad records)") from None
            rid = obj.get("id") if isinstance(obj, dict) else None
            skips.append({"record": str(rid if rid is not None else f"#{i}"), "reason": str(e)})
            continue
        records.append(rec)
    return records, skips


def _is_val(image_id: str, fraction: float) -> bool:
    h = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def prepare_geochat(cfg: DataConfig, out: Path) -> dict[str, Any]:
    g = cfg.geochat
    image_dir = Path(g.image_dir).resolve()
    records, skips = load_geochat(Path(g.train_json), image_dir, cfg.on_error)
    if not records:
        raise DataError(f"{g.train_json}: no valid records ({len(skips)} skipped); see {out / REPORT}")
    records.sort(key=lambda r: (r.image_id, r.id))  # group by image for sharding, deterministically
    counts = {
        "train": dict(
            _write_jsonl(out / "train.jsonl", (r for r in records if not _is_val(r.image_id, g.val_fraction)))
        ),
        "val": dict(
            _write_jsonl(out / "val.jsonl", (r for r in records if _is_val(r.image_id, g.val_fraction)))
        ),
        "test": dict(_write_jsonl(out / "test.jsonl", [])),
        "val_eval": dict(_write_jsonl(out / "val_eval.jsonl", [])),
    }
    n_pt = 0
    with (out / "pretrain.jsonl").open("w") as f, Path(g.pretrain_jsonl or "/dev/null").open() as src:
        if g.pretrain_jsonl:
            for lineno, line in enumerate(src, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(
                        f"{g.pretrain_jsonl}: line {lineno}, field 'text': missing or invalid ({e})"
                    ) from e
                f.write(json.dumps({"id": f"pt-{n_pt}", "text": text}) + "\n")
                n_pt += 1
    return {
        "source": str(g.train_json),
        "image_root": str(image_dir),
        "records": counts,
        "skipped": len(skips),
        "skips": skips,
    }


def prepare(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """Run the stage; returns (and writes) the validation report."""
    out.mkdir(parents=True, exist_ok=True)
    report = prepare_synthetic(cfg, out) if cfg.source == "synthetic" else prepare_geochat(cfg, out)
    report["on_error"] = cfg.on_error
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def image_root(prepared: Path) -> Path:
    """Where the prepared records' image paths are relative to."""
    report = json.loads((prepared / REPORT).read_text())
    root = Path(report["image_root"])
    return root if root.is_absolute() else prepared / root


def tokenizer_corpus(prepared: Path, template_repeats: int = 100) -> Iterator[str]:
    """The texts a tokenizer is built from: the chat template, every conversation turn and D_PT."""
    yield from [SYSTEM + " USER: ", " ASSISTANT: "] * template_repeats  # in every sequence: merge it well
    for name in ("train.jsonl", "pretrain.jsonl"):
        with (prepared / name).open() as f:
            for line in f:
                obj = json.loads(line)
                if "text" in obj:
                    yield obj["text"]
                for turn in obj.get("conversations", []):
                    yield turn["value"].replace(IMAGE_PLACEHOLDER, "")


def read_pretrain(prepared: Path) -> list[str]:
    with (prepared / "pretrain.jsonl").open() as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
