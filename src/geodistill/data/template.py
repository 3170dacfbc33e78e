"""The vicuna_v1 conversation template (LLaVA-1.5 / GeoChat) with an assistant-token mask.

Rendered text::

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

Loss (and distillation) applies to the assistant answers and their closing ``</s>`` only. The text is
tokenised piece by piece, so the mask is exact and teacher, student and cache all agree on token
positions as long as they share the tokenizer (checked by the cache fingerprint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from geodistill.data.records import IMAGE_PLACEHOLDER, Turn

TEMPLATE_NAME = "vicuna_v1"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the template uses."""

    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, token: str) -> int: ...


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    assistant_mask: list[bool]
    """True at tokens the model must predict (answers and their ``</s>``)."""


def _encode_user(tok: Tokenizer, text: str, image_id: int, num_image_tokens: int) -> list[int]:
    """Encode a user segment, expanding ``<image>`` to ``num_image_tokens`` image tokens."""
    ids: list[int] = []
    parts = text.split(IMAGE_PLACEHOLDER)
    for i, part in enumerate(parts):
        if i > 0:
            ids.extend([image_id] * num_image_tokens)
        if part:
            ids.extend(tok.encode(part, add_special_tokens=False))
    return ids


def encode_conversation(
    tok: Tokenizer, turns: Sequence[Turn], num_image_tokens: int, *, for_generation: bool = False
) -> Encoded:
    """Tokenise a whole conversation; ``for_generation`` drops the last answer and ends at ``ASSISTANT:``.

    The image placeholder becomes ``num_image_tokens`` copies of the ``<image>`` token, which is what
    ``LlavaForConditionalGeneration`` expects in ``input_ids``.
    """
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; vicuna_v1 needs '</s>'")
    ids: list[int] = [] if tok.bos_token_id is None else [tok.bos_token_id]
    mask: list[bool] = [False] * len(ids)
    if for_generation:
        turns = turns[:-1] if turns and turns[-1].role == "gpt" else turns
    prefix = SYSTEM + " "
    for turn in turns:
        if turn.role == "human":
            seg = _encode_user(tok, f"{prefix}USER: {turn.value} ASSISTANT:", image_id, num_image_tokens)
            ids += seg
            mask += [False] * len(seg)
            prefix = ""
        else:
            seg = [*tok.encode(" " + turn.value, add_special_tokens=False), eos]
            ids += seg
            mask += [True] * len(seg)
    return Encoded(ids, mask)
