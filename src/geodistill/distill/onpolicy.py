"""MiniLLM's on-policy terms (Gu et al., ICLR 2024): teacher-mixed sampling and the decomposed gradient.

The paper's eq. (8) splits the gradient of the sequence-level reverse KL L(theta) = KL(q_theta || p)
into two terms, grad L = (grad L)_Single + (grad L)_Long, with

    (grad L)_Single = -E[ sum_t w_t grad E_{y_t ~ q_t}[r_t] ]       exact per-step term, over the full vocab
    (grad L)_Long   = -E[ sum_t w_t R_{t+1} grad log q(y_t) ]      REINFORCE on the future reward

where r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x) and R_{t+1} = sum_{k>t} r_k (eq. 9). Since
E_{y_t ~ q_t}[r_t] = -KL(q_t || p_t), (grad L)_Single = +E[ sum_t w_t grad KL(q_t || p_t) ]. Responses
are sampled from the teacher-mixed distribution (1 - a) q + a p, and w_t re-weights them to q. Each of
the three pieces is a function here; ``onpolicy_losses`` assembles them into scalar losses whose
gradients are the two terms above, so that gradient descent on them lowers KL(q_theta || p). The teacher
is consulted only for the sampled responses (docs/design.md).

Models are HF causal-LM-like: forward(input_ids, attention_mask, position_ids, [pixel_values],
<cache kwarg>, use_cache) -> .logits and a KV cache. transformers >= 5.2x names the cache ``cache`` (input
and output; ``past_key_values`` is a deprecated alias), older versions ``past_key_values``; both work.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geodistill.errors import ModelError, TrainingError
from geodistill.models.llava import unwrap

# ----------------------------------------------------------------------------------- model plumbing


def _cache_kwarg(model: nn.Module) -> str:
    """'cache' for transformers versions that renamed it, else 'past_key_values'."""
    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: (B, L) mask -> (B, L) ids, 0 at padding.

    HF Llama defaults to arange(L), which shifts every position of a left-padded row; passing these in
    both the cached sampling and the full re-scoring forward keeps the two identical.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    cache: Any,
    use_cache: bool,
) -> Any:
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": use_cache,
    }
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    return model(**kwargs)


def _check_vocab(q_logits: torch.Tensor, p_logits: torch.Tensor) -> None:
    if q_logits.shape[-1] != p_logits.shape[-1]:
        raise ModelError(
            f"student vocabulary ({q_logits.shape[-1]}) differs from the teacher's ({p_logits.shape[-1]}); "
            "on-policy distillation needs a shared tokenizer and equal (padded) vocab sizes"
        )


# ----------------------------------------------------------------------------------- sampling


@dataclass
class SampleBatch:
    """Responses sampled from (1 - a) q + a p, with what the losses need. T = generated steps.

    logq / logp are the log-probs of each sampled token under the student / teacher at temperature 1
    (the distributions KL(q || p) is about); logmix is its log-prob under the distribution it was actually
    drawn from (mixture of the temperature-scaled q and p), the proposal of the importance weight.
    Entries after a row's EOS are padding: token = pad id, log-probs 0, response_mask False.
    """

    input_ids: torch.Tensor  # (B, L) left-padded prompts
    attention_mask: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor | None  # (B, C, H, W) or None for text-only models
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) bool, True up to and including EOS
    logq: torch.Tensor  # (B, T)
    logp: torch.Tensor  # (B, T)
    logmix: torch.Tensor  # (B, T)
    mix_alpha: float
    temperature: float
    student_logits: torch.Tensor | None = None  # (B, T, V), only with keep_logits=True (tests, debugging)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (B,)


def _check_sampling(mix_alpha: float, temperature: float, max_new_tokens: int) -> None:
    if not 0.0 <= mix_alpha <= 1.0:
        raise TrainingError(f"mix_alpha must be in [0, 1], got {mix_alpha}")
    if temperature <= 0:
        raise TrainingError(f"temperature must be > 0, got {temperature}")
    if max_new_tokens < 1:
        raise TrainingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _step_distributions(
    q_logits: torch.Tensor, p_logits: torch.Tensor, mix_alpha: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, V) logits of one step -> log q, log p (temperature 1) and log of the sampling mixture, each (B, V).

    The mixture is (1 - a) q_T + a p_T of the temperature-scaled distributions.
    """
    _check_vocab(q_logits, p_logits)
    log_q = F.log_softmax(q_logits, -1)  # (B, V)
    log_p = F.log_softmax(p_logits, -1)  # (B, V)
    if temperature == 1.0:
        log_qt, log_pt = log_q, log_p
    else:
        log_qt = F.log_softmax(q_logits / temperature, -1)
        log_pt = F.log_softmax(p_logits / temperature, -1)
    # log(1 - a) and log(a) as floats; log(0) = -inf makes the mixture exactly q (or p) at a = 0 (or 1)
    log_wq = math.log1p(-mix_alpha) if mix_alpha < 1 else -math.inf
    log_wp = math.log(mix_alpha) if mix_alpha > 0 else -math.inf
    return log_q, log_p, torch.logaddexp(log_qt + log_wq, log_pt + log_wp)


