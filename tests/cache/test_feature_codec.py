"""Feature encodings: round trips within the stated bounds, byte counts, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from geodistill.cache import feature_codec
from geodistill.cache.feature_codec import (
    FEATURE_ENCODINGS,
    decode_features,
    encode_features,
    feature_bytes,
    feature_error_bound,
)
from geodistill.errors import CacheError

FEATS = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=3, max_side=9),
    elements=st.floats(-6e4, 6e4, width=32, allow_subnormal=False),
)


@settings(max_examples=60, deadline=None)
@given(feats=FEATS, encoding=st.sampled_from(FEATURE_ENCODINGS))
def test_roundtrip_within_the_bound(feats: np.ndarray, encoding: str) -> None:
    stored = encode_features(feats, encoding)
    got = decode_features(stored, encoding)
    assert got.dtype == np.float32 and got.shape == feats.shape
    err = np.abs(got.astype(np.float64) - feats)
    assert (err <= feature_error_bound(feats, encoding)).all()


@settings(max_examples=40, deadline=None)
@given(feats=FEATS)
def test_int8_error_is_half_a_step_of_the_token_scale(feats: np.ndarray) -> None:
    stored = encode_features(feats, "int8")
    assert stored["features"].dtype == np.int8 and stored["feature_scales"].dtype == np.float32
    assert stored["feature_scales"].shape == feats.shape[:-1]
    assert np.abs(stored["features"].astype(np.int16)).max(initial=0) <= 127
    scale = np.abs(feats.astype(np.float64)).max(axis=-1, keepdims=True) / 127
    err = np.abs(decode_features(stored, "int8").astype(np.float64) - feats)
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-30).all()


def test_int8_keeps_the_largest_value_of_each_token_and_zero_rows() -> None:
    x = np.array([[0.0, 0.0, 0.0], [1.0, -3.0, 0.5], [1e-3, 2e-3, -4e-3]], np.float32)
    got = decode_features(encode_features(x, "int8"), "int8")
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_allclose(got[1, 1], -3.0, rtol=1e-6)  # absmax is exactly +-127 steps
    np.testing.assert_allclose(got[2, 2], -4e-3, rtol=1e-6)  # per-token scale: small tokens keep precision


def test_bytes_per_image() -> None:
    p, d = 1296, 5120  # GeoChat-13B: 36 x 36 patches, Vicuna-13B width
    assert feature_bytes(p, d, "float16") == 13_271_040
    assert feature_bytes(p, d, "float32") == 2 * 13_271_040
    assert feature_bytes(p, d, "int8") == p * d + 4 * p
    assert feature_bytes(144, d, "int8") < 1 << 20  # pooling 3 brings int8 under 1 MiB


def test_bad_input_is_refused() -> None:
    with pytest.raises(CacheError, match="unknown feature encoding 'int4'"):
        encode_features(np.zeros((2, 2)), "int4")
    with pytest.raises(CacheError, match="non-finite"):
        encode_features(np.array([[np.nan, 1.0]]), "int8")
    with pytest.raises(CacheError, match="overflow float16"):
        encode_features(np.array([[1e5, 1.0]]), "float16")
    assert encode_features(np.array([[1e5, 1.0]]), "int8")["features"][0, 0] == 127  # int8 has no range limit


def test_encodings_come_from_the_config() -> None:
    import typing

    from geodistill.config import CacheConfig, FeatureEncoding

    assert typing.get_args(FeatureEncoding) == feature_codec.FEATURE_ENCODINGS
    assert CacheConfig.feature_encoding in FEATURE_ENCODINGS
