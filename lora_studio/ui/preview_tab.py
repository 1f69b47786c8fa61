"""The Preview tab: a base model with stacked LoRAs, a strength slider, single images and strength x seed grids.

One `sample.Previewer` per base model is kept loaded between clicks (loading is the slow part; a strength
change reloads nothing). Handlers are plain functions (tests call them directly).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import gradio as gr

from ..errors import LoraStudioError
from ..fsutil import atomic_path
from ..paths import PROJECT_ROOT
from .config_form import FIELD_BY_KEY
from .errors import shown

RUNS_DIR = PROJECT_ROOT / "runs"
_previewers: dict[str, object] = {}  # base source -> Previewer; one at a time, to keep memory bounded
SAMPLERS = FIELD_BY_KEY["sample.sampler"].choices
MAX_STACK = 4  # strength sliders on the page; more stacked LoRAs are rare and go through the CLI
MAX_GRID_CHECKPOINTS = 8
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


def chosen_strengths(files: list[str] | None, strengths) -> list[tuple[str, float]]:
    """(file, strength) for each chosen LoRA: the first strength slider goes with the first file, and so on."""
    files = list(files or [])
    if len(files) > MAX_STACK:
        raise LoraStudioError(f"{len(files)} LoRAs are chosen; the Preview tab stacks at most {MAX_STACK}.")
    return [(f, float(s)) for f, s in zip(files, strengths, strict=False)]


def generate(base, files, prompt, negative, sampler, steps, cfg, seed, width, height, *strengths):
    """One image with each chosen LoRA at its own strength; returns the image and its parameters text."""
    pairs = chosen_strengths(files, strengths)
    with _lock:
        previewer = previewer_for(base)
        names = use_loras(previewer, [f for f, _ in pairs])
        settings = settings_from(prompt, negative, sampler, steps, cfg, seed, width, height,
                                 {n: s for n, (_f, s) in zip(names, pairs, strict=True)})  # fmt: skip
        preview = previewer.generate(settings)[0]
    text = preview.parameters + "".join(f"\nnote: {n}" for n in preview.notices)
    return preview.image, text


GRID_KINDS = ("strength x seed", "checkpoint x strength")


def generate_grid(base, files, kind, strengths_text, seeds_text, prompt, negative, sampler, steps, cfg, width,
                  height, *strengths):  # fmt: skip
    """A grid of the first chosen LoRA: strength x seed, or its run's checkpoints x strength (seed: the first
    grid seed). Other chosen LoRAs stay at their sliders' strengths."""
    from ..sample import Axis

    grid_strengths = parse_numbers(strengths_text, float, "strengths")
    seeds = parse_numbers(seeds_text, int, "seeds")
    pairs = chosen_strengths(files, strengths)
    if not pairs:
        raise LoraStudioError("Pick a LoRA for the grid first.")
    if kind not in GRID_KINDS:
        raise LoraStudioError(f"Grid {kind!r} is unknown; pick one of: {', '.join(GRID_KINDS)}.")
    checkpoints = run_checkpoints(pairs[0][0]) if kind == "checkpoint x strength" else []
    with _lock:
        previewer = previewer_for(base)
        subjects = checkpoints or [pairs[0][0]]
        others = [(f, strength) for f, strength in pairs[1:] if f not in subjects]  # a chosen checkpoint is a column
        names = use_loras(previewer, [f for f, _ in others] + subjects)
        fixed = {name: strength for name, (_f, strength) in zip(names, others, strict=False)}
        settings = settings_from(prompt, negative, sampler, steps, cfg, seeds[0], width, height, fixed)
        columns = tuple(names[len(others) :])
        if checkpoints:
            x, y = Axis("checkpoint", columns), Axis("strength", tuple(grid_strengths))
        else:
            x, y = Axis("strength", tuple(grid_strengths), lora=columns[0]), Axis("seed", tuple(seeds))
        grid = previewer.grid(settings, x, y)
    return grid.image, grid.previews[0][0].parameters


def run_checkpoints(lora_file: str) -> list[str]:
    """Every LoRA file of the run `lora_file` belongs to: its checkpoints by step, then the final file."""
    path = Path(lora_file)
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    files = sorted(str(f) for f in (run / "checkpoints").glob("*.safetensors"))
    files += sorted(str(f) for f in run.glob("*.safetensors"))
    if len(files) < 2:
        raise LoraStudioError(f"{run.name} has no checkpoints besides its final LoRA; save every N steps to get some.")
    if len(files) > MAX_GRID_CHECKPOINTS:  # keep the newest; a grid wider than this is unreadable
        files = files[-MAX_GRID_CHECKPOINTS:]
    return files