@torch.no_grad()
def mixed_sample(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    mix_alpha: float,
    temperature: float = 1.0,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    keep_logits: bool = False,
) -> SampleBatch:
    """Sample y_t ~ (1 - a) q_T(. | y_<t, x) + a p_T(. | y_<t, x), with KV caches for both models.

    q_T, p_T are softmax(logits / temperature). Step 1 feeds the whole left-padded prompt (with
    ``pixel_values``); later steps feed only the new token with the caches, the attention mask extended by
    one and explicit positions (see ``position_ids_from_mask``). A row stops at its first EOS (kept in the
    response); the loop ends when every row has stopped or after ``max_new_tokens``. The image token is never
    drawn. Both models run in eval mode (restored afterwards); no gradient.
    """
    _check_sampling(mix_alpha, temperature, max_new_tokens)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        b = input_ids.shape[0]
        device = input_ids.device
        eos = eos.to(device)
        mask = attention_mask.long()  # (B, L), grows by one column per step
        step_ids, positions = input_ids, position_ids_from_mask(mask)  # first step: the whole prompt
        q_cache = p_cache = None
        pix: torch.Tensor | None = pixel_values
        image_token = getattr(getattr(student, "config", None), "image_token_id", None)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, keep, lq, lp, lmix, kept_logits = [], [], [], [], [], []
        for _ in range(max_new_tokens):
            q_out = _forward(student, step_ids, mask, positions, pix, q_cache, use_cache=True)
            p_out = _forward(teacher, step_ids, mask, positions, pix, p_cache, use_cache=True)
            q_cache, p_cache, pix = _out_cache(q_out), _out_cache(p_out), None
            q_logits = q_out.logits[:, -1].float()  # (B, V)
            p_logits = p_out.logits[:, -1].float()  # (B, V)
            log_q, log_p, log_mix = _step_distributions(q_logits, p_logits, mix_alpha, temperature)
            probs = log_mix.exp()  # (B, V)
            if image_token is not None:
                # An <image> in a response makes LLaVA's next forward expect another image's features. The
                # draw skips it; the recorded log-probs stay those of the full distributions (a trained model
                # gives <image> ~0 mass in answers, so importance weights are off by 1 / (1 - that mass)).
                probs[:, image_token] = 0.0
            if generator is not None and generator.device != probs.device:
                probs = probs.cpu()  # the run's generator (checkpointed with it) lives on the CPU
            y = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)  # (B,)
            y = torch.where(done, torch.full_like(y, pad_token_id), y)
            live = ~done  # (B,) this step belongs to the response
            tokens.append(y)
            keep.append(live)
            for store, dist in ((lq, log_q), (lp, log_p), (lmix, log_mix)):
                store.append(torch.where(live, dist.gather(-1, y[:, None]).squeeze(-1), 0.0))
            if keep_logits:
                kept_logits.append(q_logits)
            done = done | torch.isin(y, eos)
            if bool(done.all()):
                break
            # next step: the new token only; its position is one past the row's last real position
            positions = positions[:, -1:] + 1  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # (B, L + t)
            step_ids = y[:, None]  # (B, 1)
        return SampleBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            response_ids=torch.stack(tokens, 1),
            response_mask=torch.stack(keep, 1),
            logq=torch.stack(lq, 1),
            logp=torch.stack(lp, 1),
            logmix=torch.stack(lmix, 1),
            mix_alpha=mix_alpha,
            temperature=temperature,
            student_logits=torch.stack(kept_logits, 1) if keep_logits else None,
        )
    finally:
        student.train(modes[0])
        teacher.train(modes[1])


