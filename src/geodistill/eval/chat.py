"""One question about one image, answered by a pipeline model or any HF-format LLaVA checkpoint.

    geodistill chat --model models/student_kd --image scene.png "[refer] <p>the red ship</p>"

The model folder may be a pipeline model (``models/<name>``, an adopted checkpoint is followed through
its ``adopted.json``) or a local ``LlavaForConditionalGeneration`` checkpoint. It loads through
:func:`geodistill.models.checkpoints.load_for_inference`, the evaluation's loader (same device, same
dtype), and the question is answered with the same vicuna_v1 prompt and greedy decoding as the
evaluation (:func:`geodistill.eval.generate.generate`), so chat answers what `evaluate` would. Every task
token works (``[grounding]``, ``[identify] {box}``, ``[refer] <p>..</p>``). Boxes in the answer are drawn
on the image when ``out`` says where; nothing is written otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

from geodistill.data.records import BOX_RE, IMAGE_PLACEHOLDER, PHRASE_RE, Box, Turn, parse_boxes
from geodistill.data.template import encode_conversation
from geodistill.errors import GeodistillError
from geodistill.eval.generate import Prompt, generate
from geodistill.files import open_image
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.llava import num_image_tokens
from geodistill.models.transform import ImageTransform

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
    """The image with the boxes drawn: None when the answer held none or no ``out`` was given."""
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


def boxes_path(image: str | Path, out: str | Path) -> Path:
    """Where the drawn image goes: ``<image stem>_boxes.png`` inside ``out`` when ``out`` is an existing
    folder or ends with a path separator (the folder is created), else ``out`` itself."""
    folder = str(out).endswith(("/", os.sep)) or Path(out).is_dir()
    return Path(out) / f"{Path(image).stem}_boxes.png" if folder else Path(out)


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
    """Answer ``question`` about ``image`` greedily; when ``out`` is given and the answer holds boxes,
    draw them there (see :func:`boxes_path`)."""
    if max_new_tokens < 1:
        raise GeodistillError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    turn = Turn("human", prepare_question(question))
    picture = open_image(image)  # before the (slow) model load: a typo in the path fails at once
    model, tok, transform = load_for_inference(model_dir)
    answer, max_new_tokens, _ = ask(model, tok, transform, picture, turn, max_new_tokens=max_new_tokens)
    boxes = tuple(parse_boxes(answer))
    drawn = draw_boxes(picture, answer, boxes_path(image, out)) if boxes and out is not None else None
    return ChatAnswer(answer, boxes, drawn, max_new_tokens)
