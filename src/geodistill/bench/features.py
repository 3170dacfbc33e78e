"""Projector-feature storage: bytes per image at GeoChat-13B's shape and reconstruction error per option.

    python -m geodistill.bench.features [--teacher models/teacher] [--grid 36] [--images 8] \\
        [--geochat-images 2] [--poolings 1 2 3 4 6]

Every option is a (``cache.feature_encoding``, ``cache.pooling``) pair (cache.feature_codec,
models.features). Two tables:

(a) **GeoChat-13B shape** (1296 image tokens = 36 x 36 patches, width 5120): the raw bytes per image
    (computed: ``feature_codec.feature_bytes``) and the bytes on disk, measured by writing
    ``--geochat-images`` images through the real store (Blosc zstd-3 + shuffle) and counting the chunk
    files. The data is synthetic ("random-ish"): a smooth spatial field over the patch grid times
    per-channel gains (lognormal, a few outlier channels 20x larger, as LLM hidden states have) plus
    token noise. Real projector outputs compress differently; the raw column is exact.
(b) **Embedded teacher features**: the error of each option on real projector outputs of scenes from
    the synthetic generator. ``--teacher DIR`` loads a trained LLaVA folder (e.g. ``models/teacher``
    after ``dvc repro teacher``); without it the bench builds params.yaml's teacher architecture with
    seeded random weights (untrained: its features have the tower's and projector's statistics, not a
    trained model's). ``--grid G`` builds that architecture at a G x G patch grid (GeoChat's is 36), so
    every pooling of the (a) table applies; the default keeps the embedded 4 x 4 grid.
    ``codec`` columns: error of the decoded features against the pooled float32 features (what the
    encoding loses). ``total`` columns: the decoded pooled features repeated over their pooling block,
    against the raw features (what pooling and encoding lose together; pooling is exact for the
    alignment loss, which pools the student the same way, but the teacher's detail is gone).
    rel MSE = sum (x' - x)^2 / sum x^2; cos = mean over tokens of cos(x', x).
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geodistill.bench.cache import disk_bytes
from geodistill.cache import feature_codec, store
from geodistill.cache.fingerprint import scratch_fingerprint
from geodistill.config import CacheConfig, SyntheticConfig, TeacherConfig
from geodistill.data.synthetic import make_scene
from geodistill.markdown import table
from geodistill.models.checkpoints import ensure_offline, load_for_inference
from geodistill.models.features import pool_image_features
from geodistill.models.llava import build_llava, projector_features
from geodistill.models.tokenizer import build_tokenizer
from geodistill.models.transform import ImageTransform

GEOCHAT_GRID, GEOCHAT_WIDTH = 36, 5120
"""GeoChat-13B: CLIP ViT-L/14 at 504 px (36 x 36 patches, CLS dropped) projected to Vicuna-13B's width."""
MIB = 1 << 20


def random_ish(grid: int, width: int, seed: int) -> np.ndarray:
    """(grid^2, width) float32 features with spatial structure and outlier channels (module docstring)."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(8, 4, 4)).astype(np.float32)  # 8 smooth spatial modes
    field = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None], size=(grid, grid), mode="bilinear", align_corners=True
    )[0].reshape(8, -1).T.numpy()  # (P, 8)
    mix = rng.normal(size=(8, width)).astype(np.float32)  # (8, D)
    gain = rng.lognormal(0.0, 0.5, size=width).astype(np.float32)
    gain[rng.choice(width, size=max(1, width // 500), replace=False)] *= 20.0  # outlier channels
    noise = rng.normal(scale=0.3, size=(grid * grid, width)).astype(np.float32)
    return ((field @ mix + noise) * gain).astype(np.float32)  # (P, D)


def pool(feats: np.ndarray, pooling: int) -> np.ndarray:
    """(P, D) -> (P / pooling^2, D), the cache builder's pooling."""
    return pool_image_features(torch.from_numpy(feats)[None], pooling)[0].numpy()


def unpool(pooled: np.ndarray, grid: int, pooling: int) -> np.ndarray:
    """(P / pooling^2, D) -> (P, D): each pooled token repeated over its pooling x pooling block."""
    g, d = grid // pooling, pooled.shape[-1]
    blocks = pooled.reshape(g, 1, g, 1, d)
    return np.broadcast_to(blocks, (g, pooling, g, pooling, d)).reshape(grid * grid, d)


def errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(relative MSE, mean cosine over tokens) of ``got`` against ``ref``, both (..., P, D)."""
    r, g = ref.astype(np.float64), got.astype(np.float64)
    rel = float(((g - r) ** 2).sum() / max((r**2).sum(), 1e-30))
    norms = np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1)
    cos = float(np.mean((r * g).sum(-1) / np.maximum(norms, 1e-30)))
    return rel, cos


def stored_bytes(images: Sequence[np.ndarray], encoding: str, pooling: int, workdir: Path) -> float:
    """Bytes on disk per image of ``images`` (each (P, D)) written through the store."""
    path = workdir / f"{encoding}-{pooling}.zarr"
    fp = scratch_fingerprint(32000, 1, "float16", pooling, encoding)
    with store.CacheWriter(path, fp).shard("bench") as sw:
        for i, feats in enumerate(images):
            sw.add_image(str(i), pool(feats, pooling))
    group = path / "bench"
    total = sum(disk_bytes(group / name) for name in feature_codec.feature_arrays(encoding))
    shutil.rmtree(path)  # a 13B-shape float32 store is ~27 MB per image
    return total / len(images)


def geochat_rows(n_images: int, poolings: Sequence[int], workdir: Path) -> list[list[object]]:
    images = [random_ish(GEOCHAT_GRID, GEOCHAT_WIDTH, seed) for seed in range(n_images)]
    rows: list[list[object]] = []
    for pooling in poolings:
        tokens = (GEOCHAT_GRID // pooling) ** 2
        for encoding in feature_codec.FEATURE_ENCODINGS:
            raw = feature_codec.feature_bytes(tokens, GEOCHAT_WIDTH, encoding)
            disk = stored_bytes(images, encoding, pooling, workdir) if n_images else math.nan
            pooled = [pool(x, pooling) for x in images]
            decoded = [
                feature_codec.decode_features(feature_codec.encode_features(p, encoding), encoding)
                for p in pooled
            ]
            rel, _ = errors(np.stack(pooled), np.stack(decoded)) if n_images else (math.nan, math.nan)
            fits = "yes" if raw <= MIB else "no"
            rows.append(
                [encoding, pooling, tokens, f"{raw / MIB:.2f}", f"{disk / MIB:.2f}", fits, f"{rel:.1e}"]
            )
    return rows


def teacher_features(teacher: Path | None, grid: int | None, n_images: int) -> tuple[np.ndarray, str]:
    """(I, P, D) float32 projector outputs of ``n_images`` synthetic scenes, and what produced them."""
    if teacher is not None:
        model, _, transform = load_for_inference(teacher, device="cpu")
        what = f"{teacher}"
    else:
        arch = TeacherConfig().arch
        if grid is not None:
            context = max(arch.max_position_embeddings, grid * grid + 64)  # the LLM must fit the image
            arch = replace(arch, image_size=arch.patch_size * grid, max_position_embeddings=context)
        tok = build_tokenizer(["a tiny corpus for a bench tokenizer"], 400)
        model = build_llava(arch, tok, seed=0).eval()
        transform = ImageTransform(arch.image_size)
        side = arch.image_size // arch.patch_size
        what = f"params.yaml teacher arch, random init (seed 0), {side}x{side} patches"
    size = transform.size
    synth = SyntheticConfig()
    scene_grid = synth.grid if size % synth.grid == 0 else 1
    scenes = [make_scene(f"bench{i}", synth.seed, size, scene_grid) for i in range(n_images)]
    pixels = torch.stack([transform(Image.open(io.BytesIO(s.image_png))) for s in scenes])
    with torch.no_grad():
        feats = projector_features(model, pixels).float().numpy()  # (I, P, D)
    return feats, what


def embedded_rows(feats: np.ndarray, poolings: Sequence[int]) -> list[list[object]]:
    p, d = feats.shape[1:]
    grid = math.isqrt(p)
    rows: list[list[object]] = []
    for pooling in [q for q in poolings if grid % q == 0]:
        pooled = pool_image_features(torch.from_numpy(feats), pooling).numpy()  # (I, P', D)
        for encoding in feature_codec.FEATURE_ENCODINGS:
            decoded = feature_codec.decode_features(feature_codec.encode_features(pooled, encoding), encoding)
            c_rel, c_cos = errors(pooled, decoded)
            back = np.stack([unpool(x, grid, pooling) for x in decoded])
            t_rel, t_cos = errors(feats, back)
            raw = feature_codec.feature_bytes(pooled.shape[1], d, encoding)
            codec_err, total_err = [f"{c_rel:.1e}", f"{c_cos:.6f}"], [f"{t_rel:.1e}", f"{t_cos:.4f}"]
            rows.append([encoding, pooling, pooled.shape[1], raw, *codec_err, *total_err])
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m geodistill.bench.features", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--teacher", type=Path, help="LLaVA checkpoint folder (default: build params' teacher)")
    ap.add_argument("--grid", type=int, help="patch grid of the built teacher (default: its own; GeoChat 36)")
    ap.add_argument("--images", type=int, default=8, help="scenes through the teacher (table b)")
    ap.add_argument("--geochat-images", type=int, default=2, help="random-ish images written (table a)")
    ap.add_argument("--poolings", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_offline()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows_a = geochat_rows(args.geochat_images, args.poolings, Path(tmp))
    heads_a = ["encoding", "pooling", "tokens", "raw MiB/image", "disk MiB/image", "<= 1 MiB", "rel MSE"]
    print(
        f"## (a) GeoChat-13B shape: {GEOCHAT_GRID}x{GEOCHAT_GRID} tokens x {GEOCHAT_WIDTH}, "
        f"{args.geochat_images} random-ish images\n"
    )
    print(table(heads_a, rows_a))
    feats, what = teacher_features(args.teacher, args.grid, args.images)
    n, p, d = feats.shape
    print(f"\n## (b) embedded teacher features: {what}; {n} scenes, {p} tokens x {d}\n")
    heads_b = ["encoding", "pooling", "tokens", "raw bytes", "codec rel MSE", "codec cos"]
    heads_b += ["total rel MSE", "total cos"]
    print(table(heads_b, embedded_rows(feats, args.poolings)))
    default = CacheConfig()
    took = time.perf_counter() - t0
    print(f"\npipeline default: feature_encoding {default.feature_encoding}, pooling {default.pooling}")
    print(f"took {took:.0f} s")


if __name__ == "__main__":
    main()
