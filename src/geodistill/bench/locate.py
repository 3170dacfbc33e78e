"""Where is the one object? Can a fresh tower + projector, under four readouts, or a whole LLaVA learn it?

    python -m geodistill.bench.locate [--model teacher] [--positions sincos] [--readouts patch,...,llm]
        [--steps 500] [--every 100] [--lr LR] [--batch-size 16] [--images 3000 256] [--freeze-tower]
        [--tokenizer models/tokenizer]
        [--params params.yaml] [--out reports/locate.json]

`bench.learn` shows that a fresh LLaVA does not learn to read boxes off the image. This asks why, without
the language model: on scenes with exactly one one-cell object (``synthetic.one_object_scene``), a freshly
built tower + projector of ``--model``'s arch (init seed 0, as the pipeline builds it) is trained jointly
with one small readout head to name the object's cell (grid^2 classes), each readout from its own fresh
build, and scored on held-out scenes:

- ``patch``: one score per image token, softmax over tokens (the cell is supervised per token);
- ``own_token``: a linear map of the object's own image token (the right token is given);
- ``attention``: a learned query attends over the image tokens, a linear map of the mix names the cell
  (what a language model's attention head has to learn to ground);
- ``mean``: a linear map of the mean image token;
- ``llm``: the whole LLaVA (its init std ``arch.init_std``) answers ``[refer] <p>the storage tank</p>``
  with the object's box, trained with the pipeline's collator and SFT loss; scored as the share of
  held-out records whose box tokens are all right (argmax, teacher-forced; chance ~ 1/grid^2).

``patch`` asks whether a token knows it holds the object, ``own_token`` whether it knows where it is; if both
learn and ``attention`` does not, the two must be learnt *together*: with near-uniform attention the mix of
(content + position) tokens carries no linear trace of the object's position (the positions sum to a
constant), so neither the query nor the head gets a signal from the other. That is a saddle, and it is
what a grounding benchmark has to get a model past. ``llm`` shows what gets a language model past it: a
lower lr (and an init std of 1/sqrt(hidden)) with sincos positions (docs/design.md, "The embedded
experiment").
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from geodistill.bench.learn import fresh_model
from geodistill.config import LlavaArch
from geodistill.data import synthetic
from geodistill.data.collate import IGNORE, Batch, Example
from geodistill.distill.sft import Collator, forward, sft_step
from geodistill.markdown import table
from geodistill.models.llava import build_llava, num_image_tokens, projector_features
from geodistill.models.tokenizer import load_tokenizer
from geodistill.models.transform import ImageTransform

READOUTS = ("patch", "own_token", "attention", "mean")
"""The tower readouts; ``llm`` (the whole model) is trained by :func:`train_llm`."""
LLM = "llm"


class Readout(nn.Module):
    """(B, P, D) image tokens (+ the object's cell, used by ``own_token`` only) -> (B, grid^2) cell logits.

    Initialised from ``seed`` alone (not the global RNG), so a readout scores the same on every run.
    """

    def __init__(self, kind: str, dim: int, n_cells: int, seed: int = 0) -> None:
        super().__init__()
        if kind not in READOUTS:
            raise ValueError(f"unknown readout {kind!r}; expected one of {READOUTS}")
        self.kind = kind
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Linear(dim, 1 if kind == "patch" else n_cells)
            if kind == "attention":
                # a language model's scale at init (std 0.02): attention starts near uniform, as in the LLM
                self.query = nn.Parameter(torch.randn(dim) * 0.02)
                self.key = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        if self.kind == "patch":
            return self.head(tokens)[..., 0]  # (B, P)
        if self.kind == "own_token":
            return self.head(tokens[torch.arange(len(cell)), cell])
        if self.kind == "mean":
            return self.head(tokens.mean(dim=1))
        weights = torch.softmax(self.key(tokens) @ self.query / tokens.shape[-1] ** 0.5, dim=1)  # (B, P)
        return self.head((weights[..., None] * tokens).sum(dim=1))


def scenes(n: int, prefix: str, size: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (n, 3, H, W), object cells (n,)) of ``n`` one-object scenes ``<prefix><i>`` (seed 0)."""
    transform = ImageTransform(size)
    pixels, cells = [], []
    for i in range(n):
        s = synthetic.one_object_scene(f"{prefix}{i}", 0, size, grid)
        pixels.append(transform(Image.open(io.BytesIO(s.image_png))))
        cells.append(s.objects[0].row * grid + s.objects[0].col)
    return torch.stack(pixels), torch.tensor(cells)


def referring_examples(n: int, prefix: str, size: int, grid: int) -> list[Example]:
    """The scenes of :func:`scenes` as GeoChat referring records: "the <category>" -> the object's box."""
    out = []
    for i in range(n):
        s = synthetic.one_object_scene(f"{prefix}{i}", 0, size, grid)
        out.append(Example(synthetic.one_object_referring(s, grid), s.image_png))
    return out


def train_llm(
    arch: LlavaArch, tok: Any, train: list[Example], held_out: list[Example], steps: int, every: int,
    lr: float, batch_size: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train a fresh LLaVA on one-object referring records; rows as :func:`train_readout`'s."""
    model = build_llava(arch, tok, seed=0)
    collator = Collator(tok, ImageTransform(arch.image_size), num_image_tokens(model), 256)
    held_out_batch = collator(held_out)
    return fit(
        LLM, list(model.parameters()), lambda idx: sft_step(model, collator([train[i] for i in idx]))["loss"],
        lambda: box_accuracy(model, held_out_batch), len(train), steps, every, lr, batch_size,
    )  # fmt: skip


@torch.no_grad()
def box_accuracy(model: nn.Module, batch: Batch) -> float:
    """Share of records whose every answer token is the model's argmax given the tokens before it."""
    model.eval()
    predicted = forward(model, batch)[:, :-1].argmax(-1)  # (B, T - 1)
    model.train()
    labels = batch.labels[:, 1:]
    return ((predicted == labels) | (labels == IGNORE)).all(dim=1).float().mean().item()


def train_readout(
    kind: str, arch: LlavaArch, tok: Any, data: tuple[torch.Tensor, ...], steps: int, every: int,
    lr: float, batch_size: int, freeze_tower: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train one readout with a fresh tower + projector; one row per ``every`` steps (and the last)."""
    x, y, xv, yv = data
    model = build_llava(arch, tok, seed=0)
    n_cells = (arch.image_size // arch.patch_size) ** 2
    readout = Readout(kind, model.config.text_config.hidden_size, n_cells)
    params = list(readout.parameters()) + ([] if freeze_tower else list(model.parameters()))

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        i = torch.from_numpy(idx)
        return nn.functional.cross_entropy(readout(projector_features(model, x[i]), y[i]), y[i])

    return fit(kind, params, loss_of, lambda: accuracy(model, readout, xv, yv), len(x), steps, every, lr,
               batch_size)  # fmt: skip


def fit(
    kind: str, params: list[nn.Parameter], loss_of: Callable[[np.ndarray], torch.Tensor],
    score: Callable[[], float], n_train: int, steps: int, every: int, lr: float, batch_size: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """AdamW at a constant ``lr`` on random batches of ``n_train`` items (seed 0): ``loss_of(indices)`` per
    step, ``score()`` (held-out accuracy) every ``every`` steps and at the last; one row per score."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = np.random.default_rng(0)
    rows = []
    for step in range(1, steps + 1):
        loss = loss_of(order.choice(n_train, size=batch_size, replace=False))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            acc = score()
            rows.append({"readout": kind, "step": step, "train_loss": loss.item(), "val_acc": acc})
            print(f"{kind} step {step}: loss {loss.item():.3f}, held-out {100 * acc:.1f} %", flush=True)
    return rows


@torch.no_grad()
def accuracy(model: nn.Module, readout: Readout, pixels: torch.Tensor, cells: torch.Tensor) -> float:
    right = 0
    for xb, yb in zip(pixels.split(64), cells.split(64), strict=True):
        right += int((readout(projector_features(model, xb), yb).argmax(-1) == yb).sum())
    return right / len(cells)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("teacher", "student"), default="teacher")
    ap.add_argument("--positions", choices=("clip", "sincos"), default=None)
    ap.add_argument("--readouts", default=",".join(READOUTS), help=f"of {', '.join(READOUTS)}, {LLM}")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=None, help="default: the model's train lr")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, nargs=2, default=(3000, 256), metavar=("TRAIN", "HELD_OUT"))
    ap.add_argument("--freeze-tower", action="store_true", help="train the readout only")
    ap.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("reports/locate.json"))
    args = ap.parse_args(argv)
    arch, train_cfg = fresh_model(args.model, args.params, args.positions)
    lr = args.lr if args.lr is not None else train_cfg.lr
    grid = arch.image_size // arch.patch_size
    kinds = [k for k in args.readouts.split(",") if k]
    if any(k != LLM for k in kinds):  # the tower readouts' pixels; `llm` renders its own records
        data = (*scenes(args.images[0], "locate", arch.image_size, grid),
                *scenes(args.images[1], "locate-heldout", arch.image_size, grid))  # fmt: skip
    tok = load_tokenizer(args.tokenizer)
    rows = []
    for kind in kinds:
        if kind == LLM:
            train = referring_examples(args.images[0], "locate", arch.image_size, grid)
            held_out = referring_examples(args.images[1], "locate-heldout", arch.image_size, grid)
            rows += train_llm(arch, tok, train, held_out, args.steps, args.every, lr, args.batch_size)
        else:
            rows += train_readout(kind, arch, tok, data, args.steps, args.every, lr, args.batch_size,
                                  args.freeze_tower)  # fmt: skip
    settings = {"model": args.model, "arch": dataclasses.asdict(arch), "lr": lr, "steps": args.steps,
                "batch_size": args.batch_size, "images": list(args.images),
                "freeze_tower": args.freeze_tower}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": settings, "chance": 1 / grid**2, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    body = [[r["readout"], str(r["step"]), f"{r['train_loss']:.3f}", f"{100 * r['val_acc']:.1f}"]
            for r in rows]  # fmt: skip
    print(f"chance {100 / grid**2:.1f} %")
    print(table(["readout", "step", "train loss", "held-out accuracy %"], body))


if __name__ == "__main__":
    main()
