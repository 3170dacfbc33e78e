"""The CLIP / GeoChat image transform: resize, crop or pad, normalise; its preprocessor_config.json."""

from __future__ import annotations

import json

import torch
from PIL import Image

from geodistill.models.transform import ImageTransform


def test_image_transform(tmp_path):
    t = ImageTransform(32)
    wide = Image.new("RGB", (64, 40), (255, 0, 0))
    x = t(wide)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # A flat colour stays flat, normalised channel by channel.
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(t.mean)) / torch.tensor(t.std)
    assert torch.allclose(x[:, 5, 5], expected, atol=1e-5)
    assert t.batch([wide, wide.convert("L")]).shape == (2, 3, 32, 32)
    # Padding to a square keeps the whole image: the mean-coloured border normalises to ~0.
    padded = ImageTransform(32, pad_to_square=True)(wide)
    assert padded[:, 0, 16].abs().max() < 0.02
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    loaded = ImageTransform.from_dir(tmp_path, 32)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)
    padded_t = ImageTransform(48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), pad_to_square=True)
    padded_t.save(tmp_path)
    assert ImageTransform.from_dir(tmp_path, 48) == padded_t
    assert ImageTransform.from_dir(tmp_path / "none", 16) == ImageTransform(16)


def test_image_transform_matches_transformers_clip_processor(tmp_path):
    from transformers import AutoImageProcessor

    t = ImageTransform(32)
    t.save(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    pixels = torch.randint(0, 256, (48, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(t(image), expected, atol=1e-5)
