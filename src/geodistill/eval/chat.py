"""One question about one image, answered by a pipeline model or any HF-format LLaVA checkpoint.

    geodistill chat --model models/student_kd --image scene.png "[refer] <p>the red ship</p>"

The model folder may be a pipeline model (``models/<name>``, an adopted checkpoint is followed through
its ``adopted.json``) or a local ``LlavaForConditionalGeneration`` checkpoint; both load with plain
transformers through :func:`geodistill.models.checkpoints.load`. The question is answered with the same
vicuna_v1 prompt and greedy decoding as the evaluation (:func:`geodistill.eval.generate.generate`), so
every task token works (``[grounding]``, ``[identify] {box}``, ``[refer] <p>..</p>``). Boxes in the
answer are drawn on the image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

from geodistill.data.records import BOX_RE, IMAGE_PLACEHOLDER, PHRASE_RE, Box, Turn, parse_boxes
from geodistill.data.template import encode_conversation
from geodistill.errors import DataError, GeodistillError, ModelError
from geodistill.eval.generate import Prompt, generate
from geodistill.models.checkpoints import load, resolve
from geodistill.models.factory import ImageTransform, num_image_tokens

#: Outline colours of successive phrases' boxes (all boxes of one phrase share a colour).
COLOURS = ("#ff2020", "#20c0ff", "#ffd000", "#30e030", "#ff60ff", "#ff8c00")
MIN_DRAW_SIDE = 256
"""Images smaller than this are enlarged (nearest neighbour) before drawing, so boxes stay visible."""


@dataclass(frozen=True)
class ChatAnswer:
    answer: str
    """The decoded answer (up to the first ``</s>``)."""
    boxes: tuple[Box, ...]
    """Boxes parsed from the answer, in order."""
    drawn: Path | None
    """The image with the boxes drawn, when the answer held any."""
    max_new_tokens: int
    """The generation limit actually used (lowered when the model's context is shorter)."""


def prepare_question(question: str) -> str:
    """The first human turn: ``<image>\\n`` prepended unless the question places it itself."""
    q = question.strip()
    if not q:
        raise GeodistillError("the question is empty; pass it as the last argument, e.g. 'What is this?'")
    n = q.count(IMAGE_PLACEHOLDER)
    if n > 1:
        raise GeodistillError(f"the question holds {n} {IMAGE_PLACEHOLDER} placeholders; one image needs one")
    return q if n else f"{IMAGE_PLACEHOLDER}\n{q}"


def open_image(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt files; all mean "unreadable"
        raise DataError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e


def load_model(
    model_dir: str | Path,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, ImageTransform]:
    """(model, tokenizer, image transform) of a pipeline model folder or HF LLaVA checkpoint, in eval
    mode on the GPU when there is one (in the checkpoint's dtype), else on the CPU in float32."""
    p = Path(model_dir)
    if not p.exists():
        raise ModelError(f"{p}: no such model folder; pass models/<name> or a local LLaVA checkpoint folder")
    try:
        resolve(p)  # a broken adopted.json would otherwise surface as a bare KeyError / JSON error
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelError(
            f"{p}/adopted.json is not a valid adopted-model pointer ({type(e).__name__}: {e}); "
            "re-run the stage that adopted it"
        ) from e
    cuda = torch.cuda.is_available()
    # On CPU, half precision is slow or unsupported: compute in float32.
    model, tok, transform = load(p, dtype=None if cuda else torch.float32)
    if cuda:
        model = model.to("cuda")
    return model.eval(), tok, transform


def labelled_boxes(text: str) -> list[tuple[str | None, Box]]:
    """Each box of ``text`` with the ``<p>phrase</p>`` written before it (GeoChat puts a phrase's boxes
    right after it); None for boxes before any phrase."""
    marks = sorted([(m.start(), "p", m) for m in PHRASE_RE.finditer(text)]
                   + [(m.start(), "b", m) for m in BOX_RE.finditer(text)], key=lambda t: t[0])  # fmt: skip
    out: list[tuple[str | None, Box]] = []
    phrase: str | None = None
    for _, kind, m in marks:
        if kind == "p":
            phrase = m.group(1).strip()
        else:
            out.extend((phrase, b) for b in parse_boxes(m.group(0)))
    return out


def render_boxes(image: Image.Image, text: str) -> Image.Image:
    """A copy of ``image`` (enlarged when small) with the boxes of ``text`` drawn as (rotated) polygons,
    labelled by phrase; all boxes of one phrase share a colour of :data:`COLOURS`."""
    boxes = labelled_boxes(text)
    img = image.convert("RGB")  # a copy even when already RGB: the caller's image is never drawn on
    if min(img.size) < MIN_DRAW_SIDE:
        scale = -(-MIN_DRAW_SIDE // min(img.size))  # ceil: the short side reaches MIN_DRAW_SIDE
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    width = max(2, round(min(img.size) / 150))
    colour_of: dict[str | None, str] = {}
    for phrase, box in boxes:
        colour = colour_of.setdefault(phrase, COLOURS[len(colour_of) % len(COLOURS)])
        corners = box.polygon(img.width, img.height)
        draw.line([*corners, corners[0]], fill=colour, width=width, joint="curve")
        if phrase:
            x, y = min(c[0] for c in corners), min(c[1] for c in corners)
            draw.text((max(0, x), max(0, y - 12)), phrase[:40], fill=colour)
    return img


def draw_boxes(image: Image.Image, text: str, out: str | Path) -> Path:
    """Write ``image`` with the boxes of ``text`` drawn (:func:`render_boxes`) as a PNG at ``out``."""
    img = render_boxes(image, text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out


def boxes_path(image: str | Path, out: str | Path | None) -> Path:
    """Where the drawn image goes: ``out`` itself when it names a file, ``<image stem>_boxes.png`` inside
    ``out`` when it is an existing folder, in the current folder when no ``out`` is given."""
    name = f"{Path(image).stem}_boxes.png"
    if out is None:
        return Path.cwd() / name
    out = Path(out)
    return out / name if out.is_dir() else out


def ask(
    model: LlavaForConditionalGeneration,
    tok: PreTrainedTokenizerBase,
    transform: ImageTransform,
    picture: Image.Image,
    turn: Turn,
    *,
    max_new_tokens: int,
) -> tuple[str, int, float]:
    """Greedy answer of a loaded model to the first human ``turn`` about ``picture``:
    (answer, the generation limit actually used, seconds spent generating).

    The limit is lowered to what the model's context leaves after the prompt; a prompt that fills the
    context is a GeodistillError (generating past the position table fails inside the model with an
    opaque index error).
    """
    n_img = num_image_tokens(model.config)
    prompt_len = len(encode_conversation(tok, [turn], n_img, for_generation=True).input_ids)
    context = getattr(model.config.text_config, "max_position_embeddings", None)
    if context is not None:
        if prompt_len >= context:
            raise GeodistillError(
                f"the prompt takes {prompt_len} tokens ({n_img} of them image tokens) but the model's "
                f"context is {context}; ask a shorter question"
            )
        max_new_tokens = min(max_new_tokens, context - prompt_len)
    (answer,), seconds = generate(
        model, tok, transform, n_img, [Prompt((turn,), picture)], batch_size=1, max_new_tokens=max_new_tokens
    )
    return answer, max_new_tokens, seconds


def chat(
    model_dir: str | Path,
    image: str | Path,
    question: str,
    *,
    max_new_tokens: int = 256,
    out: str | Path | None = None,
) -> ChatAnswer:
    """Answer ``question`` about ``image`` greedily; draw the answer's boxes (see :func:`boxes_path`)."""
    if max_new_tokens < 1:
        raise GeodistillError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    turn = Turn("human", prepare_question(question))
    picture = open_image(image)  # before the (slow) model load: a typo in the path fails at once
    model, tok, transform = load_model(model_dir)
    answer, max_new_tokens, _ = ask(model, tok, transform, picture, turn, max_new_tokens=max_new_tokens)
    boxes = tuple(parse_boxes(answer))
    drawn = draw_boxes(picture, answer, boxes_path(image, out)) if boxes else None
    return ChatAnswer(answer, boxes, drawn, max_new_tokens)
