"""A procedurally generated remote-sensing benchmark in GeoChat's format (the embedded default).

Real remote-sensing data cannot be downloaded here, so ``prepare`` can generate one, deterministic
from a seed. It is designed so that a tiny LLaVA learns it in minutes and a bigger language model learns
it better (docs/design.md, "The embedded benchmark"):

- A scene is a ``grid x grid`` lattice of cells, one cell per ViT patch when ``grid = image_size /
  patch_size`` (params.yaml: 64 px, 16 px patches, grid 4), so every object is aligned with patches
  and its box lies on a coarse effective grid while the text keeps GeoChat's 0-100 format.
- Eight scene classes with distinct land-cover textures; the class also decides which objects occur
  and how many, so the class is inferable from pixels and counting is not a majority-answer task.
- Objects (airplane, ship, storage tank, vehicle) have a colour, a size (small = 1 cell, medium =
  2 cells, large = 2x2 cells) and an orientation. Elongated objects are written GeoChat-style as a
  horizontal box rotated by theta in {0, 90} degrees, so rotated-box evaluation is exercised.

Where capacity matters (the language model reads, binds and counts; the vision towers are equal):
scene prompts list every class under one of two wordings among distractor classes, and the answer is
the listed wording (copied from the prompt); VQA asks attribute-bound presence, count comparisons and
counts within a half of the image; region captions vary template, synonyms, attributes and relations
to the nearest object; referring boxes must be read off the right patches.

Renderings: training images are ``plain`` or ``low_res`` (half resolution, upsampled). The evaluation
sets (:data:`EVAL_SETS`, named in each record's ``meta["set"]``) mirror the paper's benchmarks: scene
``aid`` (a hazy, low-contrast rendering never seen in training, AID's class names lower-cased with
their words hyphenated) and ``ucm`` (a tinted, grainy rendering, UCMerced-style words run together);
VQA ``lr`` (low-resolution images, RSVQA-LR's question types) and ``hr`` (full resolution, HR-style
types); ``geochat`` referring and region captions.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from geodistill.data.records import SCENE_PROMPT, VQA_SUFFIX, Box, Record, Turn, format_boxes

T = TypeVar("T")

SCENES = ("forest", "farmland", "desert", "water", "residential", "industrial", "airport", "harbor")
URBAN = frozenset({"residential", "industrial", "airport", "harbor"})
CATEGORIES = ("airplane", "ship", "storage tank", "vehicle")
PLURALS = {"airplane": "airplanes", "ship": "ships", "storage tank": "storage tanks", "vehicle": "vehicles"}
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 230), "white": (245, 245, 245), "yellow": (240, 220, 30)}

#: Which objects each scene holds: category -> (min, max) count.
SCENE_OBJECTS: dict[str, dict[str, tuple[int, int]]] = {
    "forest": {"vehicle": (0, 1)},
    "farmland": {"vehicle": (0, 2)},
    "desert": {"vehicle": (0, 2)},
    "water": {"ship": (1, 4)},
    "residential": {"vehicle": (2, 6)},
    "industrial": {"storage tank": (1, 4), "vehicle": (0, 3)},
    "airport": {"airplane": (1, 3), "vehicle": (0, 3)},
    "harbor": {"ship": (1, 3), "storage tank": (0, 2)},
}

LR_QTYPES = ("presence", "comparison", "count", "rural_urban")
"""RSVQA-LR's question types (asked about low-resolution images)."""
HR_QTYPES = ("presence", "comparison", "count")
"""HR-style types (full resolution): colour-bound presence, equal/fewer comparisons, counts in a half."""

#: Two training wordings per class; a training prompt lists each class under one of them, at random.
SCENE_NAMES: dict[str, tuple[str, str]] = {
    "forest": ("forest", "woodland"),
    "farmland": ("farmland", "agricultural"),
    "desert": ("desert", "bare land"),
    "water": ("water", "lake"),
    "residential": ("residential", "dense residential"),
    "industrial": ("industrial", "factory area"),
    "airport": ("airport", "airfield"),
    "harbor": ("harbor", "port"),
}
#: Classes that never occur, listed among the real ones so the answer must be read from the image.
DISTRACTORS = (
    "beach", "bridge", "church", "meadow", "stadium", "park", "school", "viaduct", "mountain", "river",
    "baseball diamond", "freeway", "golf course", "overpass", "parking lot", "tennis court",
)  # fmt: skip