# ----------------------------------------------------------------------------------- weights, returns


def importance_weights(logq: torch.Tensor, logp_mix: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Per-token importance weight w_t = q(y_t) / ((1 - a) q(y_t) + a p(y_t)), capped at ``clip``.

    logq (B, T): log q of the sampled tokens; logp_mix (B, T): their log-prob under the sampling mixture.
    Returns (B, T), detached. At a = 0 (and temperature 1) w = 1 exactly.

    The paper's eq. (9) writes w_t = prod_{k<=t} q_k / p_k: a product of T ratios whose log is a sum of
    T terms, so its variance grows with length and after a few dozen tokens it is 0 or inf in floating
    point. MiniLLM (Sec. 2.2 and its code) uses the per-token ratio against the mixture instead, as here.

    Clipping, exactly: here w_t = min(w_t, clip), nothing else. At temperature 1, w_t <= 1 / (1 - a)
    (1.25 at a = 0.2), so the default cap of 3 never binds; it exists for other temperatures, where the
    proposal mixes *tempered* q and p and q / mix is unbounded. MiniLLM's code (LMOps ``minillm``) does
    not cap w: it multiplies w into the PPO ratio and clips that product, PPO-style, to
    [1 - cliprange, 1 + cliprange] = [0.8, 1.2] by default, inside max(-A r w, -A clip(r w)); even at the
    first update (r = 1) that drops the gradient of every token with w > 1.2 and A > 0 (at a = 0.2 and
    temperature 1: q(y_t) > 6 p(y_t)) or with w < 0.8 and A < 0. This module takes one gradient step
    per rollout, with no old-policy ratio and no trust region to keep, so it keeps every token's
    gradient and only bounds the weight's variance by the cap. (LMOps also leaves its single-step term
    unweighted; ``onpolicy_losses`` weights both terms by w_t, as eq. (8) does.)
    """
    w = torch.exp((logq - logp_mix).detach().float())  # (B, T)
    return w if clip is None else w.clamp(max=clip)


def normalized_returns(r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised future reward R^Norm_{t+1} = (sum_{k>t} r_k) / |{k > t}|, per row.

    r (B, T) per-token rewards r_k = log p(y_k) - log q(y_k); mask (B, T) response mask (a prefix of
    each row). Sums and counts run over masked tokens only; where no token follows (the last token),
    R = 0. Returns (B, T), 0 at masked-out positions.

    The remaining-length normalisation is MiniLLM's (grad L)_Long^Norm: without it long responses get
    returns of proportionally larger magnitude and dominate the gradient. Unlike MiniLLM's code, whose
    return at t includes r_t itself, the sum starts at t + 1 as in eq. (9): the expectation of r_t is
    handled exactly by the single-step term, so counting it again here would double it.
    """
    m = mask.to(r.dtype)
    rm = r * m  # (B, T)
    incl = rm.flip(-1).cumsum(-1).flip(-1)  # (B, T) sum_{k>=t}
    after = incl - rm  # (B, T) sum_{k>t}
    n_after = m.flip(-1).cumsum(-1).flip(-1) - m  # (B, T) |{k > t}|
    return torch.where(n_after > 0, after / n_after.clamp(min=1), 0.0) * m


