import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from geodistill.distill.onpolicy import (
    SampleBatch,
    importance_weights,
    mixed_sample,
    normalized_returns,
    onpolicy_losses,
    position_ids_from_mask,
)
from geodistill.errors import ModelError, TrainingError

V = 40
IMG = V - 1  # image placeholder id
PAD, EOS = 0, 2
# vision_feature_select_strategy="full" keeps CLS: (32 / 8)^2 + 1 image tokens
N_IMG = (32 // 8) ** 2 + 1


def tiny_llava(hidden: int, seed: int, vocab: int = V) -> LlavaForConditionalGeneration:
    """A LLaVA with a 3-layer CLIP tower and a 2-layer Llama; the image token id is IMG for every vocab."""
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=vocab,
        ),
        image_token_index=IMG,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def student():
    return tiny_llava(64, 0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llava(96, 1)


@pytest.fixture(scope="module")
def prompts():
    """Two prompts, the first left-padded: [pad pad | image | text] and [text text | image | text]."""
    g = torch.Generator().manual_seed(0)
    prefix = torch.stack([torch.full((2,), PAD), torch.randint(3, IMG, (2,), generator=g)])  # (2, 2)
    text = torch.randint(3, IMG, (2, 5), generator=g)
    ids = torch.cat([prefix, torch.full((2, N_IMG), IMG), text], dim=1)  # (2, 2 + N_IMG + 5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pixel_values = torch.randn(2, 3, 32, 32, generator=g)
    return ids, mask, pixel_values


def sample(student, teacher, prompts, alpha, seed=0, **kw):
    ids, mask, pv = prompts
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("eos_token_id", EOS)
    return mixed_sample(
        student,
        teacher,
        ids,
        mask,
        pv,
        mix_alpha=alpha,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


@torch.no_grad()
def full_logits(model, samples: SampleBatch) -> torch.Tensor:
    """(B, T, V) logits at the response positions from one uncached forward on the final sequence."""
    ids = torch.cat([samples.input_ids, samples.response_ids], 1)
    mask = torch.cat([samples.attention_mask, torch.ones_like(samples.response_ids)], 1)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        pixel_values=samples.pixel_values,
    )
    length, t = samples.input_ids.shape[1], samples.response_ids.shape[1]
    return out.logits[:, length - 1 : length - 1 + t].float()


# ------------------------------------------------------------------------------------------ sampling


def test_kv_cached_sampling_matches_full_forward(student, teacher, prompts):
    s = sample(student, teacher, prompts, alpha=0.3, eos_token_id=[-1], keep_logits=True)  # never stops
    assert s.response_ids.shape == (2, 6) and s.response_mask.all()
    q_full = full_logits(student, s)
    torch.testing.assert_close(s.student_logits, q_full, atol=1e-5, rtol=1e-5)
    y = s.response_ids[..., None]
    torch.testing.assert_close(s.logq, F.log_softmax(q_full, -1).gather(-1, y)[..., 0], atol=1e-5, rtol=0)
    p_full = full_logits(teacher, s)
    torch.testing.assert_close(s.logp, F.log_softmax(p_full, -1).gather(-1, y)[..., 0], atol=1e-5, rtol=0)


def test_alpha_zero_samples_from_student_only(student, teacher, prompts):
    s = sample(student, teacher, prompts, alpha=0.0)
    # the proposal is q itself: recorded log-probs agree exactly, and weights are exactly 1
    assert torch.equal(s.logmix, s.logq)
    assert torch.equal(importance_weights(s.logq, s.logmix, clip=3.0), torch.ones_like(s.logq))
    q_full = full_logits(student, s)
    ref = F.log_softmax(q_full, -1).gather(-1, s.response_ids[..., None])[..., 0]
    torch.testing.assert_close(s.logq[s.response_mask], ref[s.response_mask], atol=1e-5, rtol=0)
    # the teacher cannot influence the draws: another teacher, same seed, same tokens
    other = sample(student, tiny_llava(48, 7), prompts, alpha=0.0)
    assert torch.equal(other.response_ids, s.response_ids)


def test_image_token_is_never_drawn(prompts):
    """Models that put nearly all mass on <image> still answer without it (it would break the forward)."""
    student, teacher = tiny_llava(64, 0), tiny_llava(96, 1)
    for model in (student, teacher):
        with torch.no_grad():
            model.lm_head.bias = torch.nn.Parameter(torch.zeros(V))
            model.lm_head.bias[IMG] = 30.0
    s = sample(student, teacher, prompts, alpha=0.5, max_new_tokens=8)
    assert s.response_mask.any() and not (s.response_ids == IMG).any()
    onpolicy_losses(student, teacher, s, clip=3.0)  # the full forward on prompt + response runs


def test_alpha_one_samples_from_teacher_only(student, teacher, prompts):
    s = sample(student, teacher, prompts, alpha=1.0)
    assert torch.equal(s.logmix, s.logp)
    other = sample(tiny_llava(48, 7), teacher, prompts, alpha=1.0)
    assert torch.equal(other.response_ids, s.response_ids)


def test_temperature_changes_the_proposal_not_the_target(student, teacher, prompts):
    s = sample(student, teacher, prompts, alpha=0.0, temperature=2.0)
    q_full = full_logits(student, s)
    y = s.response_ids[..., None]
    torch.testing.assert_close(s.logq, F.log_softmax(q_full, -1).gather(-1, y)[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        s.logmix, F.log_softmax(q_full / 2, -1).gather(-1, y)[..., 0], atol=1e-5, rtol=0
    )


def test_response_stops_after_eos(student, teacher, prompts):
    # most of the vocabulary counts as EOS, so rows stop early and at different steps
    eos = list(range(3, 30))
    s = sample(student, teacher, prompts, alpha=0.2, eos_token_id=eos, max_new_tokens=12, seed=3)
    for row in range(2):
        toks, keep = s.response_ids[row], s.response_mask[row]
        first = next(i for i, tok in enumerate(toks.tolist()) if tok in eos)
        assert keep[: first + 1].all() and not keep[first + 1 :].any()  # EOS itself is kept
        assert (toks[first + 1 :] == PAD).all()
        assert (s.logq[row, first + 1 :] == 0).all() and (s.logmix[row, first + 1 :] == 0).all()
    assert s.response_ids.shape[1] == int(s.lengths.max())  # the loop ends once every row has stopped


def test_models_are_left_in_their_modes(student, teacher, prompts):
    student.train()
    try:
        sample(student, teacher, prompts, alpha=0.2, max_new_tokens=1)
        assert student.training and not teacher.training
    finally:
        student.eval()


def test_bad_arguments_and_vocab_mismatch(student, teacher, prompts):
    with pytest.raises(TrainingError, match="mix_alpha"):
        sample(student, teacher, prompts, alpha=1.5)
    with pytest.raises(TrainingError, match="temperature"):
        sample(student, teacher, prompts, alpha=0.2, temperature=0.0)
    big = tiny_llava(48, 3, vocab=V + 8)
    with pytest.raises(ModelError, match="vocabulary"):
        sample(student, big, prompts, alpha=0.2, max_new_tokens=1)


# ------------------------------------------------------------------------------------------ weights, returns


def test_importance_weights_values_and_clip():
    a = 0.2
    q = torch.tensor([[0.5, 0.01, 0.3]])
    p = torch.tensor([[0.1, 0.9, 0.3]])
    mix = (1 - a) * q + a * p
    w = importance_weights(q.log(), mix.log(), clip=None)
    torch.testing.assert_close(w, q / mix)
    assert (w <= 1 / (1 - a) + 1e-6).all()  # the mixture bounds w at temperature 1
    clipped = importance_weights(torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 0.0]]), clip=2.0)
    torch.testing.assert_close(clipped, torch.tensor([[1.0, 2.0]]))


