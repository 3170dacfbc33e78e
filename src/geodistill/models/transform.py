"""The image transform of a LLaVA checkpoint: PIL image -> normalised pixels, as CLIP / GeoChat preprocess.

A checkpoint folder describes it in ``preprocessor_config.json`` (a ``CLIPImageProcessor``-style file that
transformers also reads); a folder without one uses OpenAI CLIP's mean and std.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from geodistill.errors import ModelError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's normalisation mean (LLaVA-1.5 and GeoChat use it)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's normalisation std."""
PREPROCESSOR_FILE = "preprocessor_config.json"


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in (values if isinstance(values, list | tuple) else [values] * 3))
    if len(vals) != 3:
        raise ModelError(f"{PREPROCESSOR_FILE}: {name} must have 3 values (RGB), got {values!r}")
    return vals  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised (3, size, size) float tensor, as CLIP / GeoChat preprocess.

    GeoChat resizes the shortest edge to the tower's size (bicubic) and centre-crops a square (its
    evaluation scripts call the CLIP processor with ``size=crop_size=504``); for the square scenes of
    remote sensing this is a plain square resize.
    """

    size: int
    """Side of the square input of the vision tower (the tower's ``image_size``)."""
    mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float] = CLIP_STD
    """Per-channel std divided by after subtracting the mean."""
    pad_to_square: bool = False
    """LLaVA-1.5's ``image_aspect_ratio: pad``: pad to a square with the mean colour before resizing
    (keeps the whole of a non-square image instead of cropping its long side)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """(3, size, size) float32."""
        img = image.convert("RGB")
        if self.pad_to_square and img.width != img.height:
            side = max(img.width, img.height)
            fill = tuple(round(m * 255) for m in self.mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            img = canvas
        w, h = img.size
        if (w, h) != (self.size, self.size):
            # Shortest edge -> size, keeping the aspect ratio (CLIP's rule), then a centre crop.
            short, long = min(w, h), max(w, h)
            new_long = int(self.size * long / short)
            new = (self.size, new_long) if w <= h else (new_long, self.size)
            img = img.resize(new, Image.Resampling.BICUBIC)
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)  # (3, H, W) in [0, 1]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def batch(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """(B, 3, size, size) float32."""
        return torch.stack([self(im) for im in images])

    def to_preprocessor_config(self) -> dict[str, Any]:
        """A ``CLIPImageProcessor``-style ``preprocessor_config.json`` describing this transform."""
        cfg: dict[str, Any] = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.size},
            "resample": 3,  # PIL bicubic
            "do_center_crop": True,
            "crop_size": {"height": self.size, "width": self.size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }
        if self.pad_to_square:
            cfg["image_aspect_ratio"] = "pad"
        return cfg

    def save(self, path: str | Path) -> None:
        """Write ``preprocessor_config.json`` into the folder ``path``."""
        (Path(path) / PREPROCESSOR_FILE).write_text(
            json.dumps(self.to_preprocessor_config(), indent=2) + "\n"
        )

    @classmethod
    def from_dir(cls, path: str | Path, size: int) -> ImageTransform:
        """The transform of a checkpoint folder: mean/std (and pad mode) from its preprocessor config when
        present, else CLIP's. ``size`` is the tower's ``image_size``, which wins over the file's crop size
        (GeoChat ships a 336 px CLIP processor but runs its tower at 504 px)."""
        file = Path(path) / PREPROCESSOR_FILE
        if not file.is_file():
            return cls(size)
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(
                f"{file}: not valid JSON ({e}); fix or delete it (CLIP defaults are used then)"
            ) from e
        return cls(
            size,
            _triple(raw.get("image_mean", CLIP_MEAN), "image_mean"),
            _triple(raw.get("image_std", CLIP_STD), "image_std"),
            raw.get("image_aspect_ratio") == "pad",
        )
