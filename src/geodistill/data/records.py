"""GeoChat instruction records: schema, validation, task names and prompts, image paths, rotated boxes.

A record is one conversation about one image (docs/design.md, "Prepared record")::

    {"id": str, "image": relative path, "image_id": str, "task": str,
     "conversations": [{"from": "human"|"gpt", "value": str}, ...], "meta": {...}}

``meta`` is optional and carries evaluation ground truth (class label, question type, pixel boxes).

Boxes follow GeoChat: ``{<x1><y1><x2><y2>|<theta>}`` on a 0-100 grid, theta in degrees (optional),
several boxes back to back. ``(x1, y1, x2, y2)`` is the box before rotation; it is rotated about its
centre by theta degrees, clockwise on screen (image y points down).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geodistill.errors import DataError
from geodistill.files import image_problem, inside

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")

#: Every instruction type of the paper's Table 2; scene, vqa, referring and region_caption are also the
#: four evaluation tasks (geodistill.eval.tasks), under these names from records to report.
TASKS = (
    "scene",
    "vqa",
    "description",
    "conversation",
    "complex",
    "grounding_description",
    "region_caption",
    "referring",
)

# The wording of GeoChat's evaluation scripts; the synthetic benchmark asks its scene and VQA questions
# the same way, so a model trained here is evaluated on a real benchmark with the prompts it learnt.
SCENE_PROMPT = "Classify the image in the following classes: {classes}. Answer in one word or a short phrase."
VQA_SUFFIX = "Answer the question using a single word or phrase."
REFER_PROMPT = "[refer] Give me the location of <p> {q} </p>"
GROUNDING_PROMPT = "[grounding] {q}"
IDENTIFY_PROMPT = "[identify] What is the object present at {q}"

_NUM = r"(-?\d+(?:\.\d+)?)"
BOX_RE = re.compile(rf"\{{<{_NUM}><{_NUM}><{_NUM}><{_NUM}>(?:\|<{_NUM}>)?\}}")
PHRASE_RE = re.compile(r"<p>(.*?)</p>", re.DOTALL)


@dataclass(frozen=True)
class Box:
    """A (possibly rotated) box on GeoChat's 0-100 grid."""

    x1: float
    y1: float
    x2: float
    y2: float
    theta: float | None = None
    """Rotation in degrees about the box centre, clockwise on screen; None when the text gave none."""

    def problems(self) -> list[str]:
        """What makes this box invalid (empty when valid)."""
        out = []
        for name in ("x1", "y1", "x2", "y2"):
            v = getattr(self, name)
            if not (0 <= v <= 100):
                out.append(f"{name}={v:g} is outside the 0-100 grid")
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            out.append(f"box ({self.x1:g},{self.y1:g},{self.x2:g},{self.y2:g}) is inverted or empty")
        if self.theta is not None and not (-360 <= self.theta <= 360):
            out.append(f"theta={self.theta:g} is not an angle in degrees")
        return out

    def to_text(self) -> str:
        """GeoChat text form; whole numbers print without a decimal point."""
        coords = "".join(f"<{_fmt(v)}>" for v in (self.x1, self.y1, self.x2, self.y2))
        angle = "" if self.theta is None else f"|<{_fmt(self.theta)}>"
        return "{" + coords + angle + "}"

    def polygon(self, width: float, height: float) -> list[tuple[float, float]]:
        """The four corners in pixels of an image of ``width`` x ``height``, rotated by theta."""
        sx, sy = width / 100.0, height / 100.0
        cx, cy = (self.x1 + self.x2) / 2 * sx, (self.y1 + self.y2) / 2 * sy
        hw, hh = (self.x2 - self.x1) / 2 * sx, (self.y2 - self.y1) / 2 * sy
        a = math.radians(self.theta or 0.0)
        c, s = math.cos(a), math.sin(a)
        corners = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
        # y points down, so this standard rotation turns clockwise on screen.
        return [(cx + dx * c - dy * s, cy + dx * s + dy * c) for dx, dy in corners]


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def parse_boxes(text: str) -> list[Box]:
    """All boxes in ``text``, in order. Text that is not a box is ignored (never raises)."""
    boxes = []
    for m in BOX_RE.finditer(text):
        x1, y1, x2, y2 = (float(g) for g in m.groups()[:4])
        theta = None if m.group(5) is None else float(m.group(5))
        boxes.append(Box(x1, y1, x2, y2, theta))
    return boxes


def format_boxes(boxes: Iterable[Box]) -> str:
    """Boxes back to back, as GeoChat writes several boxes for one phrase."""
    return "".join(b.to_text() for b in boxes)


def parse_phrases(text: str) -> list[str]:
    """The ``<p>...</p>`` phrases in ``text``."""
    return [p.strip() for p in PHRASE_RE.findall(text)]


