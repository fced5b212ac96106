"""A real, tiny Hugging Face tokenizer built offline, for tests of anything that takes an HF tokenizer.

There is no network in the test environments, so nothing may call `from_pretrained` on a hub id. This builds
a byte-level BPE tokenizer (the 256 byte symbols, a handful of merges) with Qwen-style special tokens and a
Qwen-like Jinja chat template, wrapped in `transformers.PreTrainedTokenizerFast`. Byte-level means every
string, LaTeX and non-ASCII included, encodes and decodes back exactly, so tests can compare decoded prompt
ids with an independent rendering of the template.
"""

from __future__ import annotations

__all__ = ["QWEN_LIKE_CHAT_TEMPLATE", "SPECIAL_TOKENS", "tiny_chat_tokenizer"]

# The structure of Qwen2.5/Qwen3's template without tools: `<|im_start|>{role}\n{content}<|im_end|>\n` per
# message, then `<|im_start|>assistant\n` for the generation prompt.
QWEN_LIKE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# A few merges so that multi-byte tokens exist (decode must join them); "Ġ" is the byte-level space.
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "i"), ("Ġi", "s")]


def tiny_chat_tokenizer(*, chat_template: bool = True, eos_token: str = "<|im_end|>"):
    """A `PreTrainedTokenizerFast` with 256 byte tokens, the merges above and `SPECIAL_TOKENS` (ids after
    the merged tokens). `eos_token` is `<|im_end|>` like Qwen's instruct models; the pad token is
    `<|endoftext|>`. `chat_template=False` leaves the template unset (plain-encode path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {sym: i for i, sym in enumerate(sorted(alphabet))}
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, pad_token="<|endoftext|>",
                                  additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in
                                                             (eos_token, "<|endoftext|>")],
                                  clean_up_tokenization_spaces=False)
    if chat_template:
        tok.chat_template = QWEN_LIKE_CHAT_TEMPLATE
    return tok
