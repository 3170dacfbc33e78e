"""Where a pipeline model lives: trained here (a full checkpoint folder) or adopted (a pointer).

Adopting a 13B checkpoint must not copy 26 GB into ``models/`` and the DVC cache, so an adopted model's
folder holds only ``adopted.json`` = {"path", "weights_sha256", "tokenizer_sha256"}. Every loader goes
through ``resolve`` and ``load`` here, which also re-checks an adopted checkpoint's fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

from geodistill.errors import ModelError
from geodistill.models.factory import check_checkpoint, load_llava, weights_hash
from geodistill.models.tokenizer import load_tokenizer, tokenizer_hash

ADOPTED = "adopted.json"
FINGERPRINT = "fingerprint.json"


def fingerprint(path: Path) -> dict[str, str]:
    """{weights_sha256, tokenizer_sha256} of a checkpoint folder."""
    return {"weights_sha256": weights_hash(path), "tokenizer_sha256": tokenizer_hash(load_tokenizer(path))}


def adopt(src: str | Path, out: Path) -> dict[str, str]:
    """Record a local checkpoint as this pipeline's model without copying it."""
    src = Path(src).resolve()
    check_checkpoint(src)  # fail now, with a clear error, rather than in a later stage (no weights loaded)
    info = {"path": str(src), **fingerprint(src)}
    out.mkdir(parents=True, exist_ok=True)
    (out / ADOPTED).write_text(json.dumps(info, indent=2) + "\n")
    return info


def write_fingerprint(out: Path) -> dict[str, str]:
    info = fingerprint(out)
    (out / FINGERPRINT).write_text(json.dumps(info, indent=2) + "\n")
    return info


def resolve(model_dir: str | Path) -> Path:
    """The folder that holds the weights of a pipeline model (itself, or what it adopted)."""
    model_dir = Path(model_dir)
    pointer = model_dir / ADOPTED
    if not pointer.exists():
        return model_dir
    info = json.loads(pointer.read_text())
    return Path(info["path"])


def model_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """The recorded fingerprint; for an adopted model, checked against the checkpoint as it is now."""
    model_dir = Path(model_dir)
    pointer = model_dir / ADOPTED
    if pointer.exists():
        info = json.loads(pointer.read_text())
        now = fingerprint(Path(info["path"]))
        if now != {k: info[k] for k in now}:
            raise ModelError(
                f"{info['path']} changed since it was adopted into {model_dir}; re-run `dvc repro -f teacher`"
            )
        return now
    if (model_dir / FINGERPRINT).exists():
        return json.loads((model_dir / FINGERPRINT).read_text())
    return fingerprint(model_dir)


def load(model_dir: str | Path, **kwargs):
    """load_llava on the resolved folder."""
    return load_llava(resolve(model_dir), **kwargs)
