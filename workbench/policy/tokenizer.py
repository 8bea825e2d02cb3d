"""A character-level tokenizer that is a plain Hugging Face fast tokenizer.

``build_char_tokenizer`` wraps a ``tokenizers`` WordLevel model (one token per character, a
pre-tokenizer that isolates every character, a ``Fuse`` decoder that joins without spaces) in a
``PreTrainedTokenizerFast``. ``save_pretrained`` writes ``tokenizer.json`` and
``AutoTokenizer.from_pretrained(folder)`` reloads it with no custom code, so the built-in model
goes through the same loading path as any Hugging Face checkpoint.

Special tokens: ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3). Encoding adds no
special tokens (no post-processor), decoding with ``skip_special_tokens=True`` returns the exact
string (``clean_up_tokenization_spaces`` is off, so spaces around punctuation survive).

Text is never parsed for special tokens (``split_special_tokens=True``, saved with the tokenizer):
the string ``"<eos>"`` in a prompt is five characters, so any text over the alphabet round-trips.

Left out: normalisation (no lowercasing or unicode folding; characters outside the alphabet map to
``<unk>``).
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from workbench.errors import WorkbenchError

if TYPE_CHECKING:  # imported where a tokenizer is built: transformers is ~2 s of importing workbench.config
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
DEFAULT_ALPHABET = string.digits + string.ascii_lowercase + "+-*/=:<>()., "


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character of ``alphabet`` (default: ``DEFAULT_ALPHABET``).

    Ids: the four special tokens first (``<pad>`` = 0), then the alphabet's characters in order of
    first appearance (duplicates are dropped). The same alphabet always gives the same ids.
    """
    from transformers import PreTrainedTokenizerFast

    if alphabet is None:
        alphabet = DEFAULT_ALPHABET
    if not isinstance(alphabet, str) or not alphabet:
        raise WorkbenchError(f"alphabet={alphabet!r} is invalid: expected a non-empty string")
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # "[\s\S]" = any single character including newlines (Oniguruma has no (?s) flag).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
        padding_side="left",
    )


def tokenizer_alphabet(alphabet: str) -> str:
    """The default alphabet extended with any extra characters a task uses (stable order).

    All built-in tasks fit the default alphabet, so they share one tokenizer; a JSONL task with
    other characters gets them appended in sorted order.
    """
    extra = sorted(set(alphabet) - set(DEFAULT_ALPHABET))
    return DEFAULT_ALPHABET + "".join(extra)


__all__ = ["DEFAULT_ALPHABET", "SPECIAL_TOKENS", "build_char_tokenizer", "tokenizer_alphabet"]
