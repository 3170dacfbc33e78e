from geodistill.data.records import Turn
from geodistill.data.template import SYSTEM, encode_conversation


class CharTokenizer:
    """One id per character; specials above 1000. Enough to check segmentation and masks."""

    bos_token_id = 1001
    eos_token_id = 1002
    image = 1003

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def convert_tokens_to_ids(self, token):
        assert token == "<image>"
        return self.image

    def decode(self, ids):
        names = {1001: "<s>", 1002: "</s>", 1003: "<image>"}
        return "".join(names.get(i, chr(i)) if i >= 1000 else chr(i) for i in ids)


TURNS = (
    Turn("human", "<image>\nHow many?"),
    Turn("gpt", "3"),
    Turn("human", "And ships?"),
    Turn("gpt", "no"),
)


def test_vicuna_text_and_image_expansion():
    tok = CharTokenizer()
    enc = encode_conversation(tok, TURNS, num_image_tokens=4)
    assert enc.input_ids.count(tok.image) == 4
    text = tok.decode([i for i in enc.input_ids if i != tok.image])
    assert text == f"<s>{SYSTEM} USER: \nHow many? ASSISTANT: 3</s>USER: And ships? ASSISTANT: no</s>"


def test_mask_covers_answers_and_eos_only():
    tok = CharTokenizer()
    enc = encode_conversation(tok, TURNS, num_image_tokens=4)
    assert len(enc.input_ids) == len(enc.assistant_mask)
    masked = tok.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask, strict=True) if m])
    assert masked == " 3</s> no</s>"


def test_generation_prompt_ends_at_assistant():
    tok = CharTokenizer()
    enc = encode_conversation(tok, TURNS[:2], num_image_tokens=2, for_generation=True)
    assert tok.decode(enc.input_ids).endswith("USER: <image><image>\nHow many? ASSISTANT:")
    assert not any(enc.assistant_mask)