RENDERINGS = ("plain", "low_res", "hazy", "tinted")
"""plain and low_res occur in training; hazy (AID-like) and tinted (UCM-like) only in evaluation."""
LOW_RES_SHARE = 0.5
"""Share of training images rendered at low resolution (they carry RSVQA-LR's question types)."""


@dataclass(frozen=True)
class SceneSet:
    """A zero-shot scene-classification set: its rendering and its benchmark's class wording."""

    rendering: str
    names: dict[str, str]
    """Class -> the set's name for it: a training wording, written in the benchmark's style. Only in
    lower case: the embedded tokenizer and models never see a capitalised class name, so AID's own
    "BareLand" comes out as unseen letters that no model can copy (every model scored 0 on it)."""
    distractors: tuple[str, ...]


SCENE_SETS = {
    "aid": SceneSet(
        "hazy",
        {"forest": "forest", "farmland": "farmland", "desert": "bare-land", "water": "lake",
         "residential": "dense-residential", "industrial": "industrial", "airport": "airport",
         "harbor": "port"},
        ("beach", "bridge", "church", "meadow", "mountain", "park", "river", "school", "stadium",
         "viaduct"),
    ),
    "ucm": SceneSet(
        "tinted",
        {"forest": "woodland", "farmland": "agricultural", "desert": "desert", "water": "water",
         "residential": "residential", "industrial": "factoryarea", "airport": "airfield",
         "harbor": "harbor"},
        ("baseballdiamond", "beach", "freeway", "golfcourse", "overpass", "parkinglot", "river",
         "tenniscourt"),
    ),
}  # fmt: skip
VQA_SETS = {"lr": ("low_res", LR_QTYPES), "hr": ("plain", HR_QTYPES)}
"""VQA set -> (rendering of its images, its question types)."""
EVAL_SETS = {"scene": tuple(SCENE_SETS), "vqa": tuple(VQA_SETS), "referring": ("geochat",),
             "region_caption": ("geochat",)}  # fmt: skip
"""The evaluation sets the generator writes per task (``meta["set"]`` of each evaluation record)."""


@dataclass(frozen=True)
class SceneObject:
    category: str
    colour: str
    size: str
    """small (1 cell), medium (2 cells), large (2x2 cells)."""
    row: int
    col: int
    rows: int
    cols: int
    """Extent in cells on screen."""
    theta: int
    """Orientation in degrees (0: long axis horizontal, 90: vertical); 0 for round tanks."""

    def box(self, grid: int) -> Box:
        """GeoChat box: elongated objects as a horizontal box rotated by 90 when they stand vertical."""
        cell = 100.0 / grid
        x1, y1 = self.col * cell, self.row * cell
        x2, y2 = (self.col + self.cols) * cell, (self.row + self.rows) * cell
        if self.rows > self.cols:  # vertical: same centre, long side written horizontally, theta 90
            cx, cy, half_long, half_short = (x1 + x2) / 2, (y1 + y2) / 2, (y2 - y1) / 2, (x2 - x1) / 2
            x1, x2, y1, y2 = cx - half_long, cx + half_long, cy - half_short, cy + half_short
        return Box(*(round(v) for v in (x1, y1, x2, y2)), theta=self.theta)

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.category}"


@dataclass(frozen=True)
class Scene:
    image_id: str
    scene: str
    objects: tuple[SceneObject, ...]
    image_png: bytes
    size: int
    rendering: str = "plain"

    def count(self, category: str) -> int:
        return sum(o.category == category for o in self.objects)


# --------------------------------------------------------------------------------------------- rendering


