"""The top-k value codec: documented error bounds, the mass guarantee (tail >= 0), exact ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geodistill.cache import codec
from geodistill.errors import CacheError


def topk_logprobs(rng: np.random.Generator, n: int, vocab: int, k: int, scale: float) -> np.ndarray:
    """(n, k) float32 top-k log-probs of random softmaxes over ``vocab``, normalised over all of it."""
    logits = rng.normal(size=(n, vocab)) * scale
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return -np.sort(-lp, axis=1)[:, :k].astype(np.float32)


def check_roundtrip(lp: np.ndarray, encoding: str) -> np.ndarray:
    arrays = codec.encode_values(lp, encoding)
    for name, (trail, dtype) in codec.value_arrays(encoding, lp.shape[1]).items():
        assert arrays[name].shape == (lp.shape[0], *trail) and arrays[name].dtype == dtype
    dec = codec.decode_values(arrays, encoding)  # (N, k)
    assert dec.shape == lp.shape and dec.dtype == np.float32
    assert np.isfinite(dec).all()
    ref = np.clip(lp.astype(np.float64), codec.LOGPROB_FLOOR, 0)
    err = np.abs(dec.astype(np.float64) - ref)
    bound = codec.error_bound(lp, encoding)
    assert (err <= bound).all(), f"{encoding}: max error/bound {(err / bound).max():.3f}"
    # The mass guarantee: the tail bucket is never negative, whether summed in float64 or float32.
    mass64 = np.exp(dec.astype(np.float64)).sum(axis=1)
    assert (mass64 <= 1 - codec.mass_margin(lp.shape[1])).all()
    assert (np.exp(dec).sum(axis=1, dtype=np.float32) <= 1).all()
    assert (codec.tail_mass(dec) >= 0).all()
    assert (np.diff(dec, axis=1) <= 0).all(), "decoded values stay sorted"
    return dec


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 12),
    k=st.integers(1, 70),
    extra=st.integers(0, 300),
    scale=st.sampled_from([0.01, 0.5, 2.0, 6.0, 30.0]),
    encoding=st.sampled_from(codec.ENCODINGS),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_within_documented_bound(
    n: int, k: int, extra: int, scale: float, encoding: str, seed: int
) -> None:
    lp = topk_logprobs(np.random.default_rng(seed), n, k + extra, k, scale)
    check_roundtrip(lp, encoding)


@pytest.mark.parametrize("encoding", codec.ENCODINGS)
def test_edge_rows(encoding: str) -> None:
    k = 8
    rows = np.array(
        [
            [0.0] + [-np.inf] * (k - 1),  # one-hot teacher: decoded mass must still leave room
            [np.log(1 / k)] * k,  # k = V: the top-k is the whole distribution, mass exactly 1
            [-1e-7, -17.0, -17.5, -60.0, -200.0, -1e5, -np.inf, -np.inf],  # huge gaps, below the floor
            np.linspace(-2.08, -2.08 - 0.07, k),  # flat: tiny gaps
        ],
        dtype=np.float32,
    )
    check_roundtrip(rows, encoding)


def test_documented_accuracy() -> None:
    """The headline numbers of the module docstring, on a flat-ish distribution (gaps < 1 nat)."""
    lp = topk_logprobs(np.random.default_rng(0), 200, 5000, 16, 0.5)
    assert (np.diff(lp, axis=1) > -1).all()
    err = {e: np.abs(codec.decode_values(codec.encode_values(lp, e), e) - lp).max() for e in codec.ENCODINGS}
    assert err["float32"] == 0
    assert err["float16"] <= np.abs(lp).max() * 2**-11 + 1e-6
    assert err["uint8_log"] <= 2 * 0.0079 + 0.01  # half a step at gap < 1, plus the head's float16


def test_float32_is_lossless_for_rows_with_a_tail() -> None:
    lp = topk_logprobs(np.random.default_rng(1), 50, 1000, 16, 1.0)
    np.testing.assert_array_equal(codec.decode_values(codec.encode_values(lp, "float32"), "float32"), lp)


def test_uint8_log_is_denser_than_float16() -> None:
    k = 16
    f16 = codec.encode_values(np.full((3, k), -3.0, np.float32), "float16")
    u8 = codec.encode_values(np.full((3, k), -3.0, np.float32), "uint8_log")
    assert sum(a.nbytes for a in u8.values()) < sum(a.nbytes for a in f16.values())


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([[-1.0, -0.5]], "sorted in descending order"),
        ([[0.5, -3.0]], "were raw logits passed"),
        ([[-0.1, -0.2, -0.3]], "normalised over the full vocabulary"),
        ([[np.nan, -1.0]], "NaN"),
        ([-1.0, -2.0], r"shape \(N, k\)"),
    ],
)
def test_bad_inputs_are_refused(rows: list, match: str) -> None:
    with pytest.raises(CacheError, match=match):
        codec.encode_values(np.array(rows, dtype=np.float32), "uint8_log")


def test_unknown_encoding() -> None:
    with pytest.raises(CacheError, match=r"unknown top-k encoding 'bf16'.*uint8_log"):
        codec.encode_values(np.zeros((1, 1), np.float32), "bf16")


def test_ids() -> None:
    assert codec.id_dtype(32000) == np.uint16
    assert codec.id_dtype(65536) == np.uint16
    assert codec.id_dtype(65537) == np.uint32
    ids = np.array([[65535, 0, 7]])
    enc = codec.encode_ids(ids, 65536)
    assert enc.dtype == np.uint16
    np.testing.assert_array_equal(codec.decode_ids(enc), ids)
    assert codec.decode_ids(enc).dtype == np.int64
    big = np.array([[151_000, 3]])
    np.testing.assert_array_equal(codec.decode_ids(codec.encode_ids(big, 152_064)), big)
    with pytest.raises(CacheError, match="vocab_size"):
        codec.encode_ids(np.array([[32000]]), 32000)
