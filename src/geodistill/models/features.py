"""Projector-feature utilities shared by the teacher-cache builder and the alignment loss.

Raw projector outputs of a 13B teacher are 1296 x 5120 fp16 = 13 MB per image (docs/design.md, Scale), so the
cache may store them average-pooled over the patch grid. The student's features must then be pooled the
same way before L_align compares them, hence one function for both sides.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from geodistill.errors import ModelError


def pool_image_features(feats: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool image-token features over their square patch grid.

    feats (B, P, D) are the image tokens of a ViT in row-major patch order, P = G * G. They are viewed as a
    (B, D, G, G) map and averaged with kernel = stride = ``pool``, giving (B, P / pool^2, D), again in
    row-major order. ``pool = 1`` returns ``feats`` unchanged (the same tensor object).

    A CLS token makes P non-square (LLaVA's ``vision_feature_select_strategy="full"`` keeps it; LLaVA-1.5's
    "default" drops it), which is reported as an error rather than guessed around.
    """
    if pool < 1:
        raise ModelError(f"feature pooling must be >= 1, got {pool}")
    if feats.dim() != 3:
        raise ModelError(f"image features must be (B, P, D), got shape {tuple(feats.shape)}")
    if pool == 1:
        return feats
    b, p, d = feats.shape
    g = math.isqrt(p)
    if g * g != p:
        raise ModelError(
            f"cannot pool {p} image tokens: not a square patch grid (a CLS token included? use "
            f"vision_feature_select_strategy='default', or pooling = 1)"
        )
    if g % pool:
        raise ModelError(f"patch grid {g}x{g} is not divisible by pooling {pool}; choose a divisor of {g}")
    grid = feats.transpose(1, 2).reshape(b, d, g, g)  # (B, D, G, G)
    pooled = F.avg_pool2d(grid, kernel_size=pool, stride=pool)  # (B, D, G/pool, G/pool)
    return pooled.flatten(2).transpose(1, 2)  # (B, P / pool^2, D)