def _texture(scene: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Land-cover texture, (size, size, 3) float in [0, 255]; each class has its own colour and pattern."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    noise = rng.normal(0, 1, (size, size, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if scene == "forest":
        base = np.array([30, 90, 35]) + 18 * noise * np.array([0.5, 1, 0.5])
    elif scene == "farmland":
        stripe = (np.sin(x / 3.0 + phase) > 0)[..., None]
        base = np.where(stripe, [120, 170, 60], [190, 170, 90]) + 6 * noise
    elif scene == "desert":
        dune = np.sin((x + y) / 5.0 + phase)[..., None]
        base = np.array([215, 185, 130]) + 15 * dune + 4 * noise
    elif scene == "water":
        base = np.array([25, 60, 130]) + 8 * noise
    elif scene == "residential":
        houses = ((x.astype(int) % 6 < 3) & (y.astype(int) % 6 < 3))[..., None]
        base = np.where(houses, [170, 90, 80], [150, 150, 145]) + 5 * noise
    elif scene == "industrial":
        blocks = ((x.astype(int) // 12 + y.astype(int) // 12) % 2 == 0)[..., None]
        base = np.where(blocks, [110, 110, 120], [160, 160, 165]) + 5 * noise
    elif scene == "airport":
        base = np.array([105, 115, 95]) + 5 * noise
        runway = (np.abs(y - size / 2 - rng.integers(-4, 5)) < size / 10)[..., None]
        base = np.where(runway, [60, 60, 60], base)
    elif scene == "harbor":
        water = (x < size / 2)[..., None] if rng.random() < 0.5 else (x >= size / 2)[..., None]
        base = np.where(water, [25, 60, 130], [175, 170, 160]) + 5 * noise
    else:
        raise ValueError(f"unknown scene {scene!r}")
    return np.broadcast_to(base, (size, size, 3)).astype(np.float32)


def _draw(img: np.ndarray, obj: SceneObject, cell: int) -> None:
    """Draw one object into its cells with a category-specific shape."""
    colour = np.array(COLOURS[obj.colour], dtype=np.float32)
    r0, c0 = obj.row * cell, obj.col * cell
    h, w = obj.rows * cell, obj.cols * cell
    m = max(1, cell // 8)  # margin so neighbouring objects stay apart
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    if obj.category == "storage tank":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (min(h, w) / 2 - m) ** 2
    elif obj.category == "ship":
        # a hull with a pointed bow along the long axis
        along, across, length = (xx, yy, w) if w >= h else (yy, xx, h)
        half = (min(h, w) / 2 - m) * np.clip((length - along) / (length / 3), 0, 1)
        mask = (np.abs(across - (min(h, w) - 1) / 2) <= half) & (along >= m)
    elif obj.category == "airplane":
        horizontal = obj.theta == 0
        body = np.abs(yy - cy) <= max(1, h // 10) if horizontal else np.abs(xx - cx) <= max(1, w // 10)
        wings = np.abs(xx - cx) <= max(1, w // 8) if horizontal else np.abs(yy - cy) <= max(1, h // 8)
        inner = (yy >= m) & (yy < h - m) & (xx >= m) & (xx < w - m)
        mask = (body | wings) & inner
    else:  # vehicle: a small rectangle, long side along the orientation
        if obj.theta == 0:
            mask = (np.abs(yy - cy) <= h / 5) & (np.abs(xx - cx) <= w / 3)
        else:
            mask = (np.abs(yy - cy) <= h / 3) & (np.abs(xx - cx) <= w / 5)
    region = img[r0 : r0 + h, c0 : c0 + w]
    region[mask] = colour


def _place(scene: str, grid: int, rng: np.random.Generator) -> list[SceneObject]:
    """Choose objects for a scene and place them on free cells without overlap."""
    free = np.ones((grid, grid), dtype=bool)
    objects: list[SceneObject] = []
    for category, (lo, hi) in SCENE_OBJECTS[scene].items():
        for _ in range(int(rng.integers(lo, hi + 1))):
            if category == "vehicle":
                size, shapes = "small", [(1, 1)]
            elif category == "storage tank":
                size = "small" if rng.random() < 0.5 else "large"
                shapes = [(1, 1)] if size == "small" else [(2, 2)]
            elif category == "ship":
                size, shapes = "medium", [(1, 2), (2, 1)]
            else:
                size, shapes = "large", [(2, 2)]
            rows, cols = shapes[int(rng.integers(len(shapes)))]
            if category == "storage tank":
                theta = 0
            elif rows != cols:
                theta = 90 if rows > cols else 0
            else:
                theta = 90 * int(rng.integers(2))
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            # A vertical elongated object is written as a rotated horizontal box, which must stay on the grid.
            spots = [
                (r, c)
                for r in range(grid - rows + 1)
                for c in range(grid - cols + 1)
                if free[r : r + rows, c : c + cols].all()
                and not SceneObject(category, colour, size, r, c, rows, cols, theta).box(grid).problems()
            ]
            if not spots:
                break
            r, c = spots[int(rng.integers(len(spots)))]
            free[r : r + rows, c : c + cols] = False
            objects.append(SceneObject(category, colour, size, r, c, rows, cols, theta))
    return objects


def _render(img: np.ndarray, rendering: str, rng: np.random.Generator) -> np.ndarray:
    """The sensor: ``img`` (size, size, 3) float as a ``rendering`` sees it (see RENDERINGS)."""
    if rendering == "plain":
        return img
    if rendering == "low_res":  # half resolution, upsampled back: RSVQA-LR's coarse pixels
        h, w, _ = img.shape
        small = img.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        return small.repeat(2, axis=0).repeat(2, axis=1)
    if rendering == "hazy":  # atmospheric haze: lower contrast, brighter, a little sensor noise
        return 0.65 * img + 70 + rng.normal(0, 4, img.shape)
    if rendering == "tinted":  # another sensor's colour balance and grain
        return img * np.array([1.12, 1.0, 0.8]) + 12 + rng.normal(0, 9, img.shape)
    raise ValueError(f"unknown rendering {rendering!r}; expected one of {RENDERINGS}")


def _key(seed: int, image_id: str, *extra: int) -> list[int]:
    return [seed, *extra] + [ord(ch) for ch in image_id]


def train_rendering(image_id: str, seed: int) -> str:
    """plain or low_res for a training image, from its own stream (the scene's content stays the same)."""
    return "low_res" if np.random.default_rng(_key(seed, image_id, 101)).random() < LOW_RES_SHARE else "plain"


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_scene(
    image_id: str,
    seed: int,
    image_size: int,
    grid: int,
    scene: str | None = None,
    rendering: str = "plain",
    content_id: str | None = None,
) -> Scene:
    """One scene, a pure function of (seed, content_id, rendering); ``content_id`` (default: the
    image id) decides what is on the ground, so several renderings of one scene share it."""
    if image_size % grid:
        raise ValueError(f"image_size {image_size} must be a multiple of grid {grid}")
    content_id = content_id or image_id
    rng = np.random.default_rng(_key(seed, content_id))
    scene = scene or SCENES[int(rng.integers(len(SCENES)))]
    img = _texture(scene, image_size, rng)
    objects = _place(scene, grid, rng)
    for obj in objects:
        _draw(img, obj, image_size // grid)
    if rendering not in RENDERINGS:
        raise ValueError(f"unknown rendering {rendering!r}; expected one of {RENDERINGS}")
    # The sensor's noise has its own stream: every rendering of a content_id shows the same ground.
    sensor = np.random.default_rng(_key(seed, content_id, 1 + RENDERINGS.index(rendering)))
    img = _render(img, rendering, sensor)
    return Scene(image_id, scene, tuple(objects), _png(img), image_size, rendering)


def one_object_scene(image_id: str, seed: int, image_size: int, grid: int) -> Scene:
    """A scene with exactly one one-cell object (random category, colour and cell) on a random land cover,
    plain rendering: the simplest "where is it?" question (``geodistill.bench.locate``)."""
    rng = np.random.default_rng(_key(seed, image_id, 202))
    scene = SCENES[int(rng.integers(len(SCENES)))]
    img = _texture(scene, image_size, rng)
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    row, col = (int(v) for v in rng.integers(grid, size=2))
    obj = SceneObject(category, colour, "small", row, col, 1, 1, 0)
    _draw(img, obj, image_size // grid)
    return Scene(image_id, scene, (obj,), _png(img), image_size)


def one_object_referring(scene: Scene, grid: int) -> Record:
    """The referring record of a :func:`one_object_scene`: "the <category>" -> the object's box."""
    o = scene.objects[0]
    return _rec(scene, 0, "referring", [(f"[refer] <p>the {o.category}</p>", format_boxes([o.box(grid)]))])


# ----------------------------------------------------------------------------------------------- records


def _rec(scene: Scene, n: int, task: str, qa: list[tuple[str, str]], meta: dict | None = None) -> Record:
    turns: list[Turn] = []
    for i, (q, a) in enumerate(qa):
        turns += [Turn("human", ("<image>\n" if i == 0 else "") + q), Turn("gpt", a)]
    rid = f"{scene.image_id}-{task}-{n}"
    return Record(rid, f"images/{scene.image_id}.png", scene.image_id, task, tuple(turns), meta or {})


def article(phrase: str) -> str:
    """``phrase`` with its indefinite article: "an airport", "a red ship"."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def _where(obj: SceneObject, grid: int) -> str:
    vert = "top" if obj.row + obj.rows / 2 <= grid / 3 else "bottom" if obj.row >= 2 * grid / 3 else "middle"
    hori = "left" if obj.col + obj.cols / 2 <= grid / 3 else "right" if obj.col >= 2 * grid / 3 else "centre"
    return "centre" if (vert, hori) == ("middle", "centre") else f"{vert} {hori}"


def _count_phrase(n: int, category: str) -> str:
    return f"{n} {category if n == 1 else PLURALS[category]}"


# -- scene prompts: the class list (with distractors) is part of the question, the answer is copied from it


def scene_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """(question, answer, listed classes) of a training prompt: every class under a random wording,
    0-6 distractors, shuffled; the answer is the listed wording of the true class."""
    names = {c: _pick(rng, SCENE_NAMES[c]) for c in SCENES}
    k = int(rng.integers(0, 7))
    extra = [DISTRACTORS[int(i)] for i in rng.choice(len(DISTRACTORS), size=k, replace=False)]
    listed = [*names.values(), *extra]
    listed = [listed[int(i)] for i in rng.permutation(len(listed))]
    return SCENE_PROMPT.format(classes=", ".join(listed)), names[scene.scene], listed


def scene_set_question(scene: Scene, set_name: str) -> tuple[str, str, list[str]]:
    """(question, answer, classes) of a zero-shot set: its own wording, alphabetical, fixed."""
    s = SCENE_SETS[set_name]
    classes = sorted([*s.names.values(), *s.distractors], key=str.lower)
    return SCENE_PROMPT.format(classes=", ".join(classes)), s.names[scene.scene], classes


# -- VQA


def _vqa_lr(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(qtype, question, answer) for each of RSVQA-LR's question types."""
    present = sorted({o.category for o in scene.objects})
    cat = _pick(rng, CATEGORIES)
    a, b = rng.choice(len(CATEGORIES), size=2, replace=False)
    ca, cb = CATEGORIES[a], CATEGORIES[b]
    count_cat = _pick(rng, present) if present and rng.random() < 0.8 else cat
    return [
        ("presence", f"Is there {article(cat)} in the image?", "yes" if scene.count(cat) else "no"),
        (
            "comparison",
            f"Are there more {PLURALS[ca]} than {PLURALS[cb]}?",
            "yes" if scene.count(ca) > scene.count(cb) else "no",
        ),
        ("count", f"How many {PLURALS[count_cat]} are there?", str(scene.count(count_cat))),
        ("rural_urban", "Is this a rural or an urban area?", "urban" if scene.scene in URBAN else "rural"),
    ]


HALVES = ("top", "bottom", "left", "right")


def _in_half(o: SceneObject, half: str, grid: int) -> bool:
    h = grid // 2
    if half in ("top", "bottom"):
        return o.row + o.rows <= h if half == "top" else o.row >= h
    return o.col + o.cols <= h if half == "left" else o.col >= h


def _vqa_hr(scene: Scene, grid: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(qtype, question, answer) for the HR-style types: what needs binding colour to category, comparing
    two counts, and counting within a region."""
    phrases = sorted({o.phrase for o in scene.objects})
    if phrases and rng.random() < 0.5:
        phrase = _pick(rng, phrases)
    else:
        phrase = f"{_pick(rng, list(COLOURS))} {_pick(rng, CATEGORIES)}"
    present = "yes" if phrase in phrases else "no"
    a, b = rng.choice(len(CATEGORIES), size=2, replace=False)
    ca, cb = CATEGORIES[a], CATEGORIES[b]
    if rng.random() < 0.5:
        comparison = (f"Is the number of {PLURALS[ca]} equal to the number of {PLURALS[cb]}?",
                      scene.count(ca) == scene.count(cb))  # fmt: skip
    else:
        comparison = (f"Are there fewer {PLURALS[ca]} than {PLURALS[cb]}?", scene.count(ca) < scene.count(cb))
    half = _pick(rng, HALVES)
    n_half = sum(_in_half(o, half, grid) for o in scene.objects)
    return [
        ("presence", f"Is there {article(phrase)} in the image?", present),
        ("comparison", comparison[0], "yes" if comparison[1] else "no"),
        ("count", f"How many objects lie entirely in the {half} half of the image?", str(n_half)),
    ]


def vqa_questions(scene: Scene, grid: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """The question types of the image's resolution: RSVQA-LR's on low_res, the HR ones otherwise."""
    return _vqa_lr(scene, rng) if scene.rendering == "low_res" else _vqa_hr(scene, grid, rng)


# -- region captions: several templates, synonyms, attributes and a relation to the nearest object

NOUNS = {
    "airplane": ("airplane", "plane", "aircraft"),
    "ship": ("ship", "boat", "vessel"),
    "storage tank": ("storage tank", "oil tank", "tank"),
    "vehicle": ("vehicle", "car", "small vehicle"),
}
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "mid-sized"), "large": ("large", "big")}
N_CAPTION_TEMPLATES = 5


def _relation(o: SceneObject, other: SceneObject) -> str:
    """Where ``o`` lies relative to ``other`` (centre to centre, the larger offset wins)."""
    dy = (o.row + o.rows / 2) - (other.row + other.rows / 2)
    dx = (o.col + o.cols / 2) - (other.col + other.cols / 2)
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _nearest(o: SceneObject, objects: Sequence[SceneObject]) -> SceneObject | None:
    others = [x for x in objects if x is not o]
    if not others:
        return None
    return min(others, key=lambda x: (abs(x.row - o.row) + abs(x.col - o.col), x.row, x.col))


def region_caption(o: SceneObject, scene: Scene, grid: int, template: int, rng: np.random.Generator) -> str:
    """A caption of object ``o`` in one of N_CAPTION_TEMPLATES word orders, with synonyms."""
    noun, size = _pick(rng, NOUNS[o.category]), _pick(rng, SIZE_WORDS[o.size])
    if template == 0:
        return article(f"{size} {o.colour} {noun}")
    if template == 1:
        return f"{article(f'{o.colour} {noun}')} in the {_where(o, grid)} of the image"
    if template == 2:
        other = _nearest(o, scene.objects)
        if other is None:
            return f"{article(f'{o.colour} {noun}')}, the only object in the image"
        return f"{article(f'{o.colour} {noun}')} {_relation(o, other)} {article(other.phrase)}"
    if template == 3:
        return f"{article(noun)}, {o.colour} and {size}"
    n = scene.count(o.category)
    if n == 1:
        return f"the only {noun} in the image, {o.colour}"
    return f"one of {n} {PLURALS[o.category]}: the {o.colour} one"


def _captions(o: SceneObject, scene: Scene, grid: int, rng: np.random.Generator, n: int) -> list[str]:
    templates = rng.choice(N_CAPTION_TEMPLATES, size=n, replace=False)
    return [region_caption(o, scene, grid, int(t), rng) for t in templates]


# -- descriptions and referring


def _description(scene: Scene, grid: int, grounded: bool) -> str:
    area = article(f"{scene.scene} area")
    if not scene.objects:
        return f"The image shows {area} with no notable objects."
    parts = []
    for o in scene.objects:
        if grounded:
            parts.append(f"<p>{article(o.phrase)}</p> {o.box(grid).to_text()}")
        else:
            parts.append(f"{article(f'{o.size} {o.phrase}')} at the {_where(o, grid)}")
    counts = Counter(o.category for o in scene.objects)
    summary = ", ".join(_count_phrase(n, c) for c, n in sorted(counts.items()))
    return f"The image shows {area} with {summary}: " + "; ".join(parts) + "."


def _referring_targets(scene: Scene) -> list[tuple[str, list[SceneObject]]]:
    """Phrases that pick out a set of objects: colour + category, or all objects of a category."""
    out = []
    for phrase in sorted({o.phrase for o in scene.objects}):
        out.append((f"the {phrase}", [o for o in scene.objects if o.phrase == phrase]))
    for cat in sorted({o.category for o in scene.objects}):
        objs = [o for o in scene.objects if o.category == cat]
        out.append((f"all {PLURALS[cat]}", objs))
    return out


def _size_group(objs: list[SceneObject]) -> str:
    sizes = {o.size for o in objs}
    return sizes.pop() if len(sizes) == 1 else "mixed"


def _some(rng: np.random.Generator, n_items: int, k: int) -> list[int]:
    return [int(i) for i in rng.choice(n_items, size=min(k, n_items), replace=False)]


# -- training records


def _chat_record(scene: Scene, rng: np.random.Generator, grid: int) -> Record:
    """One description, conversation or complex-reasoning record."""
    kind = int(rng.integers(3))
    if kind == 0:
        qa = [("Describe the image in detail.", _description(scene, grid, False))]
        return _rec(scene, 0, "description", qa)
    n_total = len(scene.objects)
    if kind == 1:
        objects = f"{n_total} object{'s' if n_total != 1 else ''}"
        qa = [("What type of area is shown?", f"It is {article(scene.scene + ' area')}."),
              ("How many objects can you see?", f"I can see {objects}.")]  # fmt: skip
        return _rec(scene, 0, "conversation", qa)
    use = "urban" if scene.scene in URBAN else "rural"
    answer = (f"It is {article(f'{use} {scene.scene} area')}, "
              f"judging by its land cover and its {n_total} visible objects.")  # fmt: skip
    return _rec(scene, 0, "complex", [("What is this area likely used for, and why?", answer)])


def train_records(scene: Scene, grid: int, rng: np.random.Generator) -> list[Record]:
    """Records of every instruction type of the paper's Table 2 for one training image."""
    q, a, _ = scene_question(scene, rng)
    recs = [_rec(scene, 0, "scene", [(q, a)])]
    # Shuffled so every question type opens a conversation as often as it follows one: evaluation asks each
    # type alone, and a fixed order taught the teacher to answer the first turn by its position (rural/urban
    # answered with a count).
    questions = vqa_questions(scene, grid, rng)
    vqa = [questions[i] for i in rng.permutation(len(questions))]
    # Two VQA records per image (LR 2 + 2 questions, HR 2 + 1): VQA is the most frequent instruction type.
    recs.append(_rec(scene, 0, "vqa", [(f"{q} {VQA_SUFFIX}", a) for _, q, a in vqa[:2]]))
    recs.append(_rec(scene, 1, "vqa", [(f"{q} {VQA_SUFFIX}", a) for _, q, a in vqa[2:]]))
    recs.append(_chat_record(scene, rng, grid))
    if not scene.objects:
        return recs
    prompt = "[grounding] Describe the image in detail."
    recs.append(_rec(scene, 0, "grounding_description", [(prompt, _description(scene, grid, True))]))
    for n, i in enumerate(_some(rng, len(scene.objects), 2)):
        o = scene.objects[i]
        caption = _captions(o, scene, grid, rng, 1)[0]
        recs.append(_rec(scene, n, "region_caption", [(f"[identify] {o.box(grid).to_text()}", caption)]))
    targets = _referring_targets(scene)
    for n, i in enumerate(_some(rng, len(targets), 3)):
        phrase, objs = targets[i]
        answer = format_boxes(o.box(grid) for o in objs)
        recs.append(_rec(scene, n, "referring", [(f"[refer] <p>{phrase}</p>", answer)]))
    return recs


# -- evaluation records


def _scene_set_records(scene: Scene, set_name: str) -> list[Record]:
    q, a, classes = scene_set_question(scene, set_name)
    return [_rec(scene, 0, "scene", [(q, a)], {"set": set_name, "label": a, "classes": classes})]


def _vqa_set_records(scene: Scene, set_name: str, grid: int, rng: np.random.Generator) -> list[Record]:
    return [
        _rec(scene, n, "vqa", [(f"{q} {VQA_SUFFIX}", a)], {"set": set_name, "qtype": qtype})
        for n, (qtype, q, a) in enumerate(vqa_questions(scene, grid, rng))
    ]


def _grounding_records(scene: Scene, grid: int, rng: np.random.Generator) -> list[Record]:
    """Two referring and two region-caption items (fewer when the scene has fewer targets/objects)."""
    recs = []
    targets = _referring_targets(scene)
    for n, i in enumerate(_some(rng, len(targets), 2)):
        phrase, objs = targets[i]
        boxes = [o.box(grid) for o in objs]
        meta = {"set": "geochat", "boxes": [b.to_text() for b in boxes], "width": scene.size,
                "height": scene.size, "size": _size_group(objs), "multi": len(objs) > 1}  # fmt: skip
        recs.append(_rec(scene, n, "referring", [(f"[refer] <p>{phrase}</p>", format_boxes(boxes))], meta))
    for n, i in enumerate(_some(rng, len(scene.objects), 2)):
        o = scene.objects[i]
        refs = _captions(o, scene, grid, rng, 2)  # two annotators' wordings; the first is the answer
        q = f"[identify] {o.box(grid).to_text()}"
        recs.append(_rec(scene, n, "region_caption", [(q, refs[0])], {"set": "geochat", "refs": refs}))
    return recs


def eval_scenes(
    content_id: str, seed: int, image_size: int, grid: int, rng: np.random.Generator
) -> list[tuple[Scene, list[Record]]]:
    """Every evaluation set's items about one held-out scene, each set on its own rendering of it
    (image ``<content_id>_<set>``): scene aid/ucm, VQA lr/hr, referring and region captions on hr."""
    out = []
    for name, s in SCENE_SETS.items():
        scene = make_scene(f"{content_id}_{name}", seed, image_size, grid, rendering=s.rendering,
                           content_id=content_id)  # fmt: skip
        out.append((scene, _scene_set_records(scene, name)))
    for name, (rendering, _) in VQA_SETS.items():
        scene = make_scene(f"{content_id}_{name}", seed, image_size, grid, rendering=rendering,
                           content_id=content_id)  # fmt: skip
        recs = _vqa_set_records(scene, name, grid, rng)
        if name == "hr":
            recs += _grounding_records(scene, grid, rng)
        out.append((scene, recs))
    return out


# ------------------------------------------------------------------------------------------- the corpus


def pretrain_texts(seed: int, n: int) -> Iterator[str]:
    """A small text-only corpus (D_PT) about remote-sensing scenes, for the language-modelling loss."""
    rng = np.random.default_rng([seed, 7])
    facts = {
        "forest": "dense tree cover",
        "farmland": "striped crop fields",
        "desert": "sand dunes",
        "water": "open water",
        "residential": "rows of houses",
        "industrial": "large buildings",
        "airport": "a long runway",
        "harbor": "a shoreline with piers",
    }
    hosts = {c: [s for s, objs in SCENE_OBJECTS.items() if c in objs] for c in CATEGORIES}
    for _ in range(n):
        s = SCENES[int(rng.integers(len(SCENES)))]
        c = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        k = int(rng.integers(1, 6))
        yield (
            f"A {s} area in an aerial image shows {facts[s]}. It is a "
            f"{'urban' if s in URBAN else 'rural'} area. {PLURALS[c].capitalize()} are often seen in "
            f"{' and '.join(hosts[c])} scenes. An image with {_count_phrase(k, c)} has {k} "
            f"{'object' if k == 1 else 'objects'} of that kind."
        )


def write_pretrain(path: Path, seed: int, n: int) -> int:
    with path.open("w") as f:
        for i, text in enumerate(pretrain_texts(seed, n)):
            f.write(json.dumps({"id": f"pt-{i}", "text": text}) + "\n")
    return n
