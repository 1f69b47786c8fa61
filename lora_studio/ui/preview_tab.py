"""The Preview tab: a base model with stacked LoRAs, a strength slider, single images and grids.

One `sample.Previewer` (held in the app's state) is kept loaded between clicks (loading is the slow part;
a strength change reloads nothing). Every base model and LoRA file a request names is resolved inside the
app's roots before anything reads it. Handlers are plain functions (tests call them directly).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from ..errors import LoraStudioError
from ..fsutil import atomic_path
from ..runs import list_runs, run_of_lora_file
from ..sample_prompts import MAX_SIDE, MAX_STEPS
from ..workflows import (
    bake_lora_files,
    baked_comparison,
    checkpoint_strength_grid,
    export_lora_file,
    exports_path,
    lora_file_label,
    preview_defaults,
    run_lora_files,
    strength_seed_grid,
)
from .config_form import FIELD_BY_KEY
from .errors import shown
from .state import AppState, confined_base, confined_vae, uploaded_files
from .train_tab import base_choices, summarize, vae_choices

SAMPLERS = FIELD_BY_KEY["sample.sampler"].choices
MAX_STACK = 4  # strength sliders on the page; more stacked LoRAs are rare and go through the CLI
UPLOADS = "uploads"  # LoRA files added in the Preview tab, kept in the runs folder


def lora_choices(app: AppState) -> list[str]:
    """Final LoRAs and checkpoints of every run (newest run first), then the uploaded files."""
    files = []
    for run in list_runs(app.roots.runs):
        files += [str(f) for f in run.final_files()] + [str(f) for f in reversed(run.checkpoint_files())]
    uploads = app.roots.runs / UPLOADS
    files += sorted(str(f) for f in uploads.glob("*.safetensors")) if uploads.is_dir() else []
    return files


def labelled_lora_choices(app: AppState) -> list[tuple[str, str]]:
    """lora_choices as (label, file) pairs: the run and file name, and the validation loss (best marked) if any."""
    return [(f"{Path(f).parent.name if Path(f).parent.name != 'checkpoints' else Path(f).parent.parent.name}/"
             f"{lora_file_label(Path(f))}", f) for f in lora_choices(app)]  # fmt: skip


def checked_loras(app: AppState, files: list[str] | None) -> list[Path]:
    """The chosen LoRA files, each resolved inside the runs folder; anything else is refused."""
    files = list(files or [])
    if len(files) > MAX_STACK:
        raise LoraStudioError(f"{len(files)} LoRAs are chosen; the Preview tab stacks at most {MAX_STACK}.")
    paths = [app.roots.resolve(f, "LoRA file", within=app.roots.runs) for f in files]
    for path in paths:
        if path.suffix != ".safetensors" or not path.is_file():
            raise LoraStudioError(f"{path.name} is not a LoRA file of a run; refresh the list and pick again.")
    return paths


def use_loras(previewer, files: list[Path]) -> list[str]:
    """Load the chosen files (once each) and unload the others; returns their adapter names in order."""
    from ..lora_read import load_lora

    wanted = {f"{path.parent.name}_{path.stem}"[-60:]: path for path in files}
    for name in list(previewer.loras):
        if name not in wanted:
            previewer.remove_lora(name)
    for name, path in wanted.items():
        if name not in previewer.loras:
            previewer.add_lora(load_lora(path), name=name)
    return list(wanted)


def suggest_prompt(app: AppState, files: list[str]) -> str:
    """The first chosen LoRA's trigger phrase from its metadata, as the start of a prompt."""
    from ..safetensors_io import read_header

    for path in checked_loras(app, files):
        trigger = read_header(path).metadata.get("modelspec.trigger_phrase", "")
        if trigger:
            return f"{trigger}, "
    return ""


FOLLOWED = ("base_model", "vae", "width", "height", "negative_prompt", "sampler", "steps", "cfg", "clip_skip")


