"""Distillation losses as plain functions on tensors (no trainer, no registry).

Notation: q = student (parameters theta), p = teacher, V = vocabulary size, N = tokens, k = cached top-k.

The teacher cache stores, per response token, the teacher's top-k ids and their log-probs normalised over
the full vocabulary (docs/design.md, "Top-k and the tail"). Every divergence here is computed over k + 1
categories: the k teacher top-k tokens plus one tail bucket holding the remaining probability mass, for
both distributions. Merging categories is a deterministic map applied to both p and q, so by the
data-processing inequality the bucketed divergence is a lower bound of the full-vocabulary one, and it is
exact when k = V (the tail is then empty for both). All divergences below are f-divergences of (p, q) or of
mixtures of them, and mixing commutes with merging, so the bound holds for each of them.

Conventions: 0 * log 0 = 0; a category with probability 0 under the first argument of KL contributes
nothing (and no NaN gradient); computation is done in at least float32 (the teacher's k + 1 buckets in
float64: they are (N, k), and 1 - sum(top-k) needs it for tails below float32's ~6e-8). Masked tokens
are never read, so NaN or inf logits at padding or prompt positions cannot reach a loss or a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from geodistill.config import Divergence
from geodistill.data.collate import IGNORE
from geodistill.errors import ModelError, TrainingError
from geodistill.models.features import pool_image_features

# Teacher tail probability used where the cached top-k mass is >= 1 while k < V: only rounding (float16
# or uint8 codes, a float32 sum) gets there; the true tail is positive but lost, and a finite floor keeps
# reverse KL finite. Rows with a representable tail keep it exactly, however small.
MIN_TAIL_PROB = 1e-10

# Stand-in for log 0 inside mixtures: exp(-1e30 - x) underflows to exactly 0 for any finite x, so values
# are unchanged, while logaddexp(-inf, -inf) (whose gradient is NaN) never happens.
_LOG_ZERO = -1e30


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 at least: bf16/fp16 log-sum-exps lose the small tail masses that matter here."""
    return torch.promote_types(t.dtype, torch.float32)


# --------------------------------------------------------------------------------- k + 1 buckets


