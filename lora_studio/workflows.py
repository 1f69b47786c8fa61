"""What the CLI and the app both do with LoRA files and previews; `cli.py` and `ui/*` call these and hold no copy.

- export (any format to kohya, or to diffusers' own with the base model's help), resize, merge into a base;
- the grids (strength x seed of one LoRA, checkpoint x strength of one run), with their labels and caps;
- the policies both follow, such as "the demo model runs in fp32".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LoraStudioError
from .models import dtype_of, load_base
from .runs import RunFolder, lowest_loss, run_of_lora_file
from .sample_prompts import MAX_SIDE

if TYPE_CHECKING:  # torch loads on first use: the app's page comes up before it (README: start-up time)
    import torch

    from .models import BaseModel
    from .sample import Axis, Grid, Previewer, PreviewSettings

MAX_GRID_CHECKPOINTS = 8  # a grid wider than this is unreadable; the newest are kept
# "1024x1024" (modelspec.resolution) or "(512, 512)" (kohya's ss_resolution): width first
RESOLUTION_TEXT = re.compile(r"^\(?\s*(\d{1,5})\s*(?:x|,)\s*(\d{1,5})\s*\)?$")


def base_dtype(source: str) -> torch.dtype | None:
    """The demo model is tiny: full precision on any device (half precision only costs it quality).
    Anything else: None, the device's usual dtype."""
    return dtype_of("fp32") if str(source).strip() == "demo" else None


def load_preview_base(source: str, vae: str = "") -> BaseModel:
    """The base model previews render with, and `vae` in place of its own VAE when named."""
    return load_base(source, dtype=base_dtype(source), vae=vae or None)


def base_model_of(run: RunFolder) -> str:
    """The base model a run trained on, as its config names it."""
    from .config import load_config

    return load_config(run.config).base_model


@dataclass(frozen=True)
class PreviewDefaults:
    """What a LoRA file says about rendering it. From its run's config (None for a file of no run, or a run whose
    config cannot be read): the base model and VAE ("" for the model's own), the clip skip it trained with, and the
    sampler, steps, CFG and negative prompt of its samples. From the file's metadata: the size it trained at (None
    when the metadata does not say)."""

    base_model: str | None = None
    vae: str | None = None
    width: int | None = None
    height: int | None = None
    clip_skip: int | None = None
    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    negative_prompt: str | None = None


def preview_defaults(lora_file: Path) -> PreviewDefaults:
    """The settings a preview of `lora_file` starts from, so that it renders as the run's own samples did (an SDXL
    LoRA not on the demo model at 64 pixels, a clip-skip-2 LoRA at clip skip 2): the run's config, and the file's
    metadata for the size (its trainer's, kohya's or ours)."""
    from .config import load_config
    from .safetensors_io import read_header

    run = run_of_lora_file(lora_file)
    found: dict = {}
    try:
        if run.config.is_file():
            config = load_config(run.config)
            sample = config.sample
            found = dict(base_model=config.base_model, vae=config.vae, clip_skip=config.clip_skip,
                         sampler=sample.sampler, steps=sample.num_inference_steps, cfg=sample.guidance_scale,
                         negative_prompt=sample.negative_prompt)  # fmt: skip
    except LoraStudioError:  # a config of an older, damaged or foreign run: the person's own settings stay
        pass
    metadata = read_header(lora_file).metadata
    for key in ("modelspec.resolution", "ss_resolution"):
        size = RESOLUTION_TEXT.match(str(metadata.get(key, "")).strip())
        if size and all(8 <= int(side) <= MAX_SIDE for side in size.groups()):
            found.update(width=int(size.group(1)), height=int(size.group(2)))
            break
    return PreviewDefaults(**found)


# --- LoRA files -----------------------------------------------------------------------------------------------


def export_lora_file(source: Path, out: Path, fmt: str, precision: str, base_model: str | None = None) -> Path:
    """`source` (any readable format) written as kohya, or as diffusers' own format (which needs the base)."""
    from .export import convert_to_diffusers, save_kohya
    from .lora_read import load_lora

    lora = load_lora(source)
    if fmt == "kohya":
        return save_kohya(lora, out, dtype_of(precision))
    if fmt != "diffusers":
        raise LoraStudioError(f"Export format {fmt!r} is unknown; choose kohya or diffusers.")
    if not base_model:
        raise LoraStudioError("Exporting in the diffusers format needs the base model the LoRA was trained on.")
    return convert_to_diffusers(lora, load_preview_base(base_model), out, dtype_of(precision))


