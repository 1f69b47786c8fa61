"""Sample prompts with per-prompt settings, in the line format kohya sd-scripts' users know:

    a red star, outlines --n blurry, lowres --w 512 --h 768 --d 42 --l 7 --s 28 --ss euler_a

--n negative prompt, --w/--h size, --d seed, --l guidance (CFG), --s steps, --ss sampler. Anything not given
falls back to the `[sample]` section. A flag this parser does not know is an error naming it (kohya ignores them
silently, so a typo there quietly renders with the defaults).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SIDE = 2048  # SDXL's largest trained bucket; beyond it a sample or preview only burns memory
MAX_STEPS = 200  # sampling steps of one image
MAX_PROMPT_CHARS = 64 * 1024  # as a caption's 64 KB: the text encoders read 77 tokens a chunk, a few chunks at most
STRENGTH_RANGE = (-2.0, 2.0)  # adapter strengths a sample or preview may render at
MAX_SEED = 2**32 - 1  # A1111's seed range; training seeds too (a step's noise seed multiplies it: still in 64 bits)
FLAG = re.compile(r"(?:^|\s)--([a-z]+)(?=\s|$)")
FLAGS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "guidance_scale",
         "s": "num_inference_steps", "ss": "sampler"}  # fmt: skip
INTEGERS = {"width", "height", "seed", "num_inference_steps"}


@dataclass(frozen=True)
class SamplePrompt:
    """One line parsed: the prompt and whatever settings it overrides (None: the [sample] section's)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    sampler: str | None = None


def parse_sample_prompt(line: str, samplers: tuple[str, ...] = ()) -> SamplePrompt:
    """Split a prompt line at its `--x value` flags; ValueError with a sentence naming the bad flag or value."""
    marks = list(FLAG.finditer(line))
    prompt = line[: marks[0].start()] if marks else line
    values: dict[str, object] = {}
    for mark, following in zip(marks, [*marks[1:], None][: len(marks)], strict=True):
        flag = mark.group(1)
        text = line[mark.end() : following.start() if following else len(line)].strip()
        if flag not in FLAGS:
            known = ", ".join(f"--{f}" for f in FLAGS)
            raise ValueError(f"--{flag} is not a sample prompt flag (known: {known})")
        values[FLAGS[flag]] = _value(FLAGS[flag], flag, text, samplers)
    return SamplePrompt(prompt.strip(), **values)


def _value(field: str, flag: str, text: str, samplers: tuple[str, ...]) -> object:
    if field in ("negative_prompt", "sampler"):
        if field == "sampler" and samplers and text not in samplers:
            raise ValueError(f"--ss {text!r} is not a sampler; use one of {', '.join(samplers)}")
        return text
    try:
        number = int(text) if field in INTEGERS else float(text)
    except ValueError:
        raise ValueError(f"--{flag} needs a number, got {text!r}") from None
    if number < (0 if field in ("seed", "guidance_scale") else 1) or (field in ("width", "height") and number < 32):
        raise ValueError(f"--{flag} {text} is too small")
    limits = {"width": MAX_SIDE, "height": MAX_SIDE, "num_inference_steps": MAX_STEPS, "seed": MAX_SEED}
    if number > limits.get(field, number):
        raise ValueError(f"--{flag} {text} is too large (sizes up to {MAX_SIDE}, steps up to {MAX_STEPS}, seeds up to "
                         f"{MAX_SEED})")  # fmt: skip
    return number
