"""Per-image prefix reuse in the teacher pass: an image's shared prefix runs once, then each record's rest.

All records of an image start with the same tokens: the system prompt, ``USER: `` and the image tokens
(GeoChat: 1296 of them, ~90 % of a record). The plain pass runs that prefix once per record; this one
runs it (vision tower, projector, language model) once per image in the batch, keeps its key/value
states, and runs only each record's remaining tokens against them. The supervised rows and the features
are the same up to float32 noise (tests/cache/test_prefix.py holds them to the plain pass).

**The rule** (``plan_prefixes``). A batch is cut into runs of consecutive records with the same image
(same ``image_id`` and identical pixels; a shard sample holds an image's records together, a batch
boundary may split them, and each part is then its own run). A run of >= 2 records reuses a prefix of
length

    P = min(longest common prefix of the records' tokens, shortest record - 1, first answer token - 1)

(every record keeps >= 1 token of its own, and every supervised token is predicted from the suffix
pass, so the prefix pass needs no logits), and only if that prefix holds every image token of every
record. Otherwise its records take the plain path: a single record (nothing to share), ``<image>``
after the question or behind text that differs between records (the records share at most the system
prompt: ~1 % of the work, not worth a second forward), or no image token at all.

**The passes.** Prefix: one row per run, right-padded to the longest prefix, through the LLaVA base
model (no ``lm_head``) with a KV cache; the projector outputs of that pass are the runs' features.
Suffix: one row per record, ``ids[P:]`` right-padded, at positions P, P + 1, ... (``position_ids``),
with an attention mask over [its run's prefix | its suffix]; the prefix padding is masked out. Each
layer's cached prefix is expanded to the records (``index_select``) only while that layer attends
(:class:`SharedPrefixLayer`), so memory holds the per-image prefix once, not once per record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from geodistill.data.collate import IGNORE, Batch
from geodistill.errors import ModelError
from geodistill.models.llava import capture_projector, unwrap

# -------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PrefixGroup:
    """Records of one image (batch rows, in order) that share their first ``length`` tokens."""

    rows: list[int]
    length: int


@dataclass(frozen=True)
class PrefixPlan:
    groups: list[PrefixGroup]
    """Runs that reuse a prefix (each >= 2 records)."""
    plain: list[int]
    """Rows that take the plain, whole-record pass."""


def _runs(batch: Batch) -> list[list[int]]:
    """Maximal runs of consecutive rows showing the same image (id and pixels)."""
    runs: list[list[int]] = []
    for i in range(len(batch.image_ids)):
        if runs and batch.image_ids[i] == batch.image_ids[runs[-1][0]] and torch.equal(
            batch.pixel_values[i], batch.pixel_values[runs[-1][0]]
        ):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def shared_prefix_length(ids: list[torch.Tensor], labels: list[torch.Tensor], image_token: int) -> int:
    """The prefix length P of the rule above for unpadded rows ``ids`` (L_i,) and ``labels`` (L_i,);
    0 when the rows must take the plain path."""
    if len(ids) < 2:
        return 0
    shortest = min(len(x) for x in ids)
    stacked = torch.stack([x[:shortest] for x in ids])  # (n, shortest)
    differs = (stacked != stacked[:1]).any(0).nonzero()
    common = int(differs[0]) if len(differs) else shortest
    answers = [int(s[0]) for s in ((lab != IGNORE).nonzero() for lab in labels) if len(s)]
    length = min([common, shortest - 1] + [a - 1 for a in answers])
    if length <= 0 or not bool((ids[0][:length] == image_token).any()):
        return 0
    if any(bool((x[length:] == image_token).any()) for x in ids):
        return 0  # an image token after the shared part: the prefix would not hold the image
    return length


def plan_prefixes(batch: Batch, image_token: int) -> PrefixPlan:
    """Which rows of a right-padded batch reuse which prefix (the rule in the module docstring)."""
    lengths = batch.attention_mask.sum(1).tolist()
    groups, plain = [], []
    for run in _runs(batch):
        ids = [batch.input_ids[r, : lengths[r]] for r in run]
        labels = [batch.labels[r, : lengths[r]] for r in run]
        p = shared_prefix_length(ids, labels, image_token)
        if p > 0:
            groups.append(PrefixGroup(run, p))
        else:
            plain.extend(run)
    return PrefixPlan(groups, sorted(plain))


# ----------------------------------------------------------------------------------------- the passes


class SharedPrefixLayer(DynamicLayer):
    """A cache layer holding one prefix per image; each forward sees it expanded to the records' rows.

    ``update`` returns [prefix of the row's image | the new states] without storing the new states, so a
    suffix pass never grows the cache and the (records x prefix) expansion lives one layer at a time.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.rows = keys, values, rows  # (G, H, P, d), (G, H, P, d), (R,)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([self.keys.index_select(0, self.rows), key_states], dim=-2)  # (R, H, P + S, d)
        values = torch.cat([self.values.index_select(0, self.rows), value_states], dim=-2)
        return keys, values


def _right_pad(rows: list[torch.Tensor], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T) padded rows and their (n, T) 0/1 mask."""
    t = max(len(r) for r in rows)
    out = torch.full((len(rows), t), fill, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros((len(rows), t), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return out, mask


@dataclass
class SuffixPass:
    """The suffix pass of a plan's groups: logits and labels of every group record, and the features."""

    rows: list[int]  # batch row of each suffix row, group by group
    logits: torch.Tensor  # (R, S, V) suffix position s predicts suffix token s + 1
    labels: torch.Tensor  # (R, S) unshifted suffix labels, IGNORE at padding
    features: torch.Tensor  # (G, P_img, D) the projector outputs of each group's image
    group_of: torch.Tensor  # (R,) the group of each suffix row


@torch.inference_mode()
def prefix_passes(model: nn.Module, batch: Batch, groups: list[PrefixGroup]) -> SuffixPass:
    """Run each group's prefix once and every group record's suffix against it (``batch`` on the
    model's device)."""
    base = unwrap(model)
    # Padding is masked out, so its id does not matter, except that LLaVA counts image tokens in the ids.
    pad_id = (base.config.image_token_id + 1) % base.config.text_config.vocab_size
    lengths = batch.attention_mask.sum(1).tolist()
    heads = [g.rows[0] for g in groups]
    prefix_ids, prefix_mask = _right_pad(
        [batch.input_ids[r, : g.length] for r, g in zip(heads, groups, strict=True)], pad_id
    )  # (G, Pmax)
    with capture_projector(model) as cap:
        out = base.model(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            pixel_values=batch.pixel_values[heads],
            use_cache=True,
        )
    cache = out.cache
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ModelError(
            f"prefix reuse needs a plain DynamicCache (full attention in every layer), the teacher returned "
            f"{type(cache).__name__}; set cache.prefix_reuse: false"
        )
    rows = [r for g in groups for r in g.rows]
    group_of = torch.tensor([i for i, g in enumerate(groups) for _ in g.rows], device=prefix_ids.device)
    cache.layers = [SharedPrefixLayer(layer.keys, layer.values, group_of) for layer in cache.layers]
    starts = [g.length for g in groups for _ in g.rows]
    suffix_ids, suffix_mask = _right_pad(
        [batch.input_ids[r, p : lengths[r]] for r, p in zip(rows, starts, strict=True)], pad_id
    )  # (R, S)
    suffix_labels = torch.where(
        suffix_mask.bool(),
        _right_pad([batch.labels[r, p : lengths[r]] for r, p in zip(rows, starts, strict=True)], IGNORE)[0],
        IGNORE,
    )
    positions = torch.tensor(starts, device=suffix_ids.device)[:, None] + torch.arange(
        suffix_ids.shape[1], device=suffix_ids.device
    )  # (R, S): each record continues where its prefix ended
    mask = torch.cat([prefix_mask[group_of], suffix_mask], dim=1)  # (R, Pmax + S)
    logits = model(
        input_ids=suffix_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).logits  # (R, S, V)
    return SuffixPass(rows, logits, suffix_labels, cap.features, group_of)
