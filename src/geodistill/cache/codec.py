"""Encoding of the teacher's per-token top-k (ids and log-probs) for the Zarr cache.

Per assistant token the teacher gives its top-k token ids, sorted by descending log-prob, and the
log-probs normalised over the *full* vocabulary, so the tail mass ``1 - sum(exp(top-k))`` is known.
The tail bucket makes the cached KL a proper (k+1)-category divergence, so the one guarantee every
encoding keeps, whatever it rounds, is

    decoded probabilities sum to <= 1 - margin(k)     (margin(k) = (k + 2) * 2**-23, ~8e-6 at k = 64)

i.e. the tail mass computed from decoded values is never negative. The margin keeps that true when a
consumer sums ``exp`` in float32 (torch) instead of float64. Rows whose decoded mass would exceed it
(a near-one-hot teacher, or float32 rounding of the input) are shifted down as a whole, which moves
their log-probs by a few float16 ulps of the top-1 value.

Encodings (``CacheConfig.encoding``); stored array names and dtypes come from :func:`value_arrays`:

``float32``  ``topk_logprobs`` (N, k) float32. Lossless up to the row-mass shift; for tests and
             debugging (4 bytes per value).
``float16``  (the default, ``CacheConfig.encoding``) ``topk_logprobs`` (N, k) float16, round-to-nearest.
             |error| <= |lp| * 2**-11 + 2**-25 (half a float16 ulp: 0.05 % of the log-prob; 0.0024
             nats at lp = -5).
``uint8_log`` ``topk_head`` (N,) float16 = the top-1 log-prob (float16 error as above:
             ~5e-6 nats for a confident top-1, which is what the tail mass hinges on) and
             ``topk_gaps`` (N, k-1) uint8: the log-prob drop from the previous *decoded* value
             (closed-loop, so errors do not accumulate along the row) coded on a log-companded grid
             ``G(c) = exp(c / 64) - 1`` nats, c = 0..255. The grid step is 1.6 % of (1 + gap), so a
             value's error is half a step, ~0.0079 * (1 + gap) nats: 0.008 nats between neighbouring
             tokens of a flat distribution, 0.09 nats for a token 10 nats below its predecessor (a
             probability 4.5e-5 times smaller, where a 9 % relative error is harmless for the KL).
             Drops cannot be negative, so an error made at one column can carry over to the next
             ones while their gaps are smaller than it: column j's error is at most
             0.0079 * (1 + the largest gap in columns <= j), slightly more with compounding.
             Gaps above G(255) = 52.4 nats saturate (a value e**-52 below its predecessor is then
             overestimated; still sorted, still inside the mass guarantee).
             Gap codes are small integers, so zstd packs them into well under a byte; see
             ``python -m geodistill.bench.codec`` for measured sizes and errors.

:func:`error_bound` states the per-value bound exactly (including the row-mass shift); the tests hold
every encoding to it.

Measured (``python -m geodistill.bench.codec``: 16k synthetic tokens, V = 32000, on-disk bytes/token
after zstd-3 + shuffle; ids are the same for every encoding and barely compress, ~1.9 bytes each):

    k   ids    float16 values  uint8_log values   KL(k+1) floor f16 / u8   p-weighted |err| f16 / u8
    8   15.4   12.2            7.6                 5e-6 / 1.6e-4            1.4e-4 / 1.6e-3
    16  30.7   21.7           13.2                 1e-5 / 2.2e-4            1.6e-4 / 1.7e-3
    64  122.7  74.4           39.1                 4e-5 / 3.0e-4            2.0e-4 / 1.8e-3

So uint8_log saves 40-47 % of the value bytes (16-18 % of ids + values) for ~10x the error, which
is still a KL floor of ~3e-4 nats, far below teacher-student KLs. Per image, though, the projector
features dwarf all of it (a 13B teacher: 13 MB per image vs ~50 bytes per token), so at GeoChat scale
float16 buys its fidelity for ~0.1 % of the cache; the denser code matters only when features are
pooled hard or not stored.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping

import numpy as np

from geodistill.config import Encoding
from geodistill.errors import CacheError

ENCODINGS: tuple[Encoding, ...] = typing.get_args(Encoding)
"""Every encoding, from ``config.Encoding`` (the type of ``CacheConfig.encoding``)."""

LOGPROB_FLOOR = -1.0e4
"""Inputs below this (including -inf, probability 0) are clipped to it: finite, exactly representable
in float16, and exp() of it is 0.0, so no consumer ever sees -inf (0 * -inf is NaN in a KL)."""

# uint8_log gap grid: G(c) = exp(c / 64) - 1 nats. Relative step 1/64 keeps neighbouring tokens of a flat
# distribution within 0.008 nats while 255 codes still span 52 nats (top-1 -> top-2 of a confident
# teacher). float64 so that the encoder and decoder add exactly the same numbers.
GAP_SCALE = 64.0
GAP_GRID = np.expm1(np.arange(256, dtype=np.float64) / GAP_SCALE)  # (256,)
_GAP_MID = (GAP_GRID[:-1] + GAP_GRID[1:]) / 2  # (255,) nearest-code decision points
_GAP_HALF_REL = np.expm1(1.0 / GAP_SCALE) / 2  # half step / (1 + gap)

_F16_REL = 2.0**-11  # half a float16 ulp, relative
_F16_ABS = 2.0**-25  # half the smallest float16 subnormal
_POSITIVE_TOL = 1e-4  # log_softmax may round to a hair above 0
_MASS_TOL = 1e-3  # input rows may sum a hair above 1; more means logits were passed, not log-probs


def mass_margin(k: int) -> float:
    """Decoded top-k probabilities sum to at most ``1 - mass_margin(k)`` (float64 sum)."""
    return (k + 2) * 2.0**-23


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (V <= 65536), else uint32 (docs/design.md, "Teacher cache")."""
    if vocab_size < 1:
        raise CacheError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """(N, k) integer ids -> (N, k) :func:`id_dtype`; out-of-vocabulary ids are an error, never wrapped."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CacheError(
            f"top-k ids must lie in [0, {vocab_size}); got [{ids.min()}, {ids.max()}]: "
            "the fingerprint's vocab_size disagrees with the teacher's output size"
        )
    return ids.astype(id_dtype(vocab_size))


def decode_ids(ids: np.ndarray) -> np.ndarray:
    """Stored ids -> int64 (what torch indexing and gather need)."""
    return np.asarray(ids).astype(np.int64)


def value_arrays(encoding: str, k: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Arrays one encoding stores per token: name -> (trailing shape after N, dtype)."""
    check_encoding(encoding)
    if encoding == "float32":
        return {"topk_logprobs": ((k,), np.dtype(np.float32))}
    if encoding == "float16":
        return {"topk_logprobs": ((k,), np.dtype(np.float16))}
    return {"topk_head": ((), np.dtype(np.float16)), "topk_gaps": ((k - 1,), np.dtype(np.uint8))}


