"""The Preview tab: a base model with stacked LoRAs, a strength slider, single images and strength x seed grids.

One `sample.Previewer` per base model is kept loaded between clicks (loading is the slow part; a strength
change reloads nothing). Handlers are plain functions (tests call them directly).
"""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from ..errors import LoraStudioError
from ..paths import PROJECT_ROOT
from .errors import shown

RUNS_DIR = PROJECT_ROOT / "runs"
_previewers: dict[str, object] = {}  # base source -> Previewer; one at a time, to keep memory bounded
_lock = threading.Lock()  # Gradio runs handlers in threads; one generation at a time on the device


def lora_choices(runs_dir: Path | None = None) -> list[str]:
    """Final LoRAs and checkpoints of every run, newest run first."""
    runs_dir = runs_dir or RUNS_DIR
    if not runs_dir.is_dir():
        return []
    runs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)
    files = []
    for run in runs:
        files += sorted(str(f) for f in run.glob("*.safetensors"))
        files += sorted((str(f) for f in (run / "checkpoints").glob("*.safetensors")), reverse=True)
    return files


def previewer_for(base: str):
    """The loaded Previewer for `base`, loading it (and dropping any other) on first use."""
    import torch

    from ..models import load_base
    from ..sample import Previewer

    base = base.strip() or "demo"
    if base not in _previewers:
        _previewers.clear()
        dtype = torch.float32 if base == "demo" else None  # the demo is tiny: full precision on any device
        _previewers[base] = Previewer(load_base(base, dtype=dtype))
    return _previewers[base]


def use_loras(previewer, files: list[str]) -> list[str]:
    """Load the chosen files (once each) and unload the others; returns their adapter names in order."""
    from ..export import load_lora

    wanted = {}
    for file in files or []:
        path = Path(file)
        wanted[f"{path.parent.name}_{path.stem}"[-60:]] = path
    for name in list(previewer.loras):
        if name not in wanted:
            previewer.remove_lora(name)
    for name, path in wanted.items():
        if name not in previewer.loras:
            previewer.add_lora(load_lora(path), name=name)
    return list(wanted)


def suggest_prompt(files: list[str]) -> str:
    """The first chosen LoRA's trigger phrase from its metadata, as the start of a prompt."""
    from ..export import load_lora

    for file in files or []:
        trigger = load_lora(file).metadata.get("modelspec.trigger_phrase", "")
        if trigger:
            return f"{trigger}, "
    return ""


def settings_from(prompt, negative, sampler, steps, cfg, seed, width, height, strengths):
    from ..sample import PreviewSettings

    return PreviewSettings(
        prompt=prompt,
        negative_prompt=negative,
        strengths=strengths,
        sampler=sampler,
        steps=int(steps),
        cfg=float(cfg),
        seed=int(seed),
        width=int(width),
        height=int(height),
    )


def generate(base, files, strength, prompt, negative, sampler, steps, cfg, seed, width, height):
    """One image with every chosen LoRA at `strength`; returns the image and its parameters text."""
    with _lock:
        previewer = previewer_for(base)
        names = use_loras(previewer, files)
        settings = settings_from(prompt, negative, sampler, steps, cfg, seed, width, height,
                                 {n: float(strength) for n in names})  # fmt: skip
        preview = previewer.generate(settings)[0]
    text = preview.parameters + "".join(f"\nnote: {n}" for n in preview.notices)
    return preview.image, text


def generate_grid(base, files, strengths_text, seeds_text, prompt, negative, sampler, steps, cfg, width, height):
    """A strength x seed grid of the first chosen LoRA (others stay at strength 1)."""
    from ..sample import Axis

    strengths = parse_numbers(strengths_text, float, "strengths")
    seeds = parse_numbers(seeds_text, int, "seeds")
    with _lock:
        previewer = previewer_for(base)
        names = use_loras(previewer, files)
        if not names:
            raise LoraStudioError("Pick a LoRA for the grid first.")
        settings = settings_from(prompt, negative, sampler, steps, cfg, seeds[0], width, height,
                                 {n: 1.0 for n in names})  # fmt: skip
        grid = previewer.grid(settings, Axis("strength", tuple(strengths), lora=names[0]), Axis("seed", tuple(seeds)))
    return grid.image, grid.previews[0][0].parameters


def parse_numbers(text: str, kind, label: str) -> list:
    try:
        values = [kind(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise LoraStudioError(f"The {label} must be numbers separated by commas, e.g. 0, 0.5, 1.") from None
    if not values:
        raise LoraStudioError(f"Give at least one of the {label}.")
    return values


def build() -> None:
    from ..sample import SAMPLERS

    with gr.Row():
        base = gr.Textbox(label="Base model", value="demo", scale=3, elem_id="preview-base")
        files = gr.Dropdown(lora_choices(), multiselect=True, label="LoRA files (stacked)", scale=5,
                            allow_custom_value=True, elem_id="preview-loras")  # fmt: skip
        refresh = gr.Button("Refresh list", scale=1)
    prompt = gr.Textbox(label="Prompt", elem_id="preview-prompt")
    negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        strength = gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength", elem_id="preview-strength")
        sampler = gr.Dropdown(list(SAMPLERS), value="euler_a", label="Sampler")
        steps = gr.Number(20, label="Steps", precision=0)
        cfg = gr.Number(5.0, label="CFG")
        seed = gr.Number(1, label="Seed", precision=0)
        width = gr.Number(64, label="Width", precision=0)
        height = gr.Number(64, label="Height", precision=0)
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="preview-generate")
        strengths = gr.Textbox("0, 0.5, 1", label="Grid strengths")
        seeds = gr.Textbox("1, 2", label="Grid seeds")
        grid = gr.Button("Grid (strength x seed)", elem_id="preview-grid")
    image = gr.Image(label="Result", type="pil", elem_id="preview-image")
    parameters = gr.Textbox(label="Parameters", lines=3, elem_id="preview-parameters")

    refresh.click(lambda: gr.Dropdown(choices=lora_choices()), None, files)
    files.change(shown(suggest_prompt), files, prompt)
    common = [prompt, negative, sampler, steps, cfg]
    go.click(shown(generate), [base, files, strength, *common, seed, width, height], [image, parameters])
    grid.click(shown(generate_grid), [base, files, strengths, seeds, *common, width, height], [image, parameters])
