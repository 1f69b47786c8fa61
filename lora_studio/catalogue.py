"""The models a person can pick: the bundled ones, and what lies in the models folder, each described
(family, prediction type, kind) from headers and configs alone, without loading weights."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import (
    PICKLE_SUFFIXES,
    detect_family,
    family_of_configs,
    is_vae_alone,
    normalise_prediction,
    read_checkpoint_index,
    with_prediction,
)
from .errors import ModelLoadError
from .models import (
    FAMILIES,
    FAMILY_NAMES,
    NATIVE_SIDE,
    missing_pipeline_files,
    native_side_of_configs,
    read_config_json,
    resolve_source,
)
from .paths import DEMO_MODEL_DIR, sd_config_dir


@dataclass
class SourceSummary:
    """What a base-model source is, found from headers and configs without loading any weights."""

    source: str
    kind: str  # "demo", "diffusers folder", "single file" or "hub cache"
    family: str
    prediction_type: str
    notes: list[str]
    native_side: int  # the image side it was trained at (pixels)


def describe_source(source: str | Path, allow_pickle: bool = False) -> SourceSummary:
    path, label = resolve_source(source)
    if label == "demo":
        kind = "demo"
    elif label != str(path):
        kind = "hub cache"
    else:
        kind = "diffusers folder" if path.is_dir() else "single file"
    if path.is_dir():
        missing = missing_pipeline_files(path)
        if missing:
            raise ModelLoadError(f"{path} is not a complete diffusers model folder: missing {', '.join(missing)}.")
        index = read_config_json(path / "model_index.json")
        unet = read_config_json(path / "unet" / "config.json")
        text = read_config_json(path / "text_encoder" / "config.json")
        family = family_of_configs(index.get("_class_name", ""), unet, text.get("hidden_act", ""))
        prediction = normalise_prediction(
            read_config_json(path / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
        )
        family = with_prediction(family, prediction)
        try:
            side = native_side_of_configs(unet, read_config_json(path / "vae" / "config.json"))
        except (KeyError, TypeError, ValueError):  # an odd config: the family's usual side, and loading says more
            side = NATIVE_SIDE[family]
        return SourceSummary(label, kind, family, prediction, [], side)
    detected = detect_family(read_checkpoint_index(path, allow_pickle))
    family = detected.family
    return SourceSummary(label, kind, family, detected.prediction_type, detected.notes, NATIVE_SIDE[family])


def find_local_models(folder: Path) -> list[Path]:
    """Checkpoint files and diffusers folders directly inside `folder` (not deeper), sorted by name.

    Pickle files are listed too, so the picker can say why they are refused rather than hide them.
    """
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if entry.is_dir() and (entry / "model_index.json").is_file():
            found.append(entry)
        elif entry.is_file() and entry.suffix.lower() in {".safetensors", *PICKLE_SUFFIXES}:
            found.append(entry)
    return found


def find_local_vaes(folder: Path) -> list[Path]:
    """VAE .safetensors files directly in `folder` or in its VAE/ subfolder (A1111's models/VAE), told from
    checkpoints and LoRAs by their headers; a file that cannot be read is left out (the base list says why)."""
    found: dict[Path, Path] = {}
    for sub in (folder, folder / "VAE", folder / "vae"):
        for path in sorted(sub.glob("*.safetensors"), key=lambda p: p.name.lower()) if sub.is_dir() else []:
            try:
                stat = path.stat()
            except OSError:
                continue
            if _is_vae_file(str(path), stat.st_size, stat.st_mtime_ns):
                found.setdefault(path.resolve(), path)
    return list(found.values())


@functools.lru_cache(maxsize=256)
def _is_vae_file(path: str, _size: int, _mtime_ns: int) -> bool:
    """Kept per (path, size, modification time): the page lists the models folder on every load and tab select."""
    try:
        return is_vae_alone(read_checkpoint_index(Path(path)))
    except ModelLoadError:
        return False


def bundled_models() -> list[tuple[str, str, bool]]:
    """(name, what it is, whether it is usable now) for what ships under assets/."""
    demo_ready = (DEMO_MODEL_DIR / "model_index.json").is_file()
    rows = [("demo", "tiny SD-family model for CPU runs; trains in about 80 s, no checkpoint needed", demo_ready)]
    for family in FAMILIES:
        ready = (sd_config_dir(family) / "model_index.json").is_file()
        rows.append(
            (family, f"offline configs and tokenizers: load your own {FAMILY_NAMES[family]} checkpoint", ready)
        )
    return rows