def test_normalized_returns_hand_example():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 99.0, 99.0]])  # 99 sits past row 1's end
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    expected = torch.tensor(
        [
            [(2 + 3 + 4) / 3, (3 + 4) / 2, 4 / 1, 0.0],  # R_{t+1} / |{k > t}|, 0 after the last token
            [1.0 / 1, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(normalized_returns(r, mask), expected)


# ------------------------------------------------------------------------------------------ losses


def test_onpolicy_losses_are_finite_and_only_student_gets_gradient(student, teacher, prompts):
    s = sample(student, teacher, prompts, alpha=0.2)
    student.zero_grad()
    teacher.zero_grad()
    out = onpolicy_losses(student, teacher, s, single_weight=0.5, long_weight=2.0)
    torch.testing.assert_close(out["total"], 0.5 * out["single"] + 2.0 * out["long"])
    assert out["single"] > 0
    out["total"].backward()
    llm = [p.grad for p in student.model.language_model.parameters()] + [student.lm_head.weight.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in llm)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert student.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0  # through the image
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()


def test_onpolicy_losses_vanish_when_teacher_is_student(student, prompts):
    s = sample(student, student, prompts, alpha=0.2)
    out = onpolicy_losses(student, student, s)
    assert abs(out["single"].item()) < 1e-6
    assert abs(out["long"].item()) < 1e-6
    assert abs(out["reward"].item()) < 1e-6


def test_onpolicy_losses_ignore_tokens_after_eos(student, teacher, prompts):
    eos = list(range(3, 30))
    s = sample(student, teacher, prompts, alpha=0.2, eos_token_id=eos, max_new_tokens=12, seed=3)
    assert not s.response_mask.all()
    with torch.no_grad():
        base = onpolicy_losses(student, teacher, s)
        altered = SampleBatch(**{**vars(s), "response_ids": s.response_ids.masked_fill(~s.response_mask, 31)})
        moved = onpolicy_losses(student, teacher, altered)
    for key in ("single", "long", "reward", "w"):
        torch.testing.assert_close(moved[key], base[key], atol=1e-6, rtol=1e-5)


def test_long_term_gradient_is_weighted_reinforce(student, teacher, prompts):
    """Without whitening, grad(long) = -(1/n) sum w_t R^Norm_{t+1} grad log q(y_t)."""
    s = sample(student, teacher, prompts, alpha=0.5, eos_token_id=[-1], max_new_tokens=4)
    params = list(student.parameters())
    long = onpolicy_losses(student, teacher, s, whiten=False, clip=None)["long"]
    g_long = torch.autograd.grad(long, params, allow_unused=True)

    ids = torch.cat([s.input_ids, s.response_ids], 1)
    mask = torch.cat([s.attention_mask, torch.ones_like(s.response_ids)], 1)
    logits = student(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        pixel_values=s.pixel_values,
    ).logits
    length, t = s.input_ids.shape[1], s.response_ids.shape[1]
    logq = F.log_softmax(logits[:, length - 1 : length - 1 + t].float(), -1).gather(
        -1, s.response_ids[..., None]
    )
    logq = logq[..., 0]
    p_logits = full_logits(teacher, s)
    logp = F.log_softmax(p_logits, -1).gather(-1, s.response_ids[..., None])[..., 0]
    w = (logq.detach() - s.logmix).exp()
    ret = normalized_returns((logp - logq).detach(), s.response_mask)
    manual = -(w * ret * logq).sum() / s.response_mask.sum()
    g_manual = torch.autograd.grad(manual, params, allow_unused=True)
    for a, b in zip(g_long, g_manual, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert math.isfinite(long.item())


def test_single_step_gradient_is_the_weighted_kl_gradient(student, teacher, prompts):
    """grad(single) = (1/n) sum w_t grad KL(q_t || p_t) = -(1/n) sum w_t grad E_{y~q_t}[r_t]: descending it
    lowers the reverse KL (the sign the module docstring states)."""
    s = sample(student, teacher, prompts, alpha=0.5, eos_token_id=[-1], max_new_tokens=4)
    params = [p for p in student.parameters() if p.requires_grad]
    single = onpolicy_losses(student, teacher, s, clip=None)["single"]
    g_single = torch.autograd.grad(single, params, allow_unused=True)

    ids = torch.cat([s.input_ids, s.response_ids], 1)
    mask = torch.cat([s.attention_mask, torch.ones_like(s.response_ids)], 1)
    positions = position_ids_from_mask(mask)
    logits = student(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=s.pixel_values)
    length, t = s.input_ids.shape[1], s.response_ids.shape[1]
    log_q = F.log_softmax(logits.logits[:, length - 1 : length - 1 + t].float(), -1)  # (B, T, V)
    log_p = F.log_softmax(full_logits(teacher, s), -1)
    w = (log_q.gather(-1, s.response_ids[..., None])[..., 0].detach() - s.logmix).exp()
    expected_reward = (log_q.exp() * (log_p - log_q)).sum(-1)  # E_{y ~ q_t}[r_t] = -KL(q_t || p_t)
    manual = -(w * expected_reward).sum() / s.response_mask.sum()
    g_manual = torch.autograd.grad(manual, params, allow_unused=True)
    for a, b in zip(g_single, g_manual, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert single > 0


def test_no_response_token_gives_an_exact_zero_that_reads_no_logit(student, teacher, prompts):
    s = sample(student, teacher, prompts, alpha=0.2)
    empty = SampleBatch(**{**vars(s), "response_mask": torch.zeros_like(s.response_mask)})
    # Every student logit NaN (an fp16 overflow, say), still in the graph: nothing of it may reach the zero.
    hook = student.lm_head.register_forward_hook(lambda _m, _i, out: out + float("nan"))
    try:
        out = onpolicy_losses(student, teacher, empty)
    finally:
        hook.remove()
    for key in ("single", "long", "total"):
        assert out[key].item() == 0.0 and out[key].requires_grad
    grads = torch.autograd.grad(out["total"], list(student.parameters()), allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)
