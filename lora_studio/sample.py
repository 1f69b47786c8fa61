"""Rendering with adjustable adapter strengths, without reloading weights; grids; A1111 infotext.

The strength of an adapter is peft's per-adapter scale, set through diffusers (`set_adapters` for named
LoRAs, `cross_attention_kwargs={"scale": s}` for the one being trained): it multiplies that adapter's
delta in every LoRA layer of the UNet and the text encoders for the next call, so strength 0 is the base
model exactly and changing a strength never touches the weights.

Saved images carry their parameters in A1111's `parameters` PNG text chunk, so A1111's "PNG Info",
civitai and our `read_parameters` all read them back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .conditioning import prompt_tokens
from .errors import LoraStudioError
from .fsutil import atomic_path
from .prompt_weights import has_emphasis
from .sample_prompts import MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, MAX_STEPS, STRENGTH_RANGE
from .tokens import WINDOW

# name -> (scheduler class, extra config, A1111's sampler label, A1111's schedule type or None)
SAMPLER_SPECS = {
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a", None),
    "euler": (EulerDiscreteScheduler, {}, "Euler", None),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}, "DPM++ 2M", None),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, "DPM++ 2M", "Karras"),
    "ddim": (DDIMScheduler, {}, "DDIM", None),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC", None),
    "pndm": (PNDMScheduler, {}, "PLMS", None),
}
SAMPLERS = tuple(SAMPLER_SPECS)
SIZE_MULTIPLE = 8  # the SD VAEs downsample 8x; diffusers' pipelines refuse other sizes
MAX_GRID_CELLS = 64
MAX_BATCH_COUNT = 16


class PreviewError(LoraStudioError):
    """Bad preview settings or a LoRA that cannot be previewed on this base."""


@dataclass(frozen=True)
class Rendered:
    prompt: str
    strength: float
    seed: int
    image: Image.Image


def use_sampler(pipeline, sampler: str, zero_terminal_snr: bool = False) -> None:
    """Swap the pipeline's scheduler for `sampler`, keeping the model's noise schedule and prediction type; with
    `zero_terminal_snr`, the rescaled schedule sampled from its last timestep ("trailing"), as Lin et al. 2023 say."""
    cls, extra, _label, _schedule = SAMPLER_SPECS[sampler]
    if zero_terminal_snr:
        extra = {**extra, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    pipeline.scheduler = cls.from_config(pipeline.scheduler.config, **extra)


def call_pipeline(
    pipeline, prompt: str, negative_prompt: str, seeds: list[int], steps: int, cfg: float, width: int | None,
    height: int | None, clip_skip: int = 1, **extra,
) -> list[Image.Image]:  # fmt: skip
    """One image per seed: the one pipeline call of previews and training samples, so both honour the same
    settings. Clip skip (A1111's meaning) is applied as training applies it (conditioning.py), a prompt longer
    than one CLIP window is read in windows as training reads long captions (up to 225 tokens; diffusers' own
    encoding would cut it at 75), and A1111's emphasis, (word:1.2), weights its tokens (prompt_weights.py;
    diffusers would read the brackets as text): the prompt embeddings are then made here. Otherwise (SDXL's clip
    skip included) the pipeline encodes the prompts itself."""
    sdxl = hasattr(pipeline, "text_encoder_2")
    emphasis = has_emphasis(prompt) or has_emphasis(negative_prompt)
    longest = max(len(prompt_tokens(pipeline.tokenizer, text)[0]) for text in (prompt, negative_prompt))
    if emphasis or longest > WINDOW or (clip_skip > 1 and not sdxl):
        strength = (extra.get("cross_attention_kwargs") or {}).get("scale")
        texts = prompt_embeddings(pipeline, prompt, negative_prompt, len(seeds), clip_skip, longest, strength)
    else:
        texts = {"prompt": [prompt] * len(seeds), "negative_prompt": [negative_prompt] * len(seeds) if
                 negative_prompt else None}  # fmt: skip
        extra["clip_skip"] = clip_skip - 1 if clip_skip > 1 else None  # only SDXL gets here with clip skip
    return pipeline(
        **texts,
        num_inference_steps=steps,
        guidance_scale=cfg,
        width=width,
        height=height,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        **extra,
    ).images


def prompt_embeddings(pipeline, prompt: str, negative_prompt: str, count: int, clip_skip: int, tokens: int,
                      strength: float | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The pipeline's prompt and negative embeddings (`count` of each), encoded as training encodes captions,
    in as many windows as `tokens` needs (the longest kohya reads: 225). The text encoders' adapters act at
    `strength`, as diffusers' own encoding applies a LoRA scale; SDXL's empty negative prompt is zeros where the
    model asks for it (`force_zeros_for_empty_prompt`), as its pipeline does."""
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    from .conditioning import encode_captions

    sdxl = hasattr(pipeline, "text_encoder_2")
    tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2] if sdxl else [pipeline.tokenizer]
    encoders = [pipeline.text_encoder, pipeline.text_encoder_2] if sdxl else [pipeline.text_encoder]
    max_tokens = next((n for n in (WINDOW, 2 * WINDOW) if tokens <= n), 3 * WINDOW)
    device = next(encoders[0].parameters()).device
    for encoder in encoders if strength is not None else ():
        scale_lora_layers(encoder, strength)
    try:  # one call per text, as the pipeline's own encoding makes them (a batch of two rounds differently)
        encoded = [encode_captions(tokenizers, encoders, [text], clip_skip, sdxl, device, max_tokens, emphasis=True)
                   for text in (prompt, negative_prompt)]  # fmt: skip
    finally:
        for encoder in encoders if strength is not None else ():
            unscale_lora_layers(encoder, strength)
    encoded = {key: torch.cat([part[key] for part in encoded]) for key in encoded[0]}
    hidden = encoded["hidden"]
    texts = {"prompt_embeds": hidden[:1].expand(count, -1, -1),
             "negative_prompt_embeds": hidden[1:].expand(count, -1, -1)}  # fmt: skip
    if sdxl:
        pooled = encoded["pooled"]
        if not negative_prompt and pipeline.config.force_zeros_for_empty_prompt:
            texts["negative_prompt_embeds"] = torch.zeros_like(texts["negative_prompt_embeds"])
            pooled = torch.stack([pooled[0], torch.zeros_like(pooled[1])])
        texts["pooled_prompt_embeds"] = pooled[:1].expand(count, -1)
        texts["negative_pooled_prompt_embeds"] = pooled[1:].expand(count, -1)
    return texts