def follow_lora(app: AppState, files: list[str] | None, followed: str | None) -> tuple:
    """The form's settings from the first chosen LoRA (workflows.preview_defaults: its run's base model and VAE, clip
    skip and sample settings, the size it trained at), when that first LoRA changed since the last call: stacking
    another LoRA, or a setting changed by hand, is left alone. Returns an update for each of FOLLOWED, then the
    file now followed (the page's state)."""
    chosen = checked_loras(app, files)
    first = str(chosen[0]) if chosen else None
    if first is None or first == followed:
        return (*(gr.update() for _ in FOLLOWED), first)
    defaults = preview_defaults(chosen[0])
    values = {key: getattr(defaults, key) for key in FOLLOWED}
    if values["base_model"]:
        try:
            confined_base(app.roots, values["base_model"])
        except LoraStudioError:  # outside the app's folders now, or gone: the person picks the base
            values["base_model"] = None
    if values["vae"]:
        try:
            confined_vae(app.roots, values["vae"])
        except LoraStudioError:  # likewise the VAE
            values["vae"] = None
    return (*(gr.update() if value is None else gr.update(value=value) for value in values.values()), first)


def lora_picked(app: AppState, files: list[str] | None, followed: str | None) -> tuple:
    """The prompt (suggest_prompt) and the settings (follow_lora) for the LoRAs just chosen, in one event, so the
    page's prompt and settings change together."""
    return (suggest_prompt(app, files), *follow_lora(app, files, followed))


def base_size(app: AppState, base: str):
    """Width and height of the base model picked by hand: the side it was trained at (64 for the demo, 1024 for
    SDXL). A base that cannot be read leaves them alone; Generate then says why."""
    summary = summarize(confined_base(app.roots, base))
    if isinstance(summary, LoraStudioError):
        return gr.update(), gr.update()
    return summary.native_side, summary.native_side


def settings_from(prompt, negative, sampler, steps, cfg, clip_skip, seed, width, height, strengths):
    from ..sample import PreviewSettings

    return PreviewSettings(
        clip_skip=int(clip_skip or 1),
        prompt=str(prompt or "")[:2000],
        negative_prompt=str(negative or "")[:2000],
        strengths=strengths,
        sampler=sampler,
        steps=int(steps),
        cfg=float(cfg),
        seed=int(seed),
        width=int(width),
        height=int(height),
    )


def chosen_strengths(app: AppState, files: list[str] | None, strengths) -> list[tuple[Path, float]]:
    """(file, strength) for each chosen LoRA: the first strength slider goes with the first file, and so on."""
    return [(f, float(s)) for f, s in zip(checked_loras(app, files), strengths, strict=False)]


def loaded_stack(app: AppState, base: str, vae: str, pairs: list[tuple[Path, float]], *common):
    """The previewer of `base` (and `vae`) with the chosen files loaded (the others unloaded), and the settings that
    render them at their strengths; `common` is prompt, negative, sampler, steps, CFG, clip skip, seed, width, height.
    Call it holding the preview lock; `base` and `vae` confined already."""
    settings_from(*common, {f.stem: s for f, s in pairs}).checked()  # refused before a base loads (SDXL: ~30 s)
    previewer = app.previewer(base, vae)
    names = use_loras(previewer, [f for f, _ in pairs])
    return previewer, settings_from(*common, {n: s for n, (_f, s) in zip(names, pairs, strict=True)})


def generate(app: AppState, base, vae, files, prompt, negative, sampler, steps, cfg, clip_skip, seed, width, height,
             *strengths):  # fmt: skip
    """One image with each chosen LoRA at its own strength; returns the image and its parameters text."""
    pairs = chosen_strengths(app, files, strengths)
    base, vae = confined_base(app.roots, base or "demo"), confined_vae(app.roots, vae)
    with app.preview_lock:
        common = (prompt, negative, sampler, steps, cfg, clip_skip, seed, width, height)
        previewer, settings = loaded_stack(app, base, vae, pairs, *common)
        preview = previewer.generate(settings)[0]
    text = preview.parameters + "".join(f"\nnote: {n}" for n in preview.notices)
    return preview.image, text


GRID_KINDS = ("strength x seed", "checkpoint x strength")


