"""Storage encodings of the teacher's projector features in the Zarr cache (``CacheConfig.feature_encoding``).

A 13B teacher's raw projector output is 1296 x 5120 values per image (13.3 MB in float16). Pooling
(``models.features``) cuts the tokens; the encoding here cuts the bytes per value. Every encoding is
applied per image token (a row of D values), decoded to float32 by the reader, so the alignment loss
never sees the stored form.

``float32``  ``features`` (I, P, D) float32, lossless (4 bytes per value; for tests and debugging).
``float16``  ``features`` (I, P, D) float16, round-to-nearest: |error| <= |x| * 2**-11 (half an ulp;
             float16 subnormals below 6e-5 add at most 2**-25). Values beyond 65504 are an error.
``int8``     ``features`` (I, P, D) int8 and ``feature_scales`` (I, P) float32: symmetric absmax per
             token, scale = max|x| / 127, q = round(x / scale). |error| <= scale / 2 for every value
             of the token (plus float32 rounding of the decoded product, <= 127 * scale * 2**-24), i.e.
             at most 0.4 % of the token's largest magnitude. 1 byte per value + 4 per token.

Bytes per image at GeoChat-13B's shape (1296 x 5120) before compression: float16 13.3 MB, int8
6.6 MB; with pooling 3 (144 tokens) int8 is 0.74 MB, with pooling 4 (81 tokens) float16 is 0.83 MB
and int8 0.42 MB. ``python -m geodistill.bench.features`` measures the compressed sizes and the
reconstruction error on real teacher features.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping

import numpy as np

from geodistill.config import FeatureEncoding
from geodistill.errors import CacheError

FEATURE_ENCODINGS: tuple[FeatureEncoding, ...] = typing.get_args(FeatureEncoding)
"""Every feature encoding, from ``config.FeatureEncoding`` (the type of CacheConfig.feature_encoding)."""
INT8_MAX = 127
"""Symmetric int8 range [-127, 127]: -128 is never used, so negation is exact."""
SCALES = "feature_scales"
"""The int8 encoding's per-token scale array (I, P) float32."""
_STORED = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "int8": np.dtype(np.int8)}
_F16_REL = 2.0**-11
_F16_ABS = 2.0**-25
_F32_REL = 2.0**-24


def check_feature_encoding(encoding: str) -> None:
    if encoding not in FEATURE_ENCODINGS:
        raise CacheError(
            f"unknown feature encoding {encoding!r}; cache.feature_encoding must be one of "
            f"{FEATURE_ENCODINGS}"
        )


def feature_arrays(encoding: str) -> dict[str, tuple[int, np.dtype]]:
    """Arrays one encoding stores per image: name -> (number of dims after the image axis, dtype)."""
    check_feature_encoding(encoding)
    arrays = {"features": (2, _STORED[encoding])}  # (P, D)
    if encoding == "int8":
        arrays[SCALES] = (1, np.dtype(np.float32))  # (P,)
    return arrays


def feature_bytes(tokens: int, dim: int, encoding: str) -> int:
    """Raw (uncompressed) bytes of one image's features: ``tokens`` image tokens of width ``dim``."""
    arrays = feature_arrays(encoding).values()
    return sum(tokens * (dim if ndim == 2 else 1) * dtype.itemsize for ndim, dtype in arrays)


def encode_features(feats: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """(..., P, D) finite floats -> stored arrays: ``features`` (..., P, D); int8 adds scales (..., P)."""
    check_feature_encoding(encoding)
    x = np.asarray(feats, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CacheError("features contain non-finite values")
    if encoding == "float32":
        return {"features": x}
    if encoding == "float16":
        with np.errstate(over="ignore"):  # overflow is reported below, with what to do
            f16 = x.astype(np.float16)
        if not np.isfinite(f16).all():
            raise CacheError(
                "features overflow float16 (|x| > 65504); use cache.feature_encoding float32 or int8"
            )
        return {"features": f16}
    scale = (np.abs(x).max(axis=-1) / INT8_MAX).astype(np.float32)  # (..., P)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    q = np.rint(x.astype(np.float64) / safe[..., None])  # exact division, so the bound is scale / 2
    return {"features": np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), SCALES: scale}


def decode_features(arrays: Mapping[str, np.ndarray], encoding: str) -> np.ndarray:
    """The stored arrays of :func:`encode_features` -> (..., P, D) float32."""
    check_feature_encoding(encoding)
    stored = np.asarray(arrays["features"])
    if encoding != "int8":
        return stored.astype(np.float32)
    scale = np.asarray(arrays[SCALES], dtype=np.float32)
    return stored.astype(np.float32) * scale[..., None]


def feature_error_bound(feats: np.ndarray, encoding: str) -> np.ndarray:
    """Per-value bound on |decode(encode(x)) - x| for float32 input ``feats`` (..., P, D)."""
    check_feature_encoding(encoding)
    x = np.abs(np.asarray(feats, dtype=np.float64))
    if encoding == "float32":
        return np.zeros_like(x)
    if encoding == "float16":
        return x * _F16_REL + _F16_ABS
    scale = np.asarray(encode_features(feats, "int8")[SCALES], dtype=np.float64)[..., None]
    # A token whose absmax / 127 underflows float32 decodes to zeros: its error is its own magnitude.
    return np.where(scale > 0, scale * (0.5 + INT8_MAX * _F32_REL), x)