def infer_task(first_question: str) -> str:
    """Task of a GeoChat record that carries no ``task`` field, from its task token."""
    if "[grounding]" in first_question:
        return "grounding_description"
    if "[identify]" in first_question:
        return "region_caption"
    if "[refer]" in first_question:
        return "referring"
    return "conversation"


@dataclass(frozen=True)
class Turn:
    role: str
    """'human' or 'gpt'."""
    value: str


@dataclass(frozen=True)
class Record:
    """One validated conversation about one image."""

    id: str
    image: str
    """Image path relative to the prepared data folder (or the raw image folder)."""
    image_id: str
    task: str
    conversations: tuple[Turn, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Optional evaluation ground truth; free-form, JSON-serialisable."""

    @property
    def first_question(self) -> str:
        return self.conversations[0].value

    @property
    def answers(self) -> list[str]:
        return [t.value for t in self.conversations if t.role == "gpt"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "image_id": self.image_id,
            "task": self.task,
            "conversations": [{"from": t.role, "value": t.value} for t in self.conversations],
        }
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


def parse_record(obj: Any, *, source: str, index: int, require_task: bool = True) -> Record:
    """Validate one JSON object as a record; a DataError names the file, record and field.

    ``source`` is the file the object came from, ``index`` its position (used when it has no id).
    With ``require_task=False`` (GeoChat's own JSON) the task is inferred from the task tokens.
    """
    rid = obj.get("id") if isinstance(obj, dict) else None
    where = f"{source}: record {rid!r}" if rid is not None else f"{source}: record #{index}"

    def fail(fld: str, msg: str) -> DataError:
        return DataError(f"{where}, field '{fld}': {msg}")

    if not isinstance(obj, dict):
        raise fail("<record>", f"expected a JSON object, got {type(obj).__name__}")
    for fld in ("id", "image"):
        if not isinstance(obj.get(fld), str | int) or str(obj.get(fld)).strip() == "":
            raise fail(fld, "missing or empty (a non-empty string is required)")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise fail("conversations", "missing or not a non-empty list of {from, value} turns")
    turns = []
    for i, t in enumerate(convs):
        f = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise fail(f, "a turn must be an object with 'from' and 'value'")
        role, value = t.get("from"), t.get("value")
        if role not in ROLES:
            raise fail(f"{f}.from", f"unknown role {role!r}; expected one of {ROLES}")
        expected = ROLES[i % 2]
        if role != expected:
            raise fail(f"{f}.from", f"turns must alternate human/gpt starting with human; got {role!r}")
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{f}.value", "empty " + ("answer" if role == "gpt" else "question"))
        turns.append(Turn(role, value))
    if turns[-1].role != "gpt":
        raise fail(f"conversations[{len(turns) - 1}]", "the conversation must end with a gpt answer")
    if IMAGE_PLACEHOLDER not in turns[0].value:
        raise fail("conversations[0].value", f"the first human turn must contain {IMAGE_PLACEHOLDER}")
    for i, t in enumerate(turns):
        if i > 0 and IMAGE_PLACEHOLDER in t.value:
            raise fail(f"conversations[{i}].value", f"{IMAGE_PLACEHOLDER} may appear only in the first turn")
        for b in parse_boxes(t.value):
            problems = b.problems()
            if problems:
                raise fail(f"conversations[{i}].value", f"bad box {b.to_text()}: {'; '.join(problems)}")
    task = obj.get("task")
    if task is None and not require_task:
        task = infer_task(turns[0].value)
    if task not in TASKS:
        raise fail("task", f"unknown task {task!r}; expected one of {TASKS}")
    image = str(obj["image"])
    image_id = obj.get("image_id", image.rsplit("/", 1)[-1].rsplit(".", 1)[0])
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise fail("meta", "must be an object")
    return Record(str(obj["id"]), image, str(image_id), task, tuple(turns), meta)


class ImageChecks:
    """The images records name under one folder, each checked once: inside the folder and decodable whole.

    A record's ``image`` is a path relative to its image folder; an absolute path, ``..`` or a symlink
    out of the folder would let a dataset read any file on the machine, and a truncated file must fail
    when the set is loaded, not in the middle of a training or evaluation run.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._problems: dict[str, str | None] = {}

    def problem(self, relative: str) -> str | None:
        """None when ``relative`` is a readable image inside the folder, else why not (file named)."""
        if relative not in self._problems:
            path = inside(self.root, relative)
            self._problems[relative] = (
                f"image path {relative!r} resolves outside the image folder {self.root} (an absolute path, "
                "'..' or a symlink out); records may only name images inside it"
                if path is None
                else image_problem(path)
            )
        return self._problems[relative]