def generate_grid(app: AppState, base, vae, files, kind, strengths_text, seeds_text, prompt, negative, sampler,
                  steps, cfg, clip_skip, width, height, *strengths):  # fmt: skip
    """A grid of the first chosen LoRA: strength x seed, or its run's checkpoints x strength (seed: the first
    grid seed). Other chosen LoRAs stay at their sliders' strengths."""
    grid_strengths = parse_numbers(strengths_text, float, "strengths")
    seeds = parse_numbers(seeds_text, int, "seeds")
    pairs = chosen_strengths(app, files, strengths)
    if not pairs:
        raise LoraStudioError("Pick a LoRA for the grid first.")
    if kind not in GRID_KINDS:
        raise LoraStudioError(f"Grid {kind!r} is unknown; pick one of: {', '.join(GRID_KINDS)}.")
    checkpoints = run_lora_files(pairs[0][0]) if kind == "checkpoint x strength" else []
    from ..sample import check_grid_size

    check_grid_size(len(checkpoints) or len(grid_strengths), len(grid_strengths) if checkpoints else len(seeds))
    base, vae = confined_base(app.roots, base or "demo"), confined_vae(app.roots, vae)
    common = (prompt, negative, sampler, steps, cfg, clip_skip, seeds[0], width, height)
    settings_from(*common, {}).checked()  # before it loads
    with app.preview_lock:
        previewer = app.previewer(base, vae)
        subjects = checkpoints or [pairs[0][0]]
        others = [(f, strength) for f, strength in pairs[1:] if f not in subjects]  # a chosen checkpoint is a column
        names = use_loras(previewer, [f for f, _ in others] + subjects)
        fixed = {name: strength for name, (_f, strength) in zip(names, others, strict=False)}
        settings = settings_from(*common, fixed)
        columns = names[len(others) :]
        if checkpoints:
            grid = checkpoint_strength_grid(previewer, settings, columns, checkpoints, grid_strengths)
        else:
            grid = strength_seed_grid(previewer, settings, columns[0], grid_strengths, seeds)
    return grid.image, grid.previews[0][0].parameters


def grid_checkpoints(app: AppState, files: list[str] | None, kind: str):
    """After a checkpoint grid: its run's files to export, labelled with their validation loss, the best chosen."""
    paths = checked_loras(app, (files or [])[:1])
    if kind != "checkpoint x strength" or not paths:
        return gr.Dropdown(choices=[], value=None)
    checkpoints = run_lora_files(paths[0])
    best = run_of_lora_file(paths[0]).best_lora()
    chosen = best if best in checkpoints else checkpoints[-1]
    return gr.Dropdown(choices=[(lora_file_label(f), str(f)) for f in checkpoints], value=str(chosen))


def export_checkpoint(app: AppState, file: str | None) -> str:
    """The picked checkpoint as a kohya fp16 file (what A1111, ComfyUI and diffusers load) in its run's exports/."""
    if not file:
        raise LoraStudioError("Render a checkpoint x strength grid first, then pick the checkpoint to export.")
    (source,) = checked_loras(app, [file])
    return str(export_lora_file(source, exports_path(source, "kohya-fp16"), "kohya", "fp16"))


MAX_BAKE_RANK = 1024


def bake_stack_preview(app: AppState, base, vae, files, prompt, negative, sampler, steps, cfg, clip_skip, seed,
                       width, height, rank, *strengths):  # fmt: skip
    """The chosen LoRAs at their sliders' strengths baked into one (exact, or SVD to `rank`), rendered beside the
    stack before anything is saved; the baked LoRA stays in this page's server-side state for "Save"."""
    pairs = chosen_strengths(app, files, strengths)
    if not pairs:
        raise LoraStudioError("Choose the LoRAs to bake and set their strengths first.")
    rank = int(rank or 0)
    if not 0 <= rank <= MAX_BAKE_RANK:
        raise LoraStudioError(f"The rank must be 0 (exact) to {MAX_BAKE_RANK}, not {rank}.")
    baked, report, _ = bake_lora_files(pairs, None, rank or None)
    base, vae = confined_base(app.roots, base or "demo"), confined_vae(app.roots, vae)
    with app.preview_lock:
        common = (prompt, negative, sampler, steps, cfg, clip_skip, seed, width, height)
        previewer, settings = loaded_stack(app, base, vae, pairs, *common)
        image, difference = baked_comparison(previewer, settings, baked, report.rank)
    note = f"{report.sentence()} Rendered beside the stack: largest pixel difference {difference}."
    return image, note, baked