def check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise CacheError(f"unknown top-k encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


def _validated(logprobs: np.ndarray) -> np.ndarray:
    """(N, k) log-probs -> float64 clipped to [LOGPROB_FLOOR, 0], after checking what the builder passed."""
    lp = np.asarray(logprobs)
    if lp.ndim != 2 or lp.shape[1] < 1:
        raise CacheError(f"top-k log-probs must have shape (N, k) with k >= 1, got {lp.shape}")
    lp = lp.astype(np.float64)
    if np.isnan(lp).any():
        raise CacheError("top-k log-probs contain NaN: the teacher forward produced non-finite logits")
    if lp.size and lp.max() > _POSITIVE_TOL:
        raise CacheError(
            f"top-k log-probs must be <= 0 (log_softmax over the full vocabulary), max is {lp.max():.4g}; "
            "were raw logits passed?"
        )
    lp = np.clip(lp, LOGPROB_FLOOR, 0.0)  # after the checks above; -inf rows compare cleanly from here
    if lp.shape[1] > 1 and (np.diff(lp, axis=1) > 0).any():
        raise CacheError("top-k log-probs must be sorted in descending order (torch.topk(..., sorted=True))")
    mass = np.exp(lp).sum(axis=1)
    if lp.size and mass.max() > 1 + _MASS_TOL:
        raise CacheError(
            f"top-k probabilities sum to {mass.max():.4f} > 1 in some row: log-probs must be normalised over "
            "the full vocabulary (log_softmax before topk), not over the top-k"
        )
    return lp


def _round_down(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float64 -> ``dtype``, rounding toward -inf (so a probability can only shrink)."""
    y = x.astype(dtype)
    up = y.astype(np.float64) > x
    y[up] = np.nextafter(y[up], dtype.type(-np.inf))
    return y


def encode_values(logprobs: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """(N, k) log-probs (sorted descending, normalised over the vocabulary) -> the encoding's arrays.

    Returns a dict named as in :func:`value_arrays`: ``{"topk_logprobs": (N, k)}`` for float32/float16,
    ``{"topk_head": (N,) float16, "topk_gaps": (N, k-1) uint8}`` for uint8_log.
    """
    check_encoding(encoding)
    lp = _validated(logprobs)  # (N, k) float64
    n, k = lp.shape
    if encoding in ("float32", "float16"):
        dtype = np.dtype(np.float32 if encoding == "float32" else np.float16)
        arrays = {"topk_logprobs": lp.astype(dtype)}  # round to nearest: unbiased
    else:
        head = lp[:, 0].astype(np.float16)  # (N,)
        gaps = np.zeros((n, k - 1), dtype=np.uint8)
        # Closed loop: code each drop from the previous *decoded* value, so a rounding error in one
        # column is corrected by the next instead of accumulating along the row.
        dec = head.astype(np.float64)  # (N,)
        for j in range(1, k):
            target = dec - lp[:, j]  # (N,) may be < 0 when the previous value was rounded down
            code = np.searchsorted(_GAP_MID, target)  # nearest grid point; > 52.4 nats saturates at 255
            gaps[:, j - 1] = code
            dec = dec - GAP_GRID[code]
        arrays = {"topk_head": head, "topk_gaps": gaps}
    _enforce_mass(arrays, encoding, k)
    return arrays


def _enforce_mass(arrays: dict[str, np.ndarray], encoding: str, k: int) -> None:
    """Shift rows whose decoded mass exceeds ``1 - mass_margin(k)`` down, in place, until none does."""
    limit = 1.0 - mass_margin(k)
    for _ in range(16):  # one pass nearly always suffices; the rest step by single ulps
        mass = np.exp(decode_values(arrays, encoding).astype(np.float64)).sum(axis=1)  # (N,)
        bad = np.flatnonzero(mass > limit)
        if bad.size == 0:
            return
        shift = np.log(mass[bad]) - np.log(limit)  # (B,) > 0
        if encoding == "uint8_log":
            # Gaps are relative, so lowering the head lowers the whole row by the same amount.
            head = arrays["topk_head"]
            new = _round_down(head[bad].astype(np.float64) - shift, head.dtype)
            stuck = new == head[bad]
            new[stuck] = np.nextafter(new[stuck], np.float16(-np.inf))
            head[bad] = new
        else:
            vals = arrays["topk_logprobs"]
            new = _round_down(vals[bad].astype(np.float64) - shift[:, None], vals.dtype)
            stuck = new == vals[bad]
            new[stuck] = np.nextafter(new[stuck], vals.dtype.type(-np.inf))
            vals[bad] = new
    raise AssertionError("top-k mass enforcement did not converge")  # unreachable: each pass lowers rows


def decode_values(arrays: Mapping[str, np.ndarray], encoding: str) -> np.ndarray:
    """The encoding's arrays (from :func:`encode_values`, or row slices of them) -> (N, k) float32."""
    check_encoding(encoding)
    if encoding in ("float32", "float16"):
        return np.asarray(arrays["topk_logprobs"]).astype(np.float32)
    head = np.asarray(arrays["topk_head"]).astype(np.float64)  # (N,)
    gaps = np.asarray(arrays["topk_gaps"])  # (N, k-1)
    drop = np.cumsum(GAP_GRID[gaps], axis=1)  # (N, k-1), sequential sums as in the encoder
    out = np.empty((head.shape[0], gaps.shape[1] + 1), dtype=np.float32)
    out[:, 0] = head
    out[:, 1:] = head[:, None] - drop
    return out


def tail_mass(logprobs: np.ndarray) -> np.ndarray:
    """(N, k) decoded log-probs -> (N,) float32 tail mass ``1 - sum(exp)``, summed in float64, >= 0."""
    mass = np.exp(np.asarray(logprobs, dtype=np.float64)).sum(axis=1)
    return np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)


def error_bound(logprobs: np.ndarray, encoding: str) -> np.ndarray:
    """(N, k) inputs -> (N, k) float64 bound on ``|decode(encode(lp)) - lp|``: the documented tolerance.

    Per value: the rounding bound of the encoding (see the module docstring), plus, for rows whose mass
    may have been shifted down, the largest shift that :func:`_enforce_mass` can apply there.
    """
    check_encoding(encoding)
    lp = _validated(logprobs)  # (N, k)
    k = lp.shape[1]
    f16 = np.abs(lp) * _F16_REL + _F16_ABS  # half a float16 ulp (generous in the subnormal range)
    if encoding == "float32":
        local = np.abs(lp) * 2.0**-24 + 2.0**-150
    elif encoding == "float16":
        local = f16
    else:
        local = np.empty_like(lp)
        local[:, 0] = f16[:, 0]
        for j in range(1, k):
            # The drop to code is the input gap plus the previous column's signed error. If that is
            # negative (previous value decoded below this one's input) the code is 0 and the previous
            # error carries over unchanged, since drops cannot be negative; otherwise it is half a grid
            # step, plus the excess over the grid when the drop saturates.
            drop = lp[:, j - 1] - lp[:, j] + local[:, j - 1]
            rounded = (1.0 + drop) * _GAP_HALF_REL + np.maximum(drop - GAP_GRID[-1], 0.0)
            local[:, j] = np.maximum(local[:, j - 1], rounded)
    # Row shift: decoded mass <= sum p_j exp(local_j); the shift brings it to the limit, then the head's
    # (or each value's) rounding down adds at most one ulp of the encoding's value dtype.
    limit = 1.0 - mass_margin(k)
    # No decoded value exceeds the decoded top-1 (the row stays sorted), which caps saturated columns.
    worst = np.minimum(lp + local, lp[:, :1] + local[:, :1])  # (N, k) highest possible decoded values
    worst_mass = np.exp(worst).sum(axis=1)  # (N,)
    shift = np.maximum(np.log(worst_mass) - np.log(limit), 0.0)  # (N,)
    if encoding == "float32":
        ulp = np.abs(lp) * 2.0**-23 + 2.0**-149
    else:
        top = lp[:, :1] if encoding == "uint8_log" else lp
        ulp = (np.abs(top) + shift[:, None]) * 2.0 * _F16_REL + 2.0 * _F16_ABS
    decode32 = np.abs(lp) * 2.0**-23 + 1e-12  # the decoded values are float32
    return local + np.where(shift[:, None] > 0, shift[:, None] + ulp, 0.0) + decode32