def upload_lora(upload: str | None, chosen: list[str] | None):
    """Copy an uploaded LoRA into runs/uploads (name sanitized), check it reads, and add it to the choice."""
    from ..dataset_edit import safe_name
    from ..export import load_lora

    if not upload:
        raise LoraStudioError("No file was uploaded; pick a .safetensors LoRA file.")
    name = safe_name(Path(upload).name)
    if not name.endswith(".safetensors"):
        raise LoraStudioError(f"{name} is not a .safetensors file; LoRA files must be safetensors.")
    load_lora(upload)  # Gradio's own temp copy: a bad file is refused before anything is written here
    folder = RUNS_DIR / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    with atomic_path(target) as partial:
        shutil.copyfile(upload, partial)
    files = [*(chosen or []), str(target)]
    return gr.Dropdown(choices=lora_choices(), value=files), f"Added {name}."


def parse_numbers(text: str, kind, label: str) -> list:
    try:
        values = [kind(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise LoraStudioError(f"The {label} must be numbers separated by commas, e.g. 0, 0.5, 1.") from None
    if not values:
        raise LoraStudioError(f"Give at least one of the {label}.")
    return values


def strength_sliders(files: list[str] | None) -> list:
    """One visible slider per chosen LoRA, labelled with its file; the rest hidden (values kept)."""
    files = list(files or [])[:MAX_STACK]
    updates = [gr.update(visible=True, label=f"Strength: {Path(f).parent.name}/{Path(f).name}") for f in files]
    return updates + [gr.update(visible=False)] * (MAX_STACK - len(files))


def build() -> None:
    from .train_tab import base_choices

    with gr.Row():
        base = gr.Dropdown(base_choices(), value="demo", label="Base model", allow_custom_value=True, scale=3,
                           elem_id="preview-base")  # fmt: skip
        files = gr.Dropdown(lora_choices(), multiselect=True, label=f"LoRA files (stack up to {MAX_STACK})", scale=5,
                            allow_custom_value=True, elem_id="preview-loras")  # fmt: skip
        refresh = gr.Button("Refresh lists", scale=1)
    with gr.Row():
        upload = gr.File(label="Add a LoRA file (.safetensors)", file_types=[".safetensors"], type="filepath",
                         elem_id="preview-upload")  # fmt: skip
        upload_status = gr.Markdown(elem_id="preview-upload-status")
    with gr.Row():
        sliders = [gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength", visible=i == 0,
                             elem_id=f"preview-strength-{i}") for i in range(MAX_STACK)]  # fmt: skip
    prompt = gr.Textbox(label="Prompt", elem_id="preview-prompt", info="The LoRA's trigger word is filled in")
    negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLERS), value="euler_a", label="Sampler")  # the config's names: no torch import
        steps = gr.Number(20, label="Steps", precision=0)
        cfg = gr.Number(5.0, label="CFG")
        seed = gr.Number(1, label="Seed", precision=0)
        width = gr.Number(64, label="Width", precision=0)
        height = gr.Number(64, label="Height", precision=0)
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="preview-generate")
        kind = gr.Dropdown(list(GRID_KINDS), value=GRID_KINDS[0], label="Grid", elem_id="preview-grid-kind")
        strengths = gr.Textbox("0, 0.5, 1", label="Grid strengths")
        seeds = gr.Textbox("1, 2", label="Grid seeds (checkpoint grids use the first)")
        grid = gr.Button("Grid", elem_id="preview-grid")
    image = gr.Image(label="Result", type="pil", height=512, elem_id="preview-image")
    parameters = gr.Textbox(label="Parameters", lines=3, elem_id="preview-parameters")

    refresh.click(lambda: (gr.Dropdown(choices=lora_choices()), gr.Dropdown(choices=base_choices())), None,
                  [files, base])  # fmt: skip
    upload.upload(shown(upload_lora), [upload, files], [files, upload_status])
    files.change(shown(suggest_prompt), files, prompt).then(strength_sliders, files, sliders)
    common = [prompt, negative, sampler, steps, cfg]
    go.click(shown(generate), [base, files, *common, seed, width, height, *sliders], [image, parameters])
    grid.click(shown(generate_grid), [base, files, kind, strengths, seeds, *common, width, height, *sliders],
               [image, parameters])  # fmt: skip