def save_baked(app: AppState, baked, name: str | None):
    """The baked LoRA of this page (server-side state, never a request value) as a kohya fp16 file in runs/uploads,
    where the LoRA list finds it; an existing file is not replaced."""
    from ..dataset_edit import safe_name
    from ..export import save_kohya
    from ..models import dtype_of

    if baked is None:
        raise LoraStudioError("Bake the stack first (Bake and compare), then save it.")
    stem = safe_name(f"{(name or '').strip().removesuffix('.safetensors') or 'baked'}.safetensors")
    target = app.roots.runs / UPLOADS / (stem if stem.endswith(".safetensors") else f"{stem}.safetensors")
    if target.exists():
        raise LoraStudioError(f"{target.name} exists already in {target.parent}; choose another name.")
    baked.metadata["modelspec.title"] = target.stem
    save_kohya(baked, target, dtype_of("fp16"))
    return str(target), f"Saved {target.name}: it is in the LoRA list (Refresh lists).", gr.Dropdown(
        choices=labelled_lora_choices(app))


def upload_lora(app: AppState, upload: str | None, chosen: list[str] | None):
    """Copy an uploaded LoRA into runs/uploads (name sanitized), check it reads, and add it to the choice."""
    from ..dataset_edit import safe_name
    from ..lora_read import load_lora

    if not upload:
        raise LoraStudioError("No file was uploaded; pick a .safetensors LoRA file.")
    (source,) = uploaded_files(app, [upload])
    name = safe_name(source.name)
    if not name.endswith(".safetensors"):
        raise LoraStudioError(f"{name} is not a .safetensors file; LoRA files must be safetensors.")
    load_lora(source)  # Gradio's own temp copy: a bad file is refused before anything is written here
    target = app.roots.runs / UPLOADS / name
    with atomic_path(target) as partial:
        shutil.copyfile(source, partial)
    kept = [str(p) for p in checked_loras(app, chosen)] if chosen else []
    choices = labelled_lora_choices(app)
    return gr.Dropdown(choices=choices, value=[*kept, str(target)], multiselect=True), f"Added {name}."


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


def refresh_lists(app: AppState) -> tuple:
    return (gr.Dropdown(choices=labelled_lora_choices(app)), gr.Dropdown(choices=base_choices()),
            gr.Dropdown(choices=vae_choices()))  # fmt: skip


def bake_section() -> dict:
    """Rank, Bake and compare, file name, Save, the note and the written file (wired in `build`)."""
    parts = {}
    with gr.Accordion("Bake the stack into one LoRA", open=False, elem_id="preview-bake"):
        with gr.Row():
            parts["rank"] = gr.Number(0, label="Rank (0: exact, the ranks added; else an SVD to this rank)",
                                      precision=0, minimum=0, maximum=MAX_BAKE_RANK,
                                      elem_id="preview-bake-rank")  # fmt: skip
            parts["button"] = gr.Button("Bake and compare", elem_id="preview-bake-button")
            parts["name"] = gr.Textbox(label="File name", placeholder="my-stack", max_lines=1, max_length=100,
                                       elem_id="preview-bake-name")  # fmt: skip
            parts["save"] = gr.Button("Save the baked LoRA", elem_id="preview-bake-save")
        parts["note"] = gr.Markdown(elem_id="preview-bake-note")
        parts["file"] = gr.File(label="Baked LoRA (kohya, fp16)", elem_id="preview-bake-file")
    return parts


SAMPLING_ROW = ("sampler", "steps", "cfg", "clip_skip", "seed", "width", "height")  # PreviewDefaults' names


def sampling_row() -> dict[str, gr.components.Component]:
    """The row of sampling settings, keyed as SAMPLING_ROW (follow_lora fills most of them from a run)."""
    with gr.Row():
        return {
            "sampler": gr.Dropdown(list(SAMPLERS), value="euler_a", label="Sampler"),  # the config's names: no torch
            "steps": gr.Number(20, label="Steps", precision=0, minimum=1, maximum=MAX_STEPS, elem_id="preview-steps"),
            "cfg": gr.Number(5.0, label="CFG", elem_id="preview-cfg"),
            "clip_skip": gr.Number(1, label="Clip skip", precision=0, minimum=1, maximum=12,
                                   elem_id="preview-clip-skip", info="2 for LoRAs trained with it (anime models)"),
            "seed": gr.Number(1, label="Seed", precision=0),
            "width": gr.Number(64, label="Width", precision=0, minimum=8, maximum=MAX_SIDE, elem_id="preview-width"),
            "height": gr.Number(64, label="Height", precision=0, minimum=8, maximum=MAX_SIDE,
                                elem_id="preview-height"),
        }  # fmt: skip