def resize_lora_file(source: Path, out: Path, rank: int | None, energy: float | None, precision: str = "fp16"):
    """SVD to a smaller rank; returns the written path and the error report."""
    from .export import save_kohya
    from .lora_read import load_lora
    from .tools import resize_lora

    resized, report = resize_lora(load_lora(source), rank=rank, energy=energy)
    return save_kohya(resized, out, dtype_of(precision)), report


def parse_stack_entry(text: str) -> tuple[Path, float]:
    """`file.safetensors:0.7` (strength 1 without the colon part) as (file, strength)."""
    path, sep, strength = text.rpartition(":")
    if not sep or not path or "/" in strength or "\\" in strength:
        return Path(text), 1.0
    try:
        return Path(path), float(strength)
    except ValueError:
        raise LoraStudioError(f"{text!r}: the strength after the colon must be a number, e.g. {path}:0.7.") from None


def bake_lora_files(
    stack: Sequence[tuple[Path, float]], out: Path | None, rank: int | None = None, energy: float | None = None,
    precision: str = "fp16",
):  # fmt: skip
    """LoRA files at their strengths baked into one LoRA (`tools.bake_stack`); written as kohya when `out` is given.
    Returns (the baked LoraFile, its report, the written path or None)."""
    from .export import save_kohya
    from .lora_read import load_lora
    from .tools import bake_stack

    baked, report = bake_stack([(load_lora(path), strength) for path, strength in stack], rank, energy)
    written = save_kohya(baked, out, dtype_of(precision)) if out is not None else None
    return baked, report, written


def extract_lora_file(
    base_model: str, tuned_model: str, out: Path, rank: int | None, energy: float | None, targets: str = "attn-ff",
    text_encoders: bool = True, precision: str = "fp16",
):  # fmt: skip
    """A LoRA of a fine-tuned checkpoint's difference to its base (`tools.extract_lora`), written as kohya; exact
    work, so both load in fp32 on the CPU. Returns the written path and the error report."""
    from .export import save_kohya
    from .tools import extract_lora

    base = load_base(base_model, dtype=dtype_of("fp32"), device="cpu")
    tuned = load_base(tuned_model, dtype=dtype_of("fp32"), device="cpu")
    lora, report = extract_lora(base, tuned, rank, energy, targets, text_encoders)
    return save_kohya(lora, out, dtype_of(precision)), report


def merge_into_base(base_model: str, lora_file: Path, strength: float, out: Path, precision: str = "fp16") -> Path:
    """A single-file checkpoint of the base with the LoRA baked in; exact work, so fp32 on the CPU."""
    from .lora_read import load_lora
    from .tools import merge_lora

    base = load_base(base_model, dtype=dtype_of("fp32"), device="cpu")
    return merge_lora(base, load_lora(lora_file), float(strength), out, dtype=dtype_of(precision))


def exports_path(source: Path, suffix: str) -> Path:
    """Where the Library puts what it makes from one of a run's files: the run's exports/ folder."""
    return run_of_lora_file(source).exports / f"{source.stem}-{suffix}.safetensors"


# --- grids ----------------------------------------------------------------------------------------------------


def strength_seed_grid(
    previewer: Previewer, settings: PreviewSettings, lora: str, strengths: Sequence[float], seeds: Sequence[int]
) -> Grid:
    """One LoRA at several strengths (columns) and seeds (rows); other loaded LoRAs stay as `settings` says."""
    from .sample import Axis

    return previewer.grid(settings, Axis("strength", tuple(strengths), lora=lora), Axis("seed", tuple(seeds)))


def checkpoint_label(path: Path) -> str:
    """'step 200' for a checkpoint file, 'final' for the run's own file: what varies between the columns."""
    step = RunFolder.checkpoint_step(path)
    return f"step {step}" if step is not None else "final"


def validation_note(path: Path) -> str:
    """'val 0.0812' for a LoRA file its run validated, plus ' (best)' for the run's best; '' otherwise."""
    losses = run_of_lora_file(path).validation_losses()  # one read of the run's record per file
    entry = {p.resolve(): e for p, e in losses.items()}.get(path.resolve())
    if not entry:
        return ""
    best = lowest_loss(losses)
    return f"val {entry['validation_loss']:.4f}" + (" (best)" if best and best.resolve() == path.resolve() else "")