def student_bucket_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Student log-probs over the teacher's top-k tokens plus one tail bucket.

        log q_i    = z_{id_i} - logsumexp_v z_v                    for i = 1..k
        log q_tail = logsumexp_{v not in top-k} z_v - logsumexp_v z_v

    student_logits (N, V), topk_ids (N, k) integer (any int dtype; duplicates are not expected).
    Returns (N, k + 1), last column = tail. When k == V the tail is exactly -inf, built as a constant so
    that no NaN reaches values or gradients (logsumexp over an all -inf row has a NaN gradient).
    """
    if student_logits.dim() != 2 or topk_ids.dim() != 2 or student_logits.shape[0] != topk_ids.shape[0]:
        raise TrainingError(
            f"student_logits must be (N, V) and topk_ids (N, k); got {tuple(student_logits.shape)} "
            f"and {tuple(topk_ids.shape)}"
        )
    n, v = student_logits.shape
    k = topk_ids.shape[1]
    if k > v:
        raise TrainingError(f"top-k ({k}) exceeds the student vocabulary ({v}); teacher and student differ")
    logits = student_logits.to(_compute_dtype(student_logits))  # (N, V)
    ids = topk_ids.long()  # (N, k)
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1)
    top = logits.gather(-1, ids) - log_z  # (N, k)
    if k == v:
        tail = torch.full((n, 1), float("-inf"), dtype=logits.dtype, device=logits.device)  # (N, 1)
    else:
        # masked_fill (not scatter of a value) so the top-k logits get exactly zero gradient from the tail
        rest = logits.masked_fill(
            torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True), -math.inf
        )
        tail = torch.logsumexp(rest, dim=-1, keepdim=True) - log_z  # (N, 1)
    return torch.cat([top, tail], dim=-1)  # (N, k + 1)


def teacher_bucket_logprobs(
    topk_logprobs: torch.Tensor, vocab_size: int | None = None, min_tail_prob: float = MIN_TAIL_PROB
) -> torch.Tensor:
    """Cached teacher log-probs over its top-k plus the tail bucket, normalised to sum to 1.

        s          = logsumexp_i log p_i                (log of the top-k mass)
        log p_tail = log(1 - exp(s)) = log(-expm1(s))   (stable when s ~ 0, i.e. tail ~ 0)

    topk_logprobs (N, k), normalised over the full vocabulary. Returns (N, k + 1) in the compute dtype
    (at least float32), computed in float64.
    - k == vocab_size: the row is the whole distribution; the tail is empty, exactly -inf (forward KL is
      then exact), and the top-k is renormalised (subtract s): an encoded cache stores each value with
      its own rounding, so the decoded mass is 1 only up to the encoding's error (float16 at V = 512:
      ~1e-3), and an unnormalised row would make divergences of identical distributions negative.
    - k < V: the tail is exact wherever s < 0, down to tails of ~1e-16. Only a row whose mass rounded
      to >= 1 (a quantised confident row) has lost its tail: its tail is set to ``min_tail_prob`` and its
      top-k scaled to 1 - min_tail_prob (a zero tail would make reverse KL infinite wherever the student
      puts mass there).
    """
    if topk_logprobs.dim() != 2:
        raise TrainingError(f"topk_logprobs must be (N, k), got {tuple(topk_logprobs.shape)}")
    lp = topk_logprobs.double()  # (N, k)
    s = torch.logsumexp(lp, dim=-1, keepdim=True)  # (N, 1)
    if vocab_size is not None and topk_logprobs.shape[1] == vocab_size:
        out = torch.cat([lp - s, torch.full_like(s, -math.inf)], dim=-1)  # (N, k + 1)
    else:
        lost = s >= 0  # (N, 1) the mass rounded to >= 1
        log_floor = math.log(min_tail_prob)
        tail = torch.log(-torch.expm1(s.clamp(max=-1e-300)))  # (N, 1) clamped: no log 0 in `lost` rows
        top = torch.where(lost, lp - s + math.log1p(-min_tail_prob), lp)  # (N, k)
        out = torch.cat([top, torch.where(lost, log_floor, tail)], dim=-1)  # (N, k + 1)
    return out.to(_compute_dtype(topk_logprobs))


def _buckets(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q, log p), each (N, k + 1), in the same dtype."""
    if topk_ids.shape != topk_logprobs.shape:
        raise TrainingError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} differ"
        )
    log_q = student_bucket_logprobs(student_logits, topk_ids)  # (N, k+1)
    log_p = teacher_bucket_logprobs(topk_logprobs, vocab_size=student_logits.shape[-1])  # (N, k+1)
    return log_q, log_p.to(log_q.dtype)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_i a_i (log a_i - log b_i) over the last dim, (N, C) -> (N,).

    Categories with a_i = 0 contribute 0 whatever b_i is; their inputs are replaced by 0 *before* the
    arithmetic so that the gradient is 0 there, not 0 * inf = NaN. a_i > 0 with b_i = 0 gives +inf (the
    true value).
    """
    pos = log_a > -math.inf  # (N, C)
    la = torch.where(pos, log_a, 0.0)
    lb = torch.where(pos, log_b, 0.0)
    # A KL of normalised rows is >= 0; summing near-identical rows in float32 can round to -1e-8.
    return torch.where(pos, la.exp() * (la - lb), 0.0).sum(-1).clamp(min=0.0)  # (N,)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b) elementwise for 0 < w < 1, (N, C) -> (N, C), NaN-free where a = b = 0."""
    la = log_a.clamp(min=_LOG_ZERO)
    lb = log_b.clamp(min=_LOG_ZERO)
    return torch.logaddexp(la + math.log(weight_a), lb + math.log1p(-weight_a))