def build(app: AppState, refreshed_on: Sequence = ()) -> None:
    """The tab; its LoRA and base-model lists are read again on each of `refreshed_on` (page load, tab select), so a
    run that finished since shows up without a click on Refresh lists."""
    from .train_tab import base_choices

    with gr.Row():
        base = gr.Dropdown(base_choices(), value="demo", label="Base model", allow_custom_value=True, scale=3,
                           elem_id="preview-base", info="Follows the first LoRA's run; the size follows the base")
        vae = gr.Dropdown(vae_choices(), value="", label="VAE", allow_custom_value=True, scale=2,
                          elem_id="preview-vae", info="The models folder's VAE files (or a path); follows the run")
        files = gr.Dropdown(labelled_lora_choices(app), multiselect=True, scale=5, elem_id="preview-loras",
                            label=f"LoRA files (stack up to {MAX_STACK})")  # fmt: skip
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
    row = sampling_row()
    sampler, steps, cfg, clip_skip, seed, width, height = (row[k] for k in SAMPLING_ROW)
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="preview-generate")
        kind = gr.Dropdown(list(GRID_KINDS), value=GRID_KINDS[0], label="Grid", elem_id="preview-grid-kind")
        strengths = gr.Textbox("0, 0.5, 1", label="Grid strengths")
        seeds = gr.Textbox("1, 2", label="Grid seeds (checkpoint grids use the first)")
        grid = gr.Button("Grid", elem_id="preview-grid")
    image = gr.Image(label="Result", type="pil", height=512, elem_id="preview-image")
    parameters = gr.Textbox(label="Parameters", lines=3, elem_id="preview-parameters")
    with gr.Row():
        pick = gr.Dropdown([], label="Checkpoint to export (the best validation loss is chosen)", scale=3,
                           elem_id="preview-pick")  # fmt: skip
        export = gr.Button("Export this checkpoint", scale=1, elem_id="preview-export")
    download = gr.File(label="Exported checkpoint (kohya, fp16)", elem_id="preview-download")
    bake = bake_section()
    baked = gr.State(None)  # the baked LoraFile, on the server

    gr.on([refresh.click, *refreshed_on], shown(refresh_lists, app), None, [files, base, vae],
          show_progress="hidden", queue=False)  # fmt: skip
    # show_progress_on: a refusal's badge goes on the message, not over the chosen LoRAs (ui/errors.py says why)
    upload.upload(shown(upload_lora, app), [upload, files], [files, upload_status], show_progress_on=upload_status)
    followed = gr.State(None)  # the LoRA file whose settings the form took, so stacking more keeps them
    followers = [{"base_model": base, "vae": vae, "negative_prompt": negative, **row}[key] for key in FOLLOWED]
    # Outside the queue as the lists' refresh, which sets it off at each select of the tab (README, Switching tabs)
    files.change(shown(lora_picked, app), [files, followed], [prompt, *followers, followed], show_progress="hidden",
                 queue=False).then(strength_sliders, files, sliders, queue=False)  # fmt: skip
    base.input(shown(base_size, app), base, [width, height], show_progress="hidden")  # .input: a pick by hand only
    common = [prompt, negative, sampler, steps, cfg, clip_skip]
    go.click(shown(generate, app), [base, vae, files, *common, seed, width, height, *sliders], [image, parameters])
    grid.click(shown(generate_grid, app), [base, vae, files, kind, strengths, seeds, *common, width, height,
                                           *sliders], [image, parameters]).success(
        shown(grid_checkpoints, app), [files, kind], pick)  # fmt: skip
    export.click(shown(export_checkpoint, app), pick, download)
    baking = [base, vae, files, *common, seed, width, height, bake["rank"], *sliders]
    bake["button"].click(shown(bake_stack_preview, app), baking, [image, bake["note"], baked])
    bake["save"].click(shown(save_baked, app), [baked, bake["name"]], [bake["file"], bake["note"], files],
                       show_progress_on=bake["note"])  # fmt: skip
