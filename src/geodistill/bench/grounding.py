"""Does a model see *where* things are? Two checks of trained LLaVA folders, minutes instead of an edge run.

    python -m geodistill.bench.grounding models/teacher [models/student_sft ...] [--shards data/shards/val]
        [--records 192] [--probe-images 300 150] [--seed 0] [--out reports/grounding.json]

Grounding and region captions need the position of an object, not only its presence; scene and VQA need
neither. Two measurements per model:

(a) **Where positions are lost**: the rms of the tower's patch position embeddings over that of its
    patch embeddings (on probe scenes), then **linear probes on the projector outputs** (the image
    tokens the language model reads), on scenes of the embedded generator (training rendering, ids
    ``probe*`` outside every split): per image token, the colour of the object covering that patch
    (none + 4 colours) and the token's patch index (grid^2 classes). Logistic regression fitted on the
    first ``--probe-images`` count, scored on the second. A patch-index probe near chance means the
    features do not say where a patch is, and no language model on top can ground.
(b) **Image reliance**: teacher-forced accuracy of the answer tokens that carry positions (tokens with
    a digit, in referring and grounded-description answers) and of region-caption answers, on records
    of ``--shards``, once with each record's own image and once with another record's (the batch's
    images rolled by one). Equal accuracies mean the answers come from priors, not from the image.

Numbers go to stdout (markdown) and ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from geodistill.data import synthetic
from geodistill.data.collate import IGNORE, Example, collate, iter_examples
from geodistill.markdown import table
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.llava import num_image_tokens, projector_features, vision_embeddings

RELIANCE_TASKS = {"referring": "position", "grounding_description": "position", "region_caption": "all"}
"""Task -> which answer tokens are scored: those with a digit (box coordinates) or all of them."""
COLOURS = ("none", *synthetic.COLOURS)
Transform = Callable[[Image.Image], torch.Tensor]


def patch_labels(scene: synthetic.Scene, grid: int) -> np.ndarray:
    """(grid * grid,) index into COLOURS of the object covering each patch, row-major (0: none)."""
    lab = np.zeros((grid, grid), dtype=np.int64)
    for o in scene.objects:
        lab[o.row : o.row + o.rows, o.col : o.col + o.cols] = COLOURS.index(o.colour)
    return lab.reshape(-1)


def _scenes(
    transform: Transform, ids: Sequence[str], seed: int, size: int, grid: int
) -> tuple[list[synthetic.Scene], torch.Tensor]:
    """Scenes ``ids`` of the generator (training rendering) and their pixels (N, 3, H, W)."""
    scenes = [synthetic.make_scene(image_id, seed, size, grid) for image_id in ids]
    return scenes, torch.stack([transform(Image.open(io.BytesIO(s.image_png))) for s in scenes])


def _probe_data(
    model: torch.nn.Module, scenes: Sequence[synthetic.Scene], pixels: torch.Tensor, grid: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N * P, H), colour labels (N * P,), patch indices (N * P,)) of ``scenes``."""
    with torch.no_grad():
        feats = torch.cat(
            [projector_features(model, chunk).float() for chunk in pixels.split(64)]
        )  # (N, P, H)
    colours = torch.from_numpy(np.concatenate([patch_labels(s, grid) for s in scenes]))
    return feats.flatten(0, 1), colours, torch.arange(grid * grid).repeat(len(scenes))


def position_to_content(model: torch.nn.Module, pixels: torch.Tensor) -> float:
    """rms of the tower's patch position embeddings over rms of its patch embeddings of ``pixels``:
    how loudly the tower's input says where a patch is, against what is in it."""
    emb = vision_embeddings(model)
    with torch.no_grad():
        content = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).float()
        positions = emb.position_embedding.weight[1:].float()
    return (positions.pow(2).mean().sqrt() / content.pow(2).mean().sqrt()).item()


