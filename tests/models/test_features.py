import pytest
import torch

from geodistill.errors import ModelError
from geodistill.models.features import pool_image_features


def test_pool_matches_hand_computation():
    # 4x4 grid of scalar features 0..15 in row-major order, plus a second channel = 10x the first
    base = torch.arange(16, dtype=torch.float64)
    feats = torch.stack([base, 10 * base], dim=-1).unsqueeze(0)  # (1, 16, 2)
    out = pool_image_features(feats, 2)  # (1, 4, 2)
    # 2x2 blocks: {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
    expected = torch.tensor([2.5, 4.5, 10.5, 12.5], dtype=torch.float64)
    assert out.shape == (1, 4, 2)
    torch.testing.assert_close(out[0, :, 0], expected)
    torch.testing.assert_close(out[0, :, 1], 10 * expected)


def test_pool_whole_grid_is_mean_and_batches_are_independent():
    feats = torch.randn(3, 36, 5, dtype=torch.float64)
    out = pool_image_features(feats, 6)
    assert out.shape == (3, 1, 5)
    torch.testing.assert_close(out[:, 0], feats.mean(dim=1))


def test_pool_one_is_identity():
    feats = torch.randn(2, 17, 4)  # not even square: pool = 1 never looks at the grid
    assert pool_image_features(feats, 1) is feats


def test_pool_errors_are_clear():
    with pytest.raises(ModelError, match="square"):
        pool_image_features(torch.randn(1, 17, 4), 2)  # CLS token included
    with pytest.raises(ModelError, match="divisible"):
        pool_image_features(torch.randn(1, 25, 4), 2)
    with pytest.raises(ModelError, match=">= 1"):
        pool_image_features(torch.randn(1, 16, 4), 0)
    with pytest.raises(ModelError, match=r"\(B, P, D\)"):
        pool_image_features(torch.randn(16, 4), 2)