def _whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries: the mean is the policy-gradient baseline."""
    sel = x[mask]
    if sel.numel() < 2:
        return torch.zeros_like(x)
    var, mean = torch.var_mean(sel, unbiased=False)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + 1e-8), 0.0)


# ----------------------------------------------------------------------------------- losses


def _response_logits(model: nn.Module, samples: SampleBatch, full_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits predicting each response token, from one full forward on prompt + response."""
    ids = torch.cat([samples.input_ids, samples.response_ids], dim=-1)  # (B, L + T)
    out = _forward(
        model, ids, full_mask, position_ids_from_mask(full_mask), samples.pixel_values, None, use_cache=False
    )
    length, t = samples.input_ids.shape[1], samples.response_ids.shape[1]
    return out.logits[:, length - 1 : length - 1 + t]  # position L-1+t predicts response token t


def onpolicy_losses(
    student: nn.Module,
    teacher: nn.Module,
    samples: SampleBatch,
    *,
    clip: float | None = 3.0,
    whiten: bool = True,
    single_weight: float = 1.0,
    long_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The two on-policy terms on sampled responses, as scalars whose gradients are eq. (8)'s terms.

    Re-runs the student (with gradient) and the teacher (no gradient) on prompt + response. With
    w_t = importance_weights(...) (detached), m_t the response mask and n = sum_t m_t over the batch:

        single = (1/n) sum_{b,t} m w_t KL(q_t || p_t)          full vocabulary, teacher detached:
                 grad = (1/n) sum_{b,t} m w_t grad KL(q_t || p_t), i.e. (grad L)_Single
        long   = -(1/n) sum_{b,t} m w_t A_t log q(y_t)          A_t = whiten(R^Norm_{t+1}), detached:
                 grad = -(1/n) sum_{b,t} m w_t A_t grad log q(y_t), i.e. (grad L)_Long^Norm,
                 REINFORCE with the batch mean of R as baseline
        total  = single_weight * single + long_weight * long

    r_t = log p(y_t) - log q(y_t) uses the re-computed log-probs (MiniLLM recomputes them too); the
    proposal log-prob is the one recorded at sampling time. Extra detached entries: ``reward`` (mean r_t),
    ``w`` (mean weight), ``length`` (mean response length).
    """
    rmask = samples.response_mask  # (B, T)
    full_mask = torch.cat([samples.attention_mask.long(), rmask.long()], dim=-1)  # (B, L + T)
    q_logits = _response_logits(student, samples, full_mask).float()  # (B, T, V)
    with torch.no_grad():
        p_logits = _response_logits(teacher, samples, full_mask).float()  # (B, T, V)
    _check_vocab(q_logits, p_logits)
    log_q = F.log_softmax(q_logits, -1)  # (B, T, V)
    log_p = F.log_softmax(p_logits, -1)  # (B, T, V)
    y = samples.response_ids[..., None]  # (B, T, 1)
    logq_y = log_q.gather(-1, y).squeeze(-1)  # (B, T) with gradient
    logp_y = log_p.gather(-1, y).squeeze(-1)  # (B, T)

    n = rmask.sum()
    if n == 0:
        zero = q_logits[rmask].sum()  # an empty selection: an exact 0 in the graph, no logit read
        return {"single": zero, "long": zero, "total": zero}
    m = rmask.to(log_q.dtype)
    w = importance_weights(logq_y, samples.logmix, clip) * m  # (B, T)

    kl_t = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, T) KL(q_t || p_t), gradient through q only
    single = (w * kl_t).sum() / n

    r = (logp_y - logq_y).detach() * m  # (B, T)
    adv = normalized_returns(r, rmask)  # (B, T)
    if whiten:
        adv = _whiten(adv, rmask)
    long = -(w * adv * logq_y).sum() / n

    total = single_weight * single + long_weight * long
    return {
        "single": single,
        "long": long,
        "total": total,
        "reward": (r.sum() / n).detach(),
        "w": (w.sum() / n).detach(),
        "length": rmask.sum(-1).float().mean(),
    }
