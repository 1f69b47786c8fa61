"""Counting CLIP tokens without a model: the tokenizer files shipped in assets/ (every SD family's CLIP text
encoders share that vocabulary), loaded once and only when a text could be longer than one window."""

from __future__ import annotations

from functools import lru_cache

WINDOW = 75  # caption tokens one pass of a CLIP text encoder reads (77 with its start and end tokens)
# Counting a text's tokens names a length, so the tokenizer does not warn of "indexing errors" (nothing is encoded)
TOKENS_COUNTED = 100_000


@lru_cache(maxsize=1)
def bundled_tokenizer():
    from transformers import CLIPTokenizer

    from .paths import sd_config_dir

    return CLIPTokenizer.from_pretrained(sd_config_dir("sd1"), subfolder="tokenizer")


def token_count(tokenizer, text: str) -> int:
    """`text`'s CLIP tokens, its start and end tokens left out."""
    return len(tokenizer(text, truncation=True, max_length=TOKENS_COUNTED).input_ids) - 2 if text else 0


def longer_than_a_window(texts: list[str]) -> list[tuple[str, int]]:
    """(text, token count) of each text longer than one window. A CLIP token covers at least one character, so a
    text of at most 75 characters is not counted (nor the tokenizer loaded for it)."""
    candidates = [text for text in texts if len(text) > WINDOW]
    if not candidates:
        return []
    counted = [(text, token_count(bundled_tokenizer(), text)) for text in candidates]
    return [(text, count) for text, count in counted if count > WINDOW]
