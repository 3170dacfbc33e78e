import math
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from geodistill import config
from geodistill.cache import codec
from geodistill.data.collate import IGNORE
from geodistill.distill.losses import (
    DIVERGENCES,
    MIN_TAIL_PROB,
    FeatureAdapter,
    distill_kl,
    feature_align_loss,
    forward_kl,
    lm_loss,
    make_adapter,
    reverse_kl,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
)
from geodistill.errors import ModelError, TrainingError

KINDS = tuple(DIVERGENCES)
BETA, ALPHA = 0.3, 0.1


def test_config_and_losses_name_the_same_divergences():
    assert set(KINDS) == set(typing.get_args(config.Divergence))


def dense(kind: str, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary reference, float64, straight from the definitions: (N, V) x 2 -> (N,)."""
    log_q = F.log_softmax(s_logits.double(), -1)
    log_p = F.log_softmax(t_logits.double(), -1)
    q, p = log_q.exp(), log_p.exp()

    def kl(a, la, lb):
        return (a * (la - lb)).sum(-1)

    if kind == "reverse":
        return kl(q, log_q, log_p)
    if kind == "forward":
        return kl(p, log_p, log_q)
    if kind == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * kl(p, log_p, m.log()) + (1 - BETA) * kl(q, log_q, m.log())
    if kind == "skew_forward":
        return kl(p, log_p, (ALPHA * p + (1 - ALPHA) * q).log())
    if kind == "skew_reverse":
        return kl(q, log_q, (ALPHA * q + (1 - ALPHA) * p).log())
    raise AssertionError(kind)


def bucketed(kind: str, s_logits, ids, lps) -> torch.Tensor:
    return DIVERGENCES[kind](s_logits, ids, lps, BETA, ALPHA)


def teacher_topk(t_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache stores: top-k ids and their full-vocabulary log-probs."""
    lps, ids = F.log_softmax(t_logits.double(), -1).topk(k, dim=-1)
    return ids, lps


def draw(n: int, v: int, seed: int, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_()
    t = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    return s, t


# ------------------------------------------------------------------------------------------ buckets


def test_bucket_logprobs_are_normalised_and_exact():
    s, t = draw(5, 11, 0)
    ids, lps = teacher_topk(t, 4)
    log_q = student_bucket_logprobs(s, ids)
    log_p = teacher_bucket_logprobs(lps, vocab_size=11)
    assert log_q.shape == log_p.shape == (5, 5)
    torch.testing.assert_close(log_q.logsumexp(-1), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(log_p.logsumexp(-1), torch.zeros(5, dtype=torch.float64))
    full_q = F.log_softmax(s, -1)
    torch.testing.assert_close(log_q[:, :4], full_q.gather(-1, ids))
    keep = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    torch.testing.assert_close(log_q[:, 4], torch.where(keep, full_q.exp(), 0).sum(-1).log())
    torch.testing.assert_close(log_p[:, 4], (1 - lps.exp().sum(-1)).log())


def test_tail_is_minus_inf_at_k_equal_v():
    s, t = draw(3, 6, 1)
    ids, lps = teacher_topk(t, 6)
    assert torch.isneginf(student_bucket_logprobs(s, ids)[:, -1]).all()
    assert torch.isneginf(teacher_bucket_logprobs(lps, vocab_size=6)[:, -1]).all()


def test_teacher_tail_of_quantised_cache_is_stable():
    # fp16 rounding can push the top-k mass to (or past) 1 while k < V
    lps = torch.tensor([[math.log(0.6), math.log(0.4) + 1e-3], [-1e-9, -30.0]], dtype=torch.float32)
    out = teacher_bucket_logprobs(lps.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(2), atol=1e-6, rtol=0)  # renormalised
    torch.testing.assert_close(out[:, 2], torch.full((2,), math.log(MIN_TAIL_PROB)))  # the lost tail
    # a tiny but representable tail survives (expm1, not 1 - exp)
    tiny = teacher_bucket_logprobs(torch.tensor([[math.log1p(-1e-7)]], dtype=torch.float64))
    torch.testing.assert_close(tiny[0, 1], torch.tensor(math.log(1e-7), dtype=torch.float64))


def teacher_with_tail(n: int, v: int, k: int, tail: float, seed: int) -> torch.Tensor:
    """(n, V) float64 teacher logits whose last V - k tokens hold exactly ``tail`` of the mass."""
    g = torch.Generator().manual_seed(seed)
    top = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1) * (1 - tail)  # (n, k)
    rest = torch.softmax(torch.randn(n, v - k, generator=g, dtype=torch.float64), -1) * tail  # (n, V-k)
    return torch.cat([top, rest], -1).log()


def reference(kind: str, s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The (k + 1)-bucket divergence in float64 from the full distributions, tails summed directly (not as
    1 - sum(top-k)), so a tail of 1e-12 is exact to float64 precision."""
    buckets = []
    for z in (s_logits, t_logits):
        lp = F.log_softmax(z.double(), -1)  # (N, V)
        rest = lp.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True)  # (N, 1)
        buckets.append(torch.cat([lp.gather(-1, ids), rest], -1))
    return dense(kind, *buckets)  # dense() re-normalises log-probs: a no-op on normalised rows


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", [1e-3, 1e-6, 1e-9, 1e-10, 1e-11, 1e-12])
def test_tiny_teacher_tails_are_exact_not_floored(kind, tail):
    """A teacher tail below MIN_TAIL_PROB is a real tail: reverse KL grows as the student puts mass where
    the teacher has almost none (flooring every tail at 1e-10 took q_tail * log(100) nats off at 1e-12)."""
    v, k = 12, 4
    s, _ = draw(6, v, 20, scale=1.0)
    t = teacher_with_tail(6, v, k, tail, seed=21)
    ids, lps = teacher_topk(t, k)
    assert (ids < k).all()  # the construction put the top-k first
    exact = reference(kind, s.detach(), t, ids)
    # 1 - sum(top-k) in float64 has a relative error of ~1e-16 / tail: the only inexact step.
    rtol = 1e-9 + 1e-15 / tail
    torch.testing.assert_close(bucketed(kind, s.detach(), ids, lps), exact, rtol=rtol, atol=1e-12)


def test_only_a_tail_lost_to_rounding_is_floored():
    # Row 0: a representable tail of 1e-12; row 1: the mass rounded past 1, the tail is lost.
    lps = [[math.log(0.5), math.log(0.5 - 1e-12)], [math.log(0.5), math.log(0.5) + 1e-7]]
    out = teacher_bucket_logprobs(torch.tensor(lps, dtype=torch.float64))
    torch.testing.assert_close(out[0, 2].exp(), torch.tensor(1e-12, dtype=torch.float64), rtol=1e-3, atol=0)
    torch.testing.assert_close(out[1, 2], torch.tensor(math.log(MIN_TAIL_PROB), dtype=torch.float64))
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-15)


def encoded_cache(t_logits: torch.Tensor, encoding: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The whole vocabulary as the cache holds it: ids, decoded log-probs and the codec's error bound."""
    lp, ids = F.log_softmax(t_logits.double(), -1).sort(-1, descending=True)
    decoded = codec.decode_values(codec.encode_values(lp.numpy(), encoding), encoding)
    return ids, torch.from_numpy(decoded), codec.error_bound(lp.numpy(), encoding)


def kl_bounds(p: np.ndarray, q: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest |error| of reverse and forward KL when each log p_i is off by at most b_i and the row is
    then renormalised: |log p^_i - log p_i| <= D_i = b_i + max |log sum_j p_j exp(+-b_j)|."""
    shift = np.maximum(np.log((p * np.exp(b)).sum(-1)), -np.log((p * np.exp(-b)).sum(-1)))  # (N,)
    d = b + shift[:, None]  # (N, V)
    reverse = (q * d).sum(-1)
    forward = (p * np.expm1(d) * np.abs(np.log(p) - np.log(q))).sum(-1) + (p * np.exp(d) * d).sum(-1)
    return reverse, forward


@pytest.mark.parametrize("encoding", ["float16", "uint8_log"])
def test_k_equal_v_with_an_encoded_cache_is_the_dense_kl_within_the_codec_bound(encoding):
    n, v = 16, 512
    s, t = draw(n, v, 30, scale=3.0)
    ids, lps, b = encoded_cache(t, encoding)  # (N, V) each, lps float32
    log_p = teacher_bucket_logprobs(lps, vocab_size=v)
    # The encoded row's mass is 1 only up to the encoding's error (float16: ~1e-3 at V = 512) ...
    assert (lps.double().logsumexp(-1).abs() > 1e-5).any()
    # ... so the k = V buckets renormalise it: divergences of identical distributions stay >= 0.
    torch.testing.assert_close(log_p.logsumexp(-1), torch.zeros(n), rtol=0, atol=1e-6)
    same = t.float()
    for fn in (reverse_kl, forward_kl):
        out = fn(same, ids, lps)
        # only the encoding's rounding separates them: ~1e-6 nats, the size of float32 rounding of the sum
        assert (out >= 0).all() and out.mean() > 0 and (out < 1e-4).all()
    p = F.softmax(t, -1).gather(-1, ids).numpy()
    q = F.softmax(s.detach(), -1).gather(-1, ids).numpy()
    bound_r, bound_f = kl_bounds(p, q, b)
    slack = 1e-4  # float32 arithmetic over 512 terms
    for fn, kind, bound in ((reverse_kl, "reverse", bound_r), (forward_kl, "forward", bound_f)):
        got = fn(s.detach().float(), ids, lps).double().numpy()
        want = dense(kind, s.detach(), t).numpy()
        assert (np.abs(got - want) <= bound + slack).all(), (kind, np.abs(got - want).max(), bound.min())


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("kind", KINDS)
def test_equals_exact_kl_at_k_equal_v(kind):
    s, t = draw(7, 13, 2)
    ids, lps = teacher_topk(t, 13)
    torch.testing.assert_close(bucketed(kind, s, ids, lps), dense(kind, s, t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_dense_reference_at_k_equal_v(kind):
    s, t = draw(6, 9, 3)
    ids, lps = teacher_topk(t, 9)
    (g_bucket,) = torch.autograd.grad(bucketed(kind, s, ids, lps).sum(), s)
    (g_dense,) = torch.autograd.grad(dense(kind, s, t).sum(), s)
    assert torch.isfinite(g_bucket).all()
    torch.testing.assert_close(g_bucket, g_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_gradients_at_k_equal_v_float32(kind):
    s, t = draw(4, 10, 4, scale=8.0)
    s32 = s.detach().float().requires_grad_()
    ids, lps = teacher_topk(t, 10)
    loss = distill_kl(kind, s32, ids.to(torch.int32), lps.float(), torch.ones(4, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s32.grad).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_never_above_exact_kl_for_k_below_v(kind, k):
    s, t = draw(32, 9, 5 + k, scale=3.0)
    ids, lps = teacher_topk(t, k)
    low = bucketed(kind, s, ids, lps)
    assert torch.isfinite(low).all()
    assert (low <= dense(kind, s, t) + 1e-10).all()  # equality at k = V - 1 (one-token tail)
    assert (low >= -1e-12).all()


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    v=st.integers(2, 12),
    k_frac=st.floats(0.0, 1.0),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
@example(kind="reverse", v=2, k_frac=0.0, scale=8.0, seed=3838)  # a teacher tail of 1e-11 (hypothesis)
def test_lower_bound_property(kind, v, k_frac, scale, seed):
    k = max(1, min(v, round(k_frac * v)))
    s, t = draw(4, v, seed, scale)
    ids, lps = teacher_topk(t, k)
    low, exact = bucketed(kind, s.detach(), ids, lps), dense(kind, s.detach(), t)
    assert torch.isfinite(low).all()
    # The bound's tail mass is 1 - sum(top-k): float64 rounding there is ~eps / tail relative, and a student
    # that puts its mass on that tail carries it into the KL (tail 1e-11: errors ~1e-5).
    tail = (1 - lps.exp().sum(-1)).clamp_min(1e-300)
    assert (low <= exact + 1e-7 * (1 + exact.abs()) + 1e-14 / tail).all()
    if k == v:
        torch.testing.assert_close(low, exact, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 7])
def test_zero_for_identical_distributions(kind, k):
    s, _ = draw(5, 7, 6)
    ids, lps = teacher_topk(s.detach(), k)  # the teacher is the student
    out = bucketed(kind, s, ids, lps)
    torch.testing.assert_close(out, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), s)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ distill_kl


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_do_not_contribute(kind):
    b, t_len, v, k = 2, 5, 8, 3
    s, t = draw(b * t_len, v, 7)
    ids, lps = teacher_topk(t, k)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    # garbage where masked: NaN logits, out-of-range-looking duplicate ids, positive "log-probs"
    s3 = s.detach().view(b, t_len, v).clone()
    s3[~mask] = float("nan")
    s3.requires_grad_()
    ids3, lps3 = ids.view(b, t_len, k).clone(), lps.view(b, t_len, k).clone()
    ids3[~mask], lps3[~mask] = 0, 5.0
    loss = distill_kl(kind, s3, ids3, lps3, mask, beta=BETA, alpha=ALPHA)
    ref = bucketed(kind, s.detach(), ids, lps)[mask.view(-1)].mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert (s3.grad[~mask] == 0).all()
    assert torch.isfinite(s3.grad).all()


def test_flat_and_batched_shapes_agree():
    s, t = draw(6, 8, 8)
    ids, lps = teacher_topk(t, 4)
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    flat = distill_kl("reverse", s, ids, lps, mask)
    batched = distill_kl("reverse", s.view(2, 3, 8), ids.view(2, 3, 4), lps.view(2, 3, 4), mask.view(2, 3))
    torch.testing.assert_close(flat, batched)


def test_topk_may_hold_only_the_selected_tokens():
    s, t = draw(6, 8, 11)
    ids, lps = teacher_topk(t, 4)
    mask = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    dense_rows = distill_kl("jsd", s.view(2, 3, 8), ids.view(2, 3, 4), lps.view(2, 3, 4), mask.view(2, 3))
    packed = distill_kl("jsd", s.view(2, 3, 8), ids[mask], lps[mask], mask.view(2, 3))
    torch.testing.assert_close(packed, dense_rows)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_mask_gives_an_exact_zero_that_reads_no_logit(kind, dtype):
    s, t = draw(3, 5, 9)
    ids, lps = teacher_topk(t, 2)
    garbage = s.detach().to(dtype).clone()
    garbage[0, 1], garbage[1], garbage[2, 0] = float("nan"), float("inf"), -float("inf")  # masked anyway
    garbage.requires_grad_()
    for topk in ((ids, lps), (ids[:0], lps[:0])):  # dense rows, or the (0, k) selected rows of a cache
        loss = distill_kl(kind, garbage, *topk, torch.zeros(3, dtype=torch.bool))
        assert loss.item() == 0.0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, garbage)
        assert (g == 0).all()


def test_unknown_kind_and_bad_coefficients_are_clear_errors():
    s, t = draw(2, 5, 10)
    ids, lps = teacher_topk(t, 2)
    mask = torch.ones(2, dtype=torch.bool)
    with pytest.raises(TrainingError, match=r"unknown KL kind 'tvd'.*'reverse'"):
        distill_kl("tvd", s, ids, lps, mask)
    with pytest.raises(TrainingError, match="beta"):
        distill_kl("jsd", s, ids, lps, mask, beta=1.0)
    with pytest.raises(TrainingError, match="alpha"):
        distill_kl("skew_reverse", s, ids, lps, mask, alpha=0.0)
    with pytest.raises(TrainingError, match="token counts"):
        distill_kl("reverse", s, ids, lps, torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ L_align, L_PT


def test_feature_align_equal_dims_is_mse_and_only_student_gets_gradient():
    zs = torch.randn(2, 4, 6, requires_grad=True)
    zt = torch.randn(2, 4, 6).half()
    assert make_adapter(6, 6) is None
    loss = feature_align_loss(zs, zt, None)
    torch.testing.assert_close(loss, ((zs - zt.float()) ** 2).mean())
    loss.backward()
    assert zs.grad is not None


def test_feature_align_with_adapter_and_pooling():
    torch.manual_seed(0)
    adapter = make_adapter(3, 5)
    assert isinstance(adapter, FeatureAdapter) and adapter.in_features == 3 and adapter.out_features == 5
    zs = torch.randn(2, 16, 3, requires_grad=True)
    zt = torch.randn(2, 4, 5)
    loss = feature_align_loss(zs, zt, adapter, pool=2)
    pooled = zs.view(2, 2, 2, 2, 2, 3).mean(dim=(2, 4)).reshape(2, 4, 3)  # (B, gy, py, gx, px, D)
    torch.testing.assert_close(loss, ((adapter(pooled) - zt) ** 2).mean())
    loss.backward()
    assert adapter.weight.grad is not None and zs.grad is not None


def test_feature_align_shape_mismatch_is_clear():
    with pytest.raises(ModelError, match="make_adapter"):
        feature_align_loss(torch.randn(1, 4, 3), torch.randn(1, 4, 5), None)
    with pytest.raises(ModelError, match="pooling"):
        feature_align_loss(torch.randn(1, 16, 5), torch.randn(1, 4, 5), None)


def test_lm_loss_shifts_and_ignores():
    logits = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE, 3, 5, IGNORE], [IGNORE, IGNORE, 1, 6]])
    expected = -torch.stack(
        [
            F.log_softmax(logits[0, 0], -1)[3],
            F.log_softmax(logits[0, 1], -1)[5],
            F.log_softmax(logits[1, 1], -1)[1],
            F.log_softmax(logits[1, 2], -1)[6],
        ]
    ).mean()
    torch.testing.assert_close(lm_loss(logits, labels), expected)
    empty = lm_loss(logits, torch.full((2, 4), IGNORE))
    assert empty.item() == 0.0 and empty.requires_grad


def test_lm_loss_never_reads_an_ignored_position():
    """NaN/inf logits at prompt or padding positions (fp16 overflow) reach neither the loss nor a gradient."""
    clean = torch.randn(2, 4, 7, dtype=torch.float64)
    labels = torch.tensor([[IGNORE, 3, 5, IGNORE], [IGNORE, IGNORE, 1, 6]])
    dirty = clean.clone()
    dirty[0, 2:], dirty[1, 0], dirty[1, 3, 2] = float("nan"), float("inf"), -float("inf")  # uncounted rows
    dirty.requires_grad_()
    loss = lm_loss(dirty, labels)
    torch.testing.assert_close(loss, lm_loss(clean, labels))
    (g,) = torch.autograd.grad(loss, dirty)
    assert torch.isfinite(g).all() and (g[0, 2:] == 0).all() and (g[1, 0] == 0).all()
    empty = lm_loss(dirty, torch.full((2, 4), IGNORE))
    assert empty.item() == 0.0
    (g,) = torch.autograd.grad(empty, dirty)
    assert (g == 0).all()
