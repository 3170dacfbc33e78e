"""A procedurally generated remote-sensing benchmark in GeoChat's format (the embedded default).

Real remote-sensing data cannot be downloaded here, so ``prepare`` can generate one, deterministic
from a seed. It is designed to be learnable by tiny LLaVA models in minutes (docs/design.md, "The embedded
experiment"):

- A scene is a ``grid x grid`` lattice of cells, one cell per ViT patch when ``grid = image_size /
  patch_size`` (params.yaml: 64 px, 16 px patches, grid 4), so every object is aligned with patches
  and its box lies on a coarse effective grid while the text keeps GeoChat's 0-100 format.
- Eight scene classes with distinct land-cover textures; the class also decides which objects occur
  and how many, so the class is inferable from pixels and counting is not a majority-answer task.
- Objects (airplane, ship, storage tank, vehicle) have a colour, a size (small = 1 cell, medium =
  2 cells, large = 2x2 cells) and an orientation. Elongated objects are written GeoChat-style as a
  horizontal box rotated by theta in {0, 90} degrees, so rotated-box evaluation is exercised.

Records cover every instruction type of the paper's Table 2; the held-out test split holds the four
evaluation tasks with ground truth in ``meta``.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from geodistill.data.records import SCENE_PROMPT, VQA_SUFFIX, Box, Record, Turn, format_boxes

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

QTYPES = ("presence", "comparison", "count", "rural_urban")


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

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.category}"


@dataclass(frozen=True)
class Scene:
    image_id: str
    scene: str
    objects: tuple[SceneObject, ...]
    image_png: bytes
    size: int

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


def make_scene(image_id: str, seed: int, image_size: int, grid: int, scene: str | None = None) -> Scene:
    """One scene, a pure function of (seed, image_id)."""
    if image_size % grid:
        raise ValueError(f"image_size {image_size} must be a multiple of grid {grid}")
    key = [seed] + [ord(ch) for ch in image_id]
    rng = np.random.default_rng(key)
    scene = scene or SCENES[int(rng.integers(len(SCENES)))]
    img = _texture(scene, image_size, rng)
    objects = _place(scene, grid, rng)
    for obj in objects:
        _draw(img, obj, image_size // grid)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG", optimize=False)
    return Scene(image_id, scene, tuple(objects), buf.getvalue(), image_size)


# ----------------------------------------------------------------------------------------------- records


def _rec(scene: Scene, n: int, task: str, qa: list[tuple[str, str]], meta: dict | None = None) -> Record:
    turns: list[Turn] = []
    for i, (q, a) in enumerate(qa):
        turns += [Turn("human", ("<image>\n" if i == 0 else "") + q), Turn("gpt", a)]
    rid = f"{scene.image_id}-{task}-{n}"
    return Record(rid, f"images/{scene.image_id}.png", scene.image_id, task, tuple(turns), meta or {})


def _where(obj: SceneObject, grid: int) -> str:
    vert = "top" if obj.row + obj.rows / 2 <= grid / 3 else "bottom" if obj.row >= 2 * grid / 3 else "middle"
    hori = "left" if obj.col + obj.cols / 2 <= grid / 3 else "right" if obj.col >= 2 * grid / 3 else "centre"
    return "centre" if (vert, hori) == ("middle", "centre") else f"{vert} {hori}"


def _count_phrase(n: int, category: str) -> str:
    return f"{n} {category if n == 1 else PLURALS[category]}"


def _vqa(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(qtype, question, answer) for each VQA question type."""
    present = sorted({o.category for o in scene.objects})
    cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    a, b = rng.choice(len(CATEGORIES), size=2, replace=False)
    ca, cb = CATEGORIES[a], CATEGORIES[b]
    count_cat = present[int(rng.integers(len(present)))] if present and rng.random() < 0.8 else cat
    return [
        ("presence", f"Is there a {cat} in the image?", "yes" if scene.count(cat) else "no"),
        (
            "comparison",
            f"Are there more {PLURALS[ca]} than {PLURALS[cb]}?",
            "yes" if scene.count(ca) > scene.count(cb) else "no",
        ),
        ("count", f"How many {PLURALS[count_cat]} are there?", str(scene.count(count_cat))),
        (
            "rural_urban",
            "Is this a rural or an urban area?",
            "urban" if scene.scene in URBAN else "rural",
        ),
    ]


