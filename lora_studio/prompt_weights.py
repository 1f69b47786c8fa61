"""A1111's emphasis syntax in prompts: `(word)` is 1.1 times as strong, `[word]` 1/1.1, `(word:1.5)` 1.5; brackets
nest and multiply, `\\(` and `\\)` are literal brackets, an unclosed bracket reaches to the end of the prompt (all as
A1111's prompt parser reads them), and BREAK starts a new window of 75 tokens. Previews and training samples read
prompts this way, as A1111/Forge and kohya's sample images do; diffusers' own encoding would take them as text.

The weights then scale each token's embedding, and the whole is rescaled to its unweighted mean (A1111's
"Original" emphasis), in conditioning.encode_captions.
"""

from __future__ import annotations

import re

EMPHASIS = 1.1  # A1111's factor per round bracket (its division per square one)
# One piece of a prompt: an escaped character, a bracket, a weight closing a round bracket (":1.5)"), or text.
PIECE = re.compile(r"\\.|\(|\[|\]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|[^\\()\[\]:]+|:|\\$", re.DOTALL)


BREAK = re.compile(r"\s*\bBREAK\b\s*")  # A1111's: what follows starts the next window of 75 tokens


def has_emphasis(prompt: str) -> bool:
    """Whether `prompt` holds any of the syntax (a bracket, an escape, BREAK); a prompt without reads as plain
    text."""
    return any(c in prompt for c in "()[]\\") or bool(BREAK.search(prompt))


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """(text, weight) fragments of `prompt`, neighbours of equal weight merged; [("", 1.0)] for an empty one."""
    fragments: list[list] = []  # [text, weight]
    opened: list[tuple[str, int]] = []  # (bracket, index of the first fragment inside it)

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in PIECE.finditer(prompt):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            fragments.append([piece[1:], 1.0])  # an escaped bracket (or backslash) is text
        elif piece in ("(", "["):
            opened.append((piece, len(fragments)))
        elif weight is not None and "(" in [kind for kind, _ in opened]:
            scale_from(_close(opened, "("), float(weight))
        elif piece == ")" and "(" in [kind for kind, _ in opened]:
            scale_from(_close(opened, "("), EMPHASIS)
        elif piece == "]" and "[" in [kind for kind, _ in opened]:
            scale_from(_close(opened, "["), 1 / EMPHASIS)
        else:
            fragments.append([piece, 1.0])  # text, or a bracket with nothing to close
    for kind, start in opened:  # unclosed: to the end of the prompt
        scale_from(start, EMPHASIS if kind == "(" else 1 / EMPHASIS)
    merged: list[list] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def _close(opened: list[tuple[str, int]], kind: str) -> int:
    """The start of the innermost open bracket of `kind`, which closes; brackets of the other kind stay open (A1111
    keeps one stack per kind)."""
    index = max(i for i, (k, _) in enumerate(opened) if k == kind)
    start = opened[index][1]
    del opened[index]
    return start