def _check_coef(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise TrainingError(f"{name} must be in (0, 1), got {value}")


# --------------------------------------------------------------------------------- divergences
# Each takes student_logits (N, V), topk_ids (N, k), topk_logprobs (N, k) and returns (N,) per token.


def reverse_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Reverse KL, the paper's eq. (6) per token: KL(q || p) = sum_i q_i (log q_i - log p_i), i in k + 1."""
    log_q, log_p = _buckets(student_logits, topk_ids, topk_logprobs)
    return _kl(log_q, log_p)  # (N,)


def forward_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Forward KL (classic KD): KL(p || q) = sum_i p_i (log p_i - log q_i) over the k + 1 buckets."""
    log_q, log_p = _buckets(student_logits, topk_ids, topk_logprobs)
    return _kl(log_p, log_q)  # (N,)


def jsd(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), 0 < beta < 1:

        m = beta p + (1 - beta) q,   JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)

    beta = 0.5 is the symmetric JSD; small beta behaves like beta * forward KL, beta near 1 like
    (1 - beta) * reverse KL. Over the k + 1 buckets.
    """
    _check_coef("jsd beta", beta)
    log_q, log_p = _buckets(student_logits, topk_ids, topk_logprobs)
    log_m = _log_mix(log_p, log_q, beta)  # (N, k+1)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)  # (N,)


def skew_forward_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    """alpha-skew KL of DistiLLM (Ko et al. 2024), 0 < alpha < 1:  KL(p || alpha p + (1 - alpha) q).

    The teacher-side mixture keeps the ratio bounded by 1 / alpha where q ~ 0. Over the k + 1 buckets.
    """
    _check_coef("skew alpha", alpha)
    log_q, log_p = _buckets(student_logits, topk_ids, topk_logprobs)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))  # (N,)


def skew_reverse_kl(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    """alpha-skew reverse KL of DistiLLM, 0 < alpha < 1:  KL(q || alpha q + (1 - alpha) p).

    Over the k + 1 buckets.
    """
    _check_coef("skew alpha", alpha)
    log_q, log_p = _buckets(student_logits, topk_ids, topk_logprobs)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))  # (N,)


DivergenceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]
"""(student_logits (N, V), topk_ids (N, k), topk_logprobs (N, k), jsd beta, skew alpha) -> (N,)."""

DIVERGENCES: dict[Divergence, DivergenceFn] = {
    "reverse": lambda s, ids, lps, beta, alpha: reverse_kl(s, ids, lps),
    "forward": lambda s, ids, lps, beta, alpha: forward_kl(s, ids, lps),
    "jsd": lambda s, ids, lps, beta, alpha: jsd(s, ids, lps, beta=beta),
    "skew_forward": lambda s, ids, lps, beta, alpha: skew_forward_kl(s, ids, lps, alpha=alpha),
    "skew_reverse": lambda s, ids, lps, beta, alpha: skew_reverse_kl(s, ids, lps, alpha=alpha),
}
"""Every divergence ``distill.kl`` can name (``config.Divergence``), by name."""