def probe_accuracy(
    x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, classes: int
) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, small L2, Adam)."""
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(x_fit.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_fit @ w + b, y_fit) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x_test @ w + b).argmax(1) == y_test).float().mean().item()


def probes(
    model: torch.nn.Module, transform: Transform, n_fit: int, n_test: int, seed: int
) -> dict[str, float]:
    """(a): colour-at-patch and patch-index probe accuracies, with their trivial baselines."""
    vision = model.config.vision_config
    size, grid = vision.image_size, vision.image_size // vision.patch_size
    fit_scenes, fit_pixels = _scenes(transform, [f"probe{i:06d}" for i in range(n_fit)], seed, size, grid)
    test_ids = [f"probe{i:06d}" for i in range(n_fit, n_fit + n_test)]
    test_scenes, test_pixels = _scenes(transform, test_ids, seed, size, grid)
    xf, cf, pf = _probe_data(model, fit_scenes, fit_pixels, grid)
    xt, ct, pt = _probe_data(model, test_scenes, test_pixels, grid)
    return {
        "position_to_content_rms": position_to_content(model, test_pixels[:64]),
        "colour_probe": probe_accuracy(xf, cf, xt, ct, len(COLOURS)),
        "colour_majority": (ct == cf.mode().values).float().mean().item(),
        "patch_probe": probe_accuracy(xf, pf, xt, pt, grid * grid),
        "patch_chance": 1 / grid**2,
    }


def reliance(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    transform: Transform,
    examples: Sequence[Example],
    scored: str,
    batch_size: int = 32,
) -> dict[str, float]:
    """(b) for one task: answer-token accuracy with the true images and with the batch's images rolled."""
    digit = torch.tensor([any(ch.isdigit() for ch in tok.convert_ids_to_tokens(i)) for i in range(len(tok))])
    right = {"true": 0, "rolled": 0}
    total = 0
    n_img, max_len = num_image_tokens(model), model.config.text_config.max_position_embeddings
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], tok, transform, n_img, max_len, tok.pad_token_id)
        labels = batch.labels[:, 1:]
        mask = labels != IGNORE
        if scored == "position":
            mask &= digit[labels.clamp(min=0)]
        total += int(mask.sum())
        for name, pixels in (("true", batch.pixel_values), ("rolled", batch.pixel_values.roll(1, 0))):
            with torch.no_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               pixel_values=pixels).logits  # fmt: skip
            right[name] += int((logits[:, :-1].argmax(-1) == labels)[mask].sum())
    return {"true_image": right["true"] / max(total, 1), "rolled_image": right["rolled"] / max(total, 1),
            "tokens": total}  # fmt: skip


def first_records(shard_dir: Path, tasks: Iterable[str], n: int) -> dict[str, list[Example]]:
    """The first ``n`` records of each of ``tasks`` in ``shard_dir`` (an empty list for a task with none);
    stops reading once every task has ``n``."""
    out: dict[str, list[Example]] = {t: [] for t in tasks}
    for ex in iter_examples(shard_dir):
        if ex.record.task in out and len(out[ex.record.task]) < n:
            out[ex.record.task].append(ex)
            if all(len(exs) == n for exs in out.values()):
                break
    return out


def measure(model_dir: Path, shards: Path, n_records: int, n_fit: int, n_test: int, seed: int) -> dict:
    """(a) and (b) for one model folder; the first ``n_records`` records of each task in ``shards``."""
    model, tok, transform = load_for_inference(model_dir, device="cpu", dtype=torch.float32)[:3]
    by_task = first_records(shards, RELIANCE_TASKS, n_records)
    return {
        "probes": probes(model, transform, n_fit, n_test, seed),
        "reliance": {
            t: reliance(model, tok, transform, by_task[t], s) for t, s in RELIANCE_TASKS.items() if by_task[t]
        },
    }


def rows(results: dict[str, dict]) -> list[list[str]]:
    """The markdown table: per model, the two probes and each task's reliance check."""
    out = []
    for name, r in results.items():
        p = r["probes"]
        ratio = f"{p['position_to_content_rms']:.3f}"
        out.append([name, "tower input: position / content rms", ratio, "", ""])
        out.append([name, "colour at patch (probe)", f"{100 * p['colour_probe']:.1f}",
                    f"{100 * p['colour_majority']:.1f} (majority)", ""])  # fmt: skip
        out.append([name, "patch index (probe)", f"{100 * p['patch_probe']:.1f}",
                    f"{100 * p['patch_chance']:.1f} (chance)", ""])  # fmt: skip
        for task, v in r["reliance"].items():
            label = f"{task} {RELIANCE_TASKS[task]} tokens"
            true, rolled = f"{100 * v['true_image']:.1f}", f"{100 * v['rolled_image']:.1f} (rolled)"
            out.append([name, label, true, rolled, str(v["tokens"])])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="trained LLaVA folders (e.g. models/teacher)")
    ap.add_argument("--shards", type=Path, default=Path("data/shards/val"))
    ap.add_argument("--records", type=int, default=192, help="records per task for the reliance check")
    ap.add_argument("--probe-images", type=int, nargs=2, default=(300, 150), metavar=("FIT", "TEST"))
    ap.add_argument("--seed", type=int, default=0, help="generator seed of the probe scenes")
    ap.add_argument("--out", type=Path, default=Path("reports/grounding.json"))
    args = ap.parse_args(argv)
    results = {
        str(m): measure(m, args.shards, args.records, *args.probe_images, args.seed) for m in args.models
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(["model", "measure", "accuracy %", "reference %", "tokens"], rows(results)))


if __name__ == "__main__":
    main()
