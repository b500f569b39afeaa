"""The testbed's character-level tokenizer: one token per character of the task's alphabet."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<unk>", "<eos>")
# Variables, digits, the task's symbols, and what Coconut's layout adds ("\n", "#", " ").
ALPHABET = string.ascii_lowercase + string.digits + "=;+-*?[]>#\n "


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with ids 0..2 for ``<pad>``, ``<unk>``, ``<eos>`` and one id per character of ``ALPHABET``.

    It adds no special tokens of its own (no BOS); documents end in ``<eos>`` where the caller puts it.
    """
    vocab = {token: i for i, token in enumerate([*SPECIALS, *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