def distill_kl(
    kind: Divergence,
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Masked mean over tokens of the chosen divergence: sum_n m_n D_n / sum_n m_n -> scalar.

    kind: a key of DIVERGENCES; "jsd" uses ``beta``, "skew_forward" and "skew_reverse" use ``alpha``.
    Shapes: student_logits (N, V) with topk_* (N, k) and mask (N,), or (B, T, V) with (B, T, k) and (B, T);
    row n of the logits must be the distribution that predicts the token whose teacher top-k is row n
    (i.e. already shifted). The top-k tensors may instead hold only the selected tokens, (M, k) with
    M = mask.sum() in row-major order: the cache's layout (assistant tokens only), no scatter needed.
    Only rows with mask = True are computed, so padding rows with garbage ids or values cannot leak NaN.
    No selected token gives an exact 0, attached to the graph but reading no logit.
    """
    fn = DIVERGENCES.get(kind)
    if fn is None:
        raise TrainingError(f"unknown KL kind {kind!r}; use one of {', '.join(map(repr, DIVERGENCES))}")
    v = student_logits.shape[-1]
    logits = student_logits.reshape(-1, v)  # (N, V)
    k = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1, k)  # (N, k) or (M, k)
    lps = topk_logprobs.reshape(-1, k)  # (N, k) or (M, k)
    m = mask.reshape(-1).bool()  # (N,)
    n_sel = int(m.sum())
    if (
        logits.shape[0] != m.shape[0]
        or ids.shape[0] != lps.shape[0]
        or ids.shape[0] not in (m.shape[0], n_sel)
    ):
        raise TrainingError(
            f"token counts differ: logits {tuple(student_logits.shape)}, topk_ids {tuple(topk_ids.shape)}, "
            f"topk_logprobs {tuple(topk_logprobs.shape)}, mask {tuple(mask.shape)} with {n_sel} selected; "
            "top-k rows must match the logits rows or the selected tokens"
        )
    if ids.shape[0] == m.shape[0]:
        ids, lps = ids[m], lps[m]  # (M, k)
    logits = logits[m]  # (M, V)
    if n_sel == 0:
        return logits.to(_compute_dtype(logits)).sum()  # the sum of an empty (0, V) selection: exactly 0
    return fn(logits, ids, lps, beta, alpha).mean()


# --------------------------------------------------------------------------------- feature alignment


class FeatureAdapter(nn.Linear):
    """Learned linear map from student to teacher feature width for L_align.

    Trained jointly with the student and dropped at export (it is not part of the student model).
    """

    def __init__(self, d_student: int, d_teacher: int) -> None:
        super().__init__(d_student, d_teacher)


def make_adapter(d_student: int, d_teacher: int) -> FeatureAdapter | None:
    """A FeatureAdapter when the widths differ, None when they are equal (features compare directly)."""
    return None if d_student == d_teacher else FeatureAdapter(d_student, d_teacher)


def feature_align_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    adapter: nn.Module | None,
    *,
    pool: int = 1,
) -> torch.Tensor:
    """L_align, eq. (4): (1/2) ||z_T(x) - z_S(x; theta)||^2 over projector outputs, as a mean over elements.

    student_feats (B, P_s, D_s): the student's projector outputs (image tokens after the MLP).
    teacher_feats (B, P, D_t): the teacher's, usually from the cache (fp16; cast here, no gradient).
    The student features are average-pooled with ``pool`` (the cache's feature pooling) and mapped by
    ``adapter`` (D_s -> D_t; None when D_s == D_t). Pooling before the adapter is exact: both are affine.
    The paper writes -1/2 ||.||^2 as a quantity to maximise; we minimise the MSE, whose gradient is its
    eq. (5) up to the constant 1/(B P D) that the loss weight absorbs.
    """
    z_s = pool_image_features(student_feats, pool)  # (B, P, D_s)
    if adapter is not None:
        z_s = adapter(z_s)  # (B, P, D_t)
    if z_s.shape != teacher_feats.shape:
        hint = "" if adapter is not None else " (widths differ: pass make_adapter(d_student, d_teacher))"
        raise ModelError(
            f"student features {tuple(z_s.shape)} (after pooling {pool} and the adapter) do not match "
            f"teacher features {tuple(teacher_feats.shape)}{hint}; check the cache's feature pooling and "
            f"that both models use the same image size, patch size and feature select strategy"
        )
    z_t = teacher_feats.to(device=z_s.device, dtype=z_s.dtype).detach()
    return F.mse_loss(z_s, z_t)


# --------------------------------------------------------------------------------- language modelling


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, eq. (7): -(1/|y|) sum_k log q(y_k | y_<k).

    logits (B, T, V) are the model outputs at every input position; labels (B, T) are the input ids with
    IGNORE where no loss is taken (prompt, image tokens, padding). The shift happens here: the logits at
    position t predict labels[t + 1]. Mean over the counted tokens of the whole batch; an exact 0
    (attached to the graph) if there are none. Only the counted positions' logits are read.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise TrainingError(
            f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]  # (B, T-1)
    sel = targets != IGNORE  # (B, T-1)
    # Select before the softmax: ignore_index would still run log_softmax (and its backward) on every
    # row, so one NaN logit at a padding position would reach the gradient.
    counted = logits[:, :-1][sel]  # (M, V)
    counted = counted.to(_compute_dtype(counted))
    if counted.shape[0] == 0:
        return counted.sum()  # the sum of an empty selection: exactly 0
    return F.cross_entropy(counted, targets[sel])