def _description(scene: Scene, grid: int, grounded: bool) -> str:
    if not scene.objects:
        return f"The image shows a {scene.scene} area with no notable objects."
    parts = []
    for o in scene.objects:
        if grounded:
            parts.append(f"<p>a {o.phrase}</p> {o.box(grid).to_text()}")
        else:
            parts.append(f"a {o.size} {o.phrase} at the {_where(o, grid)}")
    counts = Counter(o.category for o in scene.objects)
    summary = ", ".join(_count_phrase(n, c) for c, n in sorted(counts.items()))
    return f"The image shows a {scene.scene} area with {summary}: " + "; ".join(parts) + "."


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


def train_records(scene: Scene, grid: int, rng: np.random.Generator) -> list[Record]:
    """Records of every instruction type of the paper's Table 2 for one training image."""
    classes = ", ".join(SCENES)
    recs = [_rec(scene, 0, "scene", [(SCENE_PROMPT.format(classes=classes), scene.scene)])]
    vqa = _vqa(scene, rng)
    # Two VQA records per image, two questions each: VQA is the most frequent instruction type.
    recs.append(_rec(scene, 0, "vqa", [(f"{q} {VQA_SUFFIX}", a) for _, q, a in vqa[:2]]))
    recs.append(_rec(scene, 1, "vqa", [(f"{q} {VQA_SUFFIX}", a) for _, q, a in vqa[2:]]))
    kind = int(rng.integers(3))
    if kind == 0:
        recs.append(
            _rec(
                scene, 0, "description", [("Describe the image in detail.", _description(scene, grid, False))]
            )
        )
    elif kind == 1:
        n_total = len(scene.objects)
        recs.append(
            _rec(
                scene,
                0,
                "conversation",
                [
                    ("What type of area is shown?", f"It is a {scene.scene} area."),
                    (
                        "How many objects can you see?",
                        f"I can see {n_total} object{'s' if n_total != 1 else ''}.",
                    ),
                ],
            )
        )
    else:
        use = "urban" if scene.scene in URBAN else "rural"
        recs.append(
            _rec(
                scene,
                0,
                "complex",
                [
                    (
                        "What is this area likely used for, and why?",
                        f"It is a {use} {scene.scene} area, "
                        f"judging by its land cover and its {len(scene.objects)} visible objects.",
                    )
                ],
            )
        )
    if scene.objects:
        recs.append(
            _rec(
                scene,
                0,
                "grounding_description",
                [("[grounding] Describe the image in detail.", _description(scene, grid, True))],
            )
        )
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        recs.append(_rec(scene, 0, "region_caption", [(f"[identify] {o.box(grid).to_text()}", o.caption)]))
        targets = _referring_targets(scene)
        for n, idx in enumerate(rng.choice(len(targets), size=min(2, len(targets)), replace=False)):
            phrase, objs = targets[int(idx)]
            recs.append(
                _rec(
                    scene,
                    n,
                    "referring",
                    [(f"[refer] <p>{phrase}</p>", format_boxes(o.box(grid) for o in objs))],
                )
            )
    return recs


def test_records(scene: Scene, grid: int, rng: np.random.Generator) -> list[Record]:
    """The four evaluation tasks for one held-out image, with ground truth in ``meta``."""
    size = scene.size
    recs = [
        _rec(
            scene,
            0,
            "scene",
            [(SCENE_PROMPT.format(classes=", ".join(SCENES)), scene.scene)],
            {"label": scene.scene, "classes": list(SCENES)},
        )
    ]
    for n, (qtype, q, a) in enumerate(_vqa(scene, rng)):
        recs.append(_rec(scene, n, "vqa", [(f"{q} {VQA_SUFFIX}", a)], {"qtype": qtype}))
    if scene.objects:
        phrase, objs = _referring_targets(scene)[int(rng.integers(len(_referring_targets(scene))))]
        boxes = [o.box(grid) for o in objs]
        recs.append(
            _rec(
                scene,
                0,
                "referring",
                [(f"[refer] <p>{phrase}</p>", format_boxes(boxes))],
                {
                    "boxes": [b.to_text() for b in boxes],
                    "width": size,
                    "height": size,
                    "size": _size_group(objs),
                    "multi": len(objs) > 1,
                },
            )
        )
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        recs.append(
            _rec(
                scene,
                0,
                "region_caption",
                [(f"[identify] {o.box(grid).to_text()}", o.caption)],
                {"refs": [o.caption, f"a {o.phrase}"]},
            )
        )
    return recs


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
