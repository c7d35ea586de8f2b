"""A word-level tokenizer for closed-vocabulary data (the shapes world), used through transformers.

The tokenizer is a `tokenizers` WordLevel model wrapped in `transformers.PreTrainedTokenizerFast`,
so preprocessing code written for LLaVA-1.5's real tokenizer runs unchanged on it:

- normaliser: lower-case; pre-tokeniser: split on whitespace, then punctuation as separate tokens;
- special tokens `<unk>` (0), `<s>` (1, BOS), `</s>` (2, EOS), `<pad>` (3), `<image>` (4), each an
  added special token, so "<image>" anywhere in text is exactly one id (`tokenizer.image_token_id`);
- like Llama's tokenizer it prepends BOS (and no EOS) when `add_special_tokens=True`;
- decoding joins words with spaces and removes the space before punctuation, so a lower-case
  sentence such as "a red circle, a blue square." decodes back to itself. Line breaks are
  whitespace to the pre-tokeniser and do not survive a round trip.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
TOKENIZER_CONFIG = "tokenizer_config.json"  # what save_pretrained writes; load_tokenizer needs it
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def build_word_tokenizer(words: Iterable[str], *, model_max_length: int) -> PreTrainedTokenizerFast:
    """Builds a word-level tokenizer whose vocabulary is the special tokens followed by `words`.

    Args:
      words: the vocabulary; every entry must be one pre-token (a lower-case word without spaces,
        or a single punctuation mark). Duplicates are kept once, in first-seen order.
      model_max_length: recorded in the tokenizer config (transformers truncates to it on request).

    Returns:
      A `PreTrainedTokenizerFast` with ids 0..4 for `SPECIAL_TOKENS` and 5.. for `words`.

    Raises:
      ValueError: a word that the normaliser/pre-tokeniser would not map to itself as one token,
        or one that collides with a special token.
    """
    splitter = _pre_tokenizer()
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        pieces = [piece for piece, _ in splitter.pre_tokenize_str(word.lower())]
        if pieces != [word]:
            raise ValueError(
                f"vocabulary entry {word!r} is not a single lower-case pre-token (it splits into "
                f"{pieces}); give words without spaces, upper case or attached punctuation"
            )
        if word in SPECIAL_TOKENS:
            raise ValueError(f"vocabulary entry {word!r} collides with a special token {SPECIAL_TOKENS}")
        vocabulary.setdefault(word, len(vocabulary))

    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = splitter
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    # The WordPiece decoder with no "##" pieces joins with spaces; cleanup drops " ." -> ".".
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bos_id = vocabulary[BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Loads a tokenizer saved with `save_pretrained` from a local directory (never downloads).

    Raises:
      FileNotFoundError: `path` is not a directory holding a saved tokenizer.
    """
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, TOKENIZER_CONFIG)):
        raise FileNotFoundError(
            f"no saved tokenizer at {path!r}: expected a directory with tokenizer_config.json "
            "(written by save_pretrained)"
        )
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS id (what generation writes after EOS)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
