"""What each action on the page returns, as plain values (images, strings): :mod:`.app` wires these to
Gradio components, and tests call them directly.

Every bad input (not an image, truncated, too many pixels, no image, empty question, two ``<image>``)
becomes a message in the page's status line; the server never sees an exception from it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from geodistill.data.records import IMAGE_PLACEHOLDER, Record
from geodistill.errors import GeodistillError
from geodistill.eval import chat
from geodistill.eval.demo import core


@dataclass(frozen=True)
class Source:
    """The image the next question is about."""

    image: str
    """Its file: an upload, or a held-out test image."""
    item: str | None = None
    """The test item's label when it was picked from the test set."""


def error_html(e: Exception | str) -> str:
    return f'<div class="demo-error">⚠ {html.escape(str(e))}</div>'


def format_stats(a: core.ModelAnswer) -> str:
    """One line: latency, tokens, tokens/s and boxes."""
    if a.error:
        return f"no answer: {a.error}"
    tps = a.tokens_per_s
    rate = "-" if tps is None or not math.isfinite(tps) else f"{tps:.1f}"
    boxes = f"{a.n_boxes} box" + ("" if a.n_boxes == 1 else "es")
    return f"{a.seconds:.2f} s · {a.tokens} tokens · {rate} tokens/s · {boxes}"


def stats_html(a: core.ModelAnswer) -> str:
    out = f'<div class="demo-stats">{html.escape(format_stats(a))}</div>'
    if a.score is not None:
        marks = {True: ("demo-ok", "✓"), False: ("demo-wrong", "✗"), None: ("demo-score", "")}
        cls, mark = marks[a.score.correct]
        out += f'<div class="{cls}">{mark} {html.escape(a.score.text)}</div>'
    return out


def truth_html(record: Record) -> str:
    """The ground truth of a test item (task, answer or reference captions)."""
    refs = record.meta.get("refs") or record.answers[:1]
    items = "".join(f"<li><code>{html.escape(str(r))}</code></li>" for r in refs)
    return f'<div class="demo-truth"><b>Ground truth</b> ({html.escape(record.task)}):<ul>{items}</ul></div>'


def check_limits(max_pixels: int = core.MAX_PIXELS, max_new_tokens: int = core.MAX_NEW_TOKENS) -> None:
    bad = [f"--{k} must be >= 1, got {v}" for k, v in (("max-pixels", max_pixels),
           ("max-new-tokens", max_new_tokens)) if v < 1]  # fmt: skip
    if bad:
        raise GeodistillError("; ".join(bad))


def _shown(picture: Image.Image, text: str) -> Image.Image:
    """The display copy with the boxes of ``text`` drawn (small images enlarged, as chat draws them)."""
    return chat.render_boxes(core.display_copy(picture), text)


def _truth(picture: Image.Image, record: Record | None) -> tuple[str | None, Image.Image | None]:
    """(ground-truth text, image with its boxes): (None, None) without ground truth."""
    if record is None:
        return None, None
    drawing = core.truth_drawing(record)
    return truth_html(record), _shown(picture, drawing) if drawing else None


class Page:
    """The demo's state that outlives a request: the loaded models and the held-out items.

    Each action returns its outputs as a tuple in the order its docstring gives; a ground truth of None
    means there is none to show (an upload, or an edited question).
    """

    def __init__(
        self,
        models: Sequence[core.DemoModel],
        items: Sequence[core.TestItem],
        *,
        max_pixels: int = core.MAX_PIXELS,
        max_new_tokens: int = core.MAX_NEW_TOKENS,
    ) -> None:
        check_limits(max_pixels, max_new_tokens)
        self.models = list(models)
        self.items = {it.label: it for it in items}
        self.templates = core.task_templates(items)
        self.max_pixels = max_pixels
        self.max_new_tokens = max_new_tokens

    def upload(self, path: str | None) -> tuple:
        """(source, preview, test pick cleared, status, ground truth, its image) after an upload."""
        if not path:
            return None, None, None, "", None, None
        try:
            picture = core.read_image(path, self.max_pixels)
        except GeodistillError as e:
            return None, None, None, error_html(e), None, None
        return Source(str(path)), _shown(picture, ""), None, "", None, None

    def pick(self, label: str | None) -> tuple:
        """(source, preview, upload cleared, question, status, ground truth, its image) after a pick."""
        item = self.items.get(label or "")
        if item is None:
            missing = error_html(f"no test item {label!r}; pick one from the list")
            return None, None, None, "", missing, None, None
        try:
            picture = core.read_image(item.image, self.max_pixels)
        except GeodistillError as e:
            return None, None, None, item.question, error_html(e), None, None
        preview = _shown(picture, item.question)  # shows the region of an [identify] question
        return Source(str(item.image), label), preview, None, item.question, "", *_truth(picture, item.record)

    def template(self, task: str | None) -> str:
        return self.templates.get(task or "", "")

    def ask(self, source: Source | None, question: str | None) -> tuple:
        """(status, ground truth, its image, then per model: image with boxes, answer, stats)."""
        blank = [None, "", ""] * len(self.models)
        if source is None:
            return error_html("no image yet: upload one, or pick a held-out test image"), None, None, *blank
        try:
            turn = core.question_turn(question)
            picture = core.read_image(source.image, self.max_pixels)
        except GeodistillError as e:
            return error_html(e), None, None, *blank
        item = self.items.get(source.item or "")
        truth = core.truth_for(item, question or "")
        answers = core.answer_all(self.models, picture, turn, max_new_tokens=self.max_new_tokens, truth=truth)
        outs: list = []
        for a in answers:
            outs += [a.drawn, a.answer, stats_html(a)]
        asked = html.escape(turn.value.replace(IMAGE_PLACEHOLDER, "").strip())
        note = "" if truth else " (no ground truth: " + ("the question was edited)" if item else "an upload)")
        done = f'<div class="demo-done">{len(answers)} answers to: {asked}{note}</div>'
        return done, *_truth(picture, truth), *outs
