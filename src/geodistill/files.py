"""File helpers every layer shares: atomic folder writes, streaming hashes, safe image paths and opening.

Each exists once so that its guarantees (a crash never leaves a half-written folder; an image outside
its root or unreadable is reported with the file named) hold the same everywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from geodistill.errors import DataError


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing any old ``dst`` (rename, then delete)."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dst``; on success it replaces ``dst``, on error it is removed.

    A kill at any point leaves either the old ``dst`` or the new one, never a half-written folder where a
    stage (or DVC) expects a whole one.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file, streamed (never the whole file in memory)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def inside(root: str | Path, relative: str) -> Path | None:
    """``root / relative`` when it resolves (symlinks followed) inside ``root``, else None.

    Records name their images by relative path; an absolute path, ``..`` or a symlink pointing out of
    the image folder would let a dataset read any file on the machine.
    """
    root_real = Path(root).resolve()
    if Path(relative).is_absolute():
        return None
    candidate = (root_real / relative).resolve()
    return candidate if candidate.is_relative_to(root_real) else None


def image_problem(path: Path) -> str | None:
    """None when the whole image decodes, else why not (a truncated file fails here, not mid-run)."""
    if not path.is_file():
        return f"image file {path} not found"
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types for corrupt files; all mean "unreadable"
        return f"image file {path} is unreadable ({type(e).__name__}: {e})"
    return None


def open_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB; a missing or unreadable file is a DataError naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt files; all mean "unreadable"
        raise DataError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