def lora_file_label(path: Path) -> str:
    """A run's LoRA file as the pickers list it: its name, and its validation loss when it has one."""
    note = validation_note(path)
    return f"{path.name} · {note}" if note else path.name


def run_lora_files(lora_file: Path) -> list[Path]:
    """The LoRA files of the run `lora_file` belongs to, checkpoints by step then the final file: the newest 8, with
    the best (lowest validation loss) in place of the oldest of them when it is older."""
    run = run_of_lora_file(lora_file)
    files = run.checkpoint_files() + run.final_files()
    if len(files) < 2:
        raise LoraStudioError(f"{run.name} has no checkpoints besides its final LoRA; save every N steps to get some.")
    kept = files[-MAX_GRID_CHECKPOINTS:]
    best = run.best_lora()
    if best is not None and best in files and best not in kept:
        kept = [best, *kept[1:]]
    return kept


def checkpoint_column(path: Path) -> str:
    """A checkpoint grid's column label: the step, then the validation loss and "best" on lines of their own."""
    note = validation_note(path)
    loss, _, best = note.partition(" (")
    return "\n".join(part for part in (checkpoint_label(path), loss, "best" if best else "") if part)


BAKED_ADAPTER = "baked_stack"


def baked_comparison(previewer: Previewer, settings: PreviewSettings, baked, rank: int):
    """The stack (`settings.strengths`) and the baked LoRA at strength 1 alone, side by side, for one prompt and
    seed: what saving would give, before it is saved. Returns the image and the largest pixel difference."""
    import numpy as np

    from .sample import draw_grid

    previewer.remove_lora(BAKED_ADAPTER)
    previewer.add_lora(baked, BAKED_ADAPTER)
    stack = previewer.generate(settings)[0].image
    alone = previewer.generate(replace(settings, strengths={BAKED_ADAPTER: 1.0}))[0].image
    difference = int(np.abs(np.asarray(stack, dtype=np.int16) - np.asarray(alone, dtype=np.int16)).max())
    labels = ["the stack", f"baked (rank {rank}), strength 1"]
    image = draw_grid([[stack, alone]], labels, [f"seed {settings.seed}"], f"largest pixel difference: {difference}")
    return image, difference


def checkpoint_strength_grid(
    previewer: Previewer, settings: PreviewSettings, names: Sequence[str], files: Sequence[Path],
    strengths: Sequence[float],
) -> Grid:  # fmt: skip
    """Loaded checkpoints `names` (columns, labelled by step and validation loss, the best framed) at several
    strengths (rows): the pick-the-best-checkpoint view."""
    from .sample import Axis

    best = run_of_lora_file(files[0]).best_lora()
    resolved = [f.resolve() for f in files]
    highlight = resolved.index(best.resolve()) if best is not None and best.resolve() in resolved else None
    columns = tuple(checkpoint_column(f) for f in files)
    checkpoints = Axis("checkpoint", tuple(names), names=columns, highlight=highlight)
    return previewer.grid(settings, checkpoints, Axis("strength", tuple(strengths)))


def parse_grid_axis(spec: str, previewer: Previewer, default_lora: str | None) -> Axis:
    """The CLI's `strength=0,0.5,1`, `strength:NAME=...`, `seed=1,2` or `checkpoint=FILE,FILE`."""
    from .sample import Axis

    kind, _, values = spec.partition("=")
    kind, _, lora = kind.partition(":")
    items = [v.strip() for v in values.split(",") if v.strip()]
    try:
        if kind == "seed":
            return Axis("seed", tuple(int(v) for v in items))
        if kind == "strength":  # of the named or first LoRA; with a checkpoint axis, of each checkpoint
            return Axis("strength", tuple(float(v) for v in items), lora=lora or default_lora)
    except ValueError:
        raise LoraStudioError(f"Grid axis {spec!r} has a value that is not a number.") from None
    if kind == "checkpoint":
        files = [Path(v) for v in items]
        names = tuple(previewer.add_lora(f) for f in files)
        return Axis("checkpoint", names, names=tuple(checkpoint_label(f) for f in files))
    raise LoraStudioError(f"Grid axis {spec!r} is unknown; use strength=..., seed=... or checkpoint=FILE,FILE.")