@torch.no_grad()
def render(
    pipeline,
    prompts: list[str],
    strengths: list[float],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 7.0,
    size: tuple[int, int] | None = None,
    negative_prompt: str = "",
    clip_skip: int = 1,
) -> list[Rendered]:
    """One image per (prompt, strength, seed) with the adapters in the pipeline's peft layers at `strength`;
    the same seed gives the same noise at every strength. Training samples its live adapter this way."""
    width, height = size or (None, None)
    results = []
    for prompt in prompts:
        for strength in strengths:
            images = call_pipeline(pipeline, prompt, negative_prompt, seeds, steps, guidance, width, height,
                                   clip_skip, cross_attention_kwargs={"scale": strength})  # fmt: skip
            results += [Rendered(prompt, strength, seed, image) for seed, image in zip(seeds, images, strict=True)]
    return results


# --- settings and infotext ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewSettings:
    """Everything that decides one preview image; a grid cell is one of these."""

    prompt: str = ""
    negative_prompt: str = ""
    strengths: dict[str, float] = field(default_factory=dict)  # LoRA name -> strength
    sampler: str = "euler_a"
    steps: int = 20
    cfg: float = 7.0
    seed: int = 42
    width: int = 512
    height: int = 512
    clip_skip: int = 1  # A1111's meaning: 1 = the last layer
    batch_count: int = 1

    def checked(self) -> tuple[PreviewSettings, list[str]]:
        """Valid settings plus notices for what was adjusted; raises PreviewError for what cannot be."""
        problems = []
        if self.sampler not in SAMPLER_SPECS:
            problems.append(f"sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        low, high = STRENGTH_RANGE
        for name, strength in self.strengths.items():
            if not low <= strength <= high or math.isnan(strength):
                outside = f"strength {strength:g} of LoRA {name!r} is outside [{low:g}, {high:g}]"
                problems.append(f"{outside}; use a value inside")
        if not 1 <= self.steps <= MAX_STEPS:
            problems.append(f"steps = {self.steps}; use 1 to {MAX_STEPS}")
        if not 1 <= self.batch_count <= MAX_BATCH_COUNT:
            problems.append(f"batch count = {self.batch_count}; use 1 to {MAX_BATCH_COUNT}")
        if not (SIZE_MULTIPLE <= self.width <= MAX_SIDE and SIZE_MULTIPLE <= self.height <= MAX_SIDE):
            problems.append(f"size {self.width}x{self.height} is outside {SIZE_MULTIPLE}-{MAX_SIDE} pixels a side")
        for name, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if len(text) > MAX_PROMPT_CHARS:
                problems.append(f"the {name} has {len(text):,} characters; use at most {MAX_PROMPT_CHARS:,}")
        if not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed = {self.seed}; use 0 to {MAX_SEED}")
        if not 1 <= self.clip_skip <= 12:
            problems.append(f"clip skip = {self.clip_skip}; use 1 (the last layer) to 12")
        if self.cfg < 0:
            problems.append(f"CFG scale = {self.cfg:g}; use 0 or more")
        if problems:
            raise PreviewError("Preview settings: " + "; ".join(problems) + ".")
        notices = []
        width, height = snap_size(self.width), snap_size(self.height)
        if (width, height) != (self.width, self.height):
            notices.append(
                f"size {self.width}x{self.height} is not a multiple of {SIZE_MULTIPLE}; rendering {width}x{height}"
            )
        return replace(self, width=width, height=height), notices


def vae_name(base) -> str:
    """The name A1111's infotext gives a VAE used in place of the model's own ("" for its own)."""
    return Path(base.vae_source).name if base.vae_source else ""


def snap_size(side: int) -> int:
    return max(SIZE_MULTIPLE, int(side / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)  # halves round up, not to even


def infotext(settings: PreviewSettings, seed: int, loras: dict[str, str | None], model: str = "",
             vae: str = "") -> str:  # fmt: skip
    """A1111's `parameters` text: prompt with `<lora:NAME:S>` tags, the negative prompt, one line of
    `Key: value` pairs (values with commas quoted), including `Lora hashes`, and `VAE` when one replaced the model's
    own."""
    tags = "".join(f" <lora:{name}:{strength:g}>" for name, strength in settings.strengths.items())
    _cls, _extra, label, schedule = SAMPLER_SPECS[settings.sampler]
    pairs = [("Steps", settings.steps), ("Sampler", label)]
    if schedule:
        pairs.append(("Schedule type", schedule))
    pairs += [("CFG scale", f"{settings.cfg:g}"), ("Seed", seed), ("Size", f"{settings.width}x{settings.height}")]
    if model:
        pairs.append(("Model", model))
    if vae:
        pairs.append(("VAE", vae))
    if settings.clip_skip > 1:
        pairs.append(("Clip skip", settings.clip_skip))
    hashes = [f"{name}: {h[:12]}" for name, h in loras.items() if h and name in settings.strengths]
    if hashes:
        pairs.append(("Lora hashes", ", ".join(hashes)))
    pairs.append(("Version", "LoRA Studio"))
    line = ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs)
    text = settings.prompt + tags
    if settings.negative_prompt:
        text += f"\nNegative prompt: {settings.negative_prompt}"
    return f"{text}\n{line}"


def _quote(value: str) -> str:
    """A1111's `quote`: values holding a comma, colon or quote are JSON-quoted."""
    import json

    return json.dumps(value, ensure_ascii=False) if ("," in value or "\n" in value or ":" in value) else value


# A1111's own pattern for the key-value line (modules/infotext_utils.py).
PARAM_PATTERN = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
LORA_TAG = re.compile(r"<lora:([^:>]+):([-+]?[0-9.]+)>")


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's `parse_generation_parameters`, the parts that apply here: Prompt, Negative prompt, the
    key-value pairs (unquoted) and our `loras` ({name: strength}) from the prompt's tags."""
    import json

    *lines, last = text.strip().split("\n")
    if len(PARAM_PATTERN.findall(last)) < 3:  # A1111: a last line with fewer than 3 pairs is prompt text
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in (raw.strip() for raw in lines):
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM_PATTERN.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        size = IMAGE_SIZE.match(value)
        if size:  # A1111 splits sizes into two keys
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = value
    return result


def read_parameters(png: str | Path | Image.Image) -> dict:
    """Parameters of a PNG we (or A1111) saved: the parsed `parameters` chunk plus `loras` {name: strength}."""
    image = png if isinstance(png, Image.Image) else Image.open(png)
    text = image.info.get("parameters")
    if text is None:
        raise PreviewError(f"{getattr(image, 'filename', 'the image')} carries no generation parameters.")
    parsed: dict = parse_parameters(text)
    parsed["loras"] = {name: float(s) for name, s in LORA_TAG.findall(parsed["Prompt"])}
    return parsed


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """PNG with A1111's `parameters` text chunk; atomic, so a half-written image never replaces a good one."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


# --- the previewer ----------------------------------------------------------------------------------------------


@dataclass
class Preview:
    image: Image.Image
    settings: PreviewSettings  # seed is this image's seed
    parameters: str  # the infotext
    notices: list[str] = field(default_factory=list)


class Previewer:
    """A base model with any number of LoRAs loaded once, rendered at per-LoRA strengths.

    Strengths are set per call with diffusers' `set_adapters`, which writes peft's scale of each
    adapter: nothing is reloaded when a strength changes.
    """

    def __init__(self, base):
        self.base = base
        self.pipeline = base.pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.loras: dict[str, object] = {}  # name -> lora_file.LoraFile

    def add_lora(self, source, name: str | None = None) -> str:
        """Load a LoRA file (or a `lora_file.LoraFile`) as adapter `name`; checks it fits the base first."""
        from .export import load_into_pipeline
        from .lora_file import LoraFile
        from .lora_read import fitted_to, load_lora

        lora = source if isinstance(source, LoraFile) else load_lora(source)
        name = name or (Path(lora.path).stem if lora.path else f"lora{len(self.loras) + 1}")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)  # adapter names end up in module dicts and infotext
        if name in self.loras:
            raise PreviewError(f"A LoRA named {name!r} is already loaded; remove it first or give another name.")
        load_into_pipeline(self.pipeline, fitted_to(lora, self.base), name)
        self.loras[name] = lora
        return name

    def remove_lora(self, name: str) -> None:
        if name in self.loras:
            self.pipeline.delete_adapters([name])
            del self.loras[name]

    def hashes(self) -> dict[str, str | None]:
        return {name: lora.metadata.get("sshs_model_hash") for name, lora in self.loras.items()}

    def set_strengths(self, strengths: dict[str, float]) -> None:
        unknown = [n for n in strengths if n not in self.loras]
        if unknown:
            raise PreviewError(f"No LoRA named {unknown[0]!r} is loaded; loaded: {', '.join(self.loras) or 'none'}.")
        if not self.loras:
            return
        names = list(self.loras)
        self.pipeline.set_adapters(names, adapter_weights=[float(strengths.get(n, 0.0)) for n in names])

    @torch.no_grad()
    def generate(self, settings: PreviewSettings) -> list[Preview]:
        """`batch_count` images with seeds seed, seed+1, ... (A1111's convention)."""
        settings, notices = settings.checked()
        self.set_strengths(settings.strengths)
        use_sampler(self.pipeline, settings.sampler)
        seeds = [settings.seed + i for i in range(settings.batch_count)]
        images = call_pipeline(self.pipeline, settings.prompt, settings.negative_prompt, seeds, settings.steps,
                               settings.cfg, settings.width, settings.height, settings.clip_skip)  # fmt: skip
        model = Path(str(self.base.source)).name
        previews = []
        for seed, image in zip(seeds, images, strict=True):
            own = replace(settings, seed=seed, batch_count=1)
            previews.append(Preview(image, own, infotext(own, seed, self.hashes(), model, vae_name(self.base)),
                                    notices))  # fmt: skip
        return previews

    def grid(self, settings: PreviewSettings, x: Axis, y: Axis) -> Grid:
        """Render every (y, x) cell and lay them out with axis labels drawn on the image."""
        check_grid_size(len(x.values), len(y.values))
        cells = [[cell_settings(settings, x, xv, y, yv) for xv in x.values] for yv in y.values]
        previews = [[self.render_cell(cell) for cell in row] for row in cells]
        image = draw_grid([[p.image for p in row] for row in previews], x.labels(), y.labels(), grid_title(x, y),
                          x.highlight)  # fmt: skip
        return Grid(image, cells, previews, x, y)

    def render_cell(self, cell: PreviewSettings) -> Preview:
        """One cell again, from its recorded settings (a checkpoint axis records the adapter by name)."""
        return self.generate(replace(cell, batch_count=1))[0]


def check_grid_size(columns: int, rows: int) -> None:
    """Refuse, before anything loads or renders, a grid of more than MAX_GRID_CELLS images."""
    if columns * rows > MAX_GRID_CELLS:
        raise PreviewError(
            f"A grid of {columns} x {rows} = {columns * rows} images is over the {MAX_GRID_CELLS} a grid may have; "
            "give fewer values."
        )


@dataclass(frozen=True)
class Axis:
    """One grid axis: `strength` (of LoRA `lora`; with a checkpoint axis, of each checkpoint), `seed`, or
    `checkpoint` (adapter names standing for checkpoints of one run, each loaded with add_lora; a cell turns
    on only its checkpoint, at the strength axis' value or at `strength`)."""

    kind: str
    values: tuple
    lora: str | None = None
    strength: float = 1.0
    names: tuple[str, ...] = ()  # display labels of checkpoint values (e.g. "step 200"), else the values
    highlight: int | None = None  # the index of a value to frame (the best checkpoint), when the axis is columns

    def __post_init__(self):
        if self.kind not in ("strength", "seed", "checkpoint"):
            raise PreviewError(f"Grid axis {self.kind!r} is unknown; use strength, seed or checkpoint.")
        if not self.values:
            raise PreviewError(f"The {self.kind} axis has no values; give at least one.")

    def labels(self) -> list[str]:
        """What varies along the axis, short enough for a small cell; the LoRA's name is the grid's title."""
        if self.kind == "strength":
            return [f"{v:g}" for v in self.values]
        if self.kind == "seed":
            return [f"seed {v}" for v in self.values]
        return list(self.names or (str(v) for v in self.values))


def grid_title(x: Axis, y: Axis) -> str:
    """Said once above the grid: whose strength varies, and along which axis."""
    parts = []
    for where, axis in (("columns", x), ("rows", y)):
        if axis.kind == "strength":
            parts.append(f"{where}: strength of {axis.lora}" if axis.lora else f"{where}: strength")
        elif axis.kind == "checkpoint":
            parts.append(f"{where}: checkpoints")
    return "; ".join(parts)


def cell_settings(settings: PreviewSettings, x: Axis, x_value, y: Axis, y_value) -> PreviewSettings:
    """The settings of one grid cell: what its two axes say, on top of `settings`."""
    if x.kind == y.kind:
        raise PreviewError(f"Both grid axes are {x.kind}; pick two different kinds.")
    axes = {x.kind: (x, x_value), y.kind: (y, y_value)}
    if "seed" in axes:
        settings = replace(settings, seed=int(axes["seed"][1]))
    strengths = dict(settings.strengths)
    if "checkpoint" in axes:
        checkpoints, current = axes["checkpoint"]
        strengths.update({str(name): 0.0 for name in checkpoints.values})
        strength = float(axes["strength"][1]) if "strength" in axes else checkpoints.strength
        strengths[str(current)] = strength
    elif "strength" in axes:
        axis, value = axes["strength"]
        if axis.lora is None:
            raise PreviewError("A strength axis needs the name of the LoRA whose strength it varies.")
        strengths[axis.lora] = float(value)
    return replace(settings, strengths=strengths)


@dataclass
class Grid:
    image: Image.Image
    cells: list[list[PreviewSettings]]
    previews: list[list[Preview]]
    x: Axis
    y: Axis


HIGHLIGHT = "#ea580c"  # the frame and label colour of the highlighted column (the best checkpoint)


def draw_grid(
    images: list[list[Image.Image]], x_labels: list[str], y_labels: list[str], title: str = "",
    highlight: int | None = None,
) -> Image.Image:  # fmt: skip
    """Images in rows and columns, a title line, column labels on top and row labels on the left, in black on
    white; a label wider than its column is cut short (with an ellipsis) so labels never run into each other.
    Column labels may have several lines ("step 200\nval 0.081"); column `highlight` is framed in orange."""
    font = ImageFont.load_default()
    cell_w = max(im.width for row in images for im in row)
    cell_h = max(im.height for row in images for im in row)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(t, font=font)) for t in y_labels) + 8
    lines = max(len(t.split("\n")) for t in x_labels)
    title_h, label_h = (16 if title else 0), 4 + 14 * lines
    width = max(label_w + cell_w * len(x_labels), int(measure.textlength(title, font=font)) + 6 if title else 0)
    grid = Image.new("RGB", (width, title_h + label_h + cell_h * len(y_labels)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((3, 2), title, fill="black", font=font)
    for i, text in enumerate(x_labels):
        colour = HIGHLIGHT if i == highlight else "black"
        for n, line in enumerate(text.split("\n")):
            draw.text((label_w + i * cell_w + 2, title_h + 3 + 14 * n), fit_text(measure, line, font, cell_w - 4),
                      fill=colour, font=font)  # fmt: skip
    top = title_h + label_h
    for j, text in enumerate(y_labels):
        draw.text((3, top + j * cell_h + cell_h // 2 - 6), text, fill="black", font=font)
        for i, image in enumerate(images[j]):
            grid.paste(image, (label_w + i * cell_w, top + j * cell_h))
    if highlight is not None:
        left = label_w + highlight * cell_w
        draw.rectangle((left, top, left + cell_w - 1, top + cell_h * len(y_labels) - 1), outline=HIGHLIGHT, width=2)
    return grid


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut short with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
