"""WebDataset shards: one sample per unique image holding all its records, plus a manifest.

Sample layout (docs/design.md, "Shard sample")::

    <key>.png | <key>.jpg   original image bytes
    <key>.json              {"image_id", "width", "height", "records": [record, ...]}

``manifest.json`` lists every shard with its sample and record counts, byte size and sha256, the
totals, and a hash of the prepared input, so readers (and the teacher cache) can tell when shards
are stale, truncated or modified. Writing streams the prepared JSONL, so GeoChat's 318k records never
sit in memory at once; the input must list each image's records consecutively (``prepare`` does).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from geodistill.data.records import Record, parse_record
from geodistill.errors import DataError, ShardError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sample_key(image_id: str, index: int) -> str:
    """A WebDataset key: no dots (they split extensions), unique by position."""
    return f"{index:08d}_{_KEY_BAD.sub('-', image_id)[:80]}"


@dataclass(frozen=True)
class ImageSample:
    """One shard sample: an image and all of its records."""

    key: str
    image_id: str
    image_bytes: bytes
    image_ext: str
    width: int
    height: int
    records: tuple[Record, ...]

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.image_bytes)).convert("RGB")


def group_by_image(records: Iterable[Record], source: str) -> Iterator[list[Record]]:
    """Consecutive records of the same image; an image that comes back later is an error."""
    seen: set[str] = set()
    group: list[Record] = []
    for rec in records:
        if group and rec.image_id != group[0].image_id:
            yield group
            group = []
        if not group:
            if rec.image_id in seen:
                raise DataError(
                    f"{source}: record {rec.id!r}, field 'image_id': image {rec.image_id!r} appears again "
                    "after other images; records must be grouped by image (re-run `dvc repro prepare`)"
                )
            seen.add(rec.image_id)
        group.append(rec)
    if group:
        yield group


def read_jsonl_records(path: Path) -> Iterator[Record]:
    """Stream prepared records; a bad line raises a DataError naming file, line and field."""
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from e
            yield parse_record(obj, source=f"{path}:{lineno}", index=lineno - 1)


def _encode_sample(group: list[Record], index: int, image_root: Path, source: Path) -> dict[str, Any]:
    first = group[0]
    img_path = image_root / first.image
    try:
        data = img_path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format
            if fmt not in ("PNG", "JPEG"):
                # Re-encode other formats (tif, bmp ...) losslessly so readers only meet png/jpg.
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                data, fmt = buf.getvalue(), "PNG"
    except (OSError, ValueError) as e:
        raise DataError(f"{source}: record {first.id!r}, field 'image': cannot read {img_path}: {e}") from e
    meta = {
        "image_id": first.image_id,
        "width": width,
        "height": height,
        "records": [r.to_dict() for r in group],
    }
    ext = "jpg" if fmt == "JPEG" else "png"
    return {"__key__": sample_key(first.image_id, index), ext: data, "json": json.dumps(meta).encode()}


def write_shards(
    records_jsonl: Path,
    image_root: Path,
    out_dir: Path,
    *,
    maxcount: int,
    maxsize: int,
    prefix: str = "shard",
) -> dict[str, Any]:
    """Write ``out_dir/{prefix}-NNNNNN.tar`` and ``out_dir/manifest.json``; return the manifest.

    Deterministic: same input and params give byte-identical tars (fixed mtime, stable order).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{prefix}-*.tar"):
        old.unlink()
    shards_meta: list[dict[str, Any]] = []
    writer: wds.TarWriter | None = None
    size = 0

    def close() -> None:
        if writer is not None:
            writer.close()

    try:
        for index, group in enumerate(group_by_image(read_jsonl_records(records_jsonl), str(records_jsonl))):
            sample = _encode_sample(group, index, image_root, records_jsonl)
            n_bytes = sum(len(v) for k, v in sample.items() if k != "__key__")
            # Roll over before this sample when the shard is full (by count, or by bytes if non-empty).
            if (
                writer is None
                or shards_meta[-1]["samples"] >= maxcount
                or (size and size + n_bytes > maxsize)
            ):
                close()
                name = f"{prefix}-{len(shards_meta):06d}.tar"
                writer = wds.TarWriter(str(out_dir / name), mtime=0.0)
                shards_meta.append({"name": name, "samples": 0, "records": 0})
                size = 0
            writer.write(sample)
            size += n_bytes
            shards_meta[-1]["samples"] += 1
            shards_meta[-1]["records"] += len(group)
    finally:
        close()
    shards = []
    for meta in shards_meta:
        p = out_dir / meta["name"]
        shards.append({**meta, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(records_jsonl),
        "source_sha256": sha256_file(records_jsonl),
        "shards": shards,
        "totals": {k: sum(s[k] for s in shards) for k in ("samples", "records", "bytes")},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def manifest_hash(manifest: dict[str, Any]) -> str:
    """A hash of the shard contents (not of paths), for fingerprints."""
    core = {
        "source_sha256": manifest["source_sha256"],
        "shards": [(s["name"], s["sha256"]) for s in manifest["shards"]],
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def load_manifest(shard_dir: Path, *, verify: bool = True) -> dict[str, Any]:
    """Read the manifest; with ``verify``, check every shard exists with the recorded size and sha256."""
    path = shard_dir / MANIFEST
    if not path.exists():
        raise ShardError(f"{path} not found; run `dvc repro shard` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}; re-shard"
        )
    if verify:
        for s in manifest["shards"]:
            p = shard_dir / s["name"]
            if not p.exists():
                raise ShardError(f"{p}: listed in {path} but missing; re-run `dvc repro shard`")
            if p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
                raise ShardError(f"{p}: size or sha256 differs from {path} (modified or truncated); re-shard")
    return manifest


def shards_for_rank(manifest: dict[str, Any], rank: int = 0, world_size: int = 1) -> list[str]:
    """Shard names of one rank: round-robin, so every shard is read by exactly one rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return [s["name"] for s in manifest["shards"]][rank::world_size]


def _decode(sample: dict[str, Any], url: str) -> ImageSample:
    key = sample["__key__"]
    try:
        meta = json.loads(sample["json"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ShardError(f"{url}: sample {key!r}: missing or invalid .json member") from e
    ext = "png" if "png" in sample else "jpg" if "jpg" in sample else None
    if ext is None:
        raise ShardError(f"{url}: sample {key!r}: no .png or .jpg image member")
    records = tuple(parse_record(r, source=f"{url}:{key}", index=i) for i, r in enumerate(meta["records"]))
    return ImageSample(key, meta["image_id"], sample[ext], ext, meta["width"], meta["height"], records)


def iter_shard(path: Path) -> Iterator[ImageSample]:
    """Samples of one tar, in order."""
    url = str(path)
    # Shards are split across ranks and workers by the callers (shards_for_rank, iter_samples); without
    # nodesplitter=None webdataset refuses to run once a process group exists (torchrun: "you need to add
    # an explicit nodesplitter"), and its default worker splitter would hand this one url to one worker.
    dataset = wds.WebDataset(
        url, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
    )
    for sample in dataset:
        yield _decode(sample, url)


def iter_samples(
    shard_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
    verify: bool = True,
) -> Iterator[ImageSample]:
    """Stream the samples of this rank's (and this data-loader worker's) shards, in manifest order.

    Counts are checked against the manifest as each shard ends, so a shard swapped for one with the
    same name but other content is caught even without ``verify``.
    """
    manifest = load_manifest(shard_dir, verify=verify)
    by_name = {s["name"]: s for s in manifest["shards"]}
    names = shards_for_rank(manifest, rank, world_size)[worker::num_workers]
    for name in names:
        n_samples = n_records = 0
        for sample in iter_shard(shard_dir / name):
            n_samples += 1
            n_records += len(sample.records)
            yield sample
        want = by_name[name]
        if (n_samples, n_records) != (want["samples"], want["records"]):
            raise ShardError(
                f"{shard_dir / name}: {n_samples} samples / {n_records} records, manifest says "
                f"{want['samples']} / {want['records']}; re-run `dvc repro shard`"
            )
