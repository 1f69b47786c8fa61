"""Where things live, and which folders a request may touch.

Two places, never the working directory:
- the checkout (where the package lies): the bundled `assets/` and `presets/`, read-only;
- the home (`LORA_STUDIO_HOME`, default: the checkout): `runs/`, `datasets/` and `models/`, the app's own
  data. The app, the CLI and the trainer all resolve relative folders against it, so the app started
  from any working directory finds the runs the CLI wrote.

`Roots` is the app's trust boundary for paths: every path that arrives in a request is resolved
(symlinks included) and must land inside one of its folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraStudioError

CHECKOUT = Path(__file__).resolve().parent.parent
ASSETS_DIR = CHECKOUT / "assets"
SD_CONFIGS_DIR = ASSETS_DIR / "sd-configs"
DEMO_MODEL_DIR = ASSETS_DIR / "demo-model"
DEMO_DATASET_DIR = ASSETS_DIR / "demo-dataset"
DEMO_VALIDATION_DIR = ASSETS_DIR / "demo-validation"  # 8 held-out images of the same style (validation.path)
PRESETS_DIR = CHECKOUT / "presets"


class OutsideRootsError(LoraStudioError):
    """A path from a request that resolves outside every folder the app may use."""


def home() -> Path:
    """LORA_STUDIO_HOME, else the checkout; read on each call so tests and `--home` can point it elsewhere."""
    return Path(os.environ.get("LORA_STUDIO_HOME") or CHECKOUT).expanduser().resolve()


def datasets_dir() -> Path:
    """Uploads, new datasets and the editable copy of the demo dataset."""
    return home() / "datasets"


def models_dir() -> Path:
    """The folder the app lists base models from: LORA_STUDIO_MODELS (the app's --models-dir sets it),
    else models/ in the home. Read on each call so a changed setting shows without a restart."""
    configured = os.environ.get("LORA_STUDIO_MODELS")
    return Path(configured).expanduser().resolve() if configured else home() / "models"


def captioners_dir() -> Path:
    """Captioning models the person has on disk, one folder each (BLIP, BLIP-2, Florence-2, a WD14 tagger)."""
    return models_dir() / "captioners"


def user_presets_dir() -> Path:
    """Presets a person saved ("Save as preset", `lora-studio config --save`), beside the bundled read-only ones;
    its own folder, as the home defaults to the checkout, whose presets/ are the bundled ones."""
    return home() / "user-presets"


def in_home(path: str | os.PathLike) -> Path:
    """A folder from a config: absolute as given, relative ones under the home (never the working directory)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else home() / path


def sd_config_dir(family: str) -> Path:
    """The bundled diffusers config folder (configs and tokenizer files, no weights) of a family."""
    return SD_CONFIGS_DIR / family


def is_within(path: Path, folder: Path) -> bool:
    """Whether the resolved `path` is `folder` or lies below it (both resolved, symlinks followed)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class Roots:
    """The folders the app may read and write on behalf of a request.

    Writable: the runs and datasets folders and the folders given with `--allow-dir`. Readable as well:
    the models folder and the bundled assets (the demo model and dataset)."""

    runs: Path
    datasets: Path
    models: Path
    extra: tuple[Path, ...] = ()

    @classmethod
    def default(cls, extra: tuple[str | os.PathLike, ...] = ()) -> Roots:
        from .runs import runs_root

        return cls(runs_root(), datasets_dir(), models_dir(), tuple(Path(p).expanduser().resolve() for p in extra))

    @property
    def writable(self) -> tuple[Path, ...]:
        return (self.runs, self.datasets, *self.extra)

    @property
    def readable(self) -> tuple[Path, ...]:
        return (*self.writable, self.models, ASSETS_DIR)

    def served(self) -> list[str]:
        """What Gradio may serve files from (its `allowed_paths`): exactly these folders."""
        return [str(p) for p in self.readable]

    def resolve(self, path: str | os.PathLike, what: str, write: bool = False, within: Path | None = None) -> Path:
        """`path` resolved (symlinks followed) if it lies inside the roots (or inside `within`); else refused.

        `what` names the field in the message ("dataset folder", "output_dir")."""
        text = str(path).strip()
        if not text:
            raise OutsideRootsError(f"The {what} is empty; choose a folder inside {self.describe(write)}.")
        resolved = Path(text).expanduser()
        resolved = (resolved if resolved.is_absolute() else home() / resolved).resolve()
        allowed = (within,) if within is not None else (self.writable if write else self.readable)
        if not any(is_within(resolved, root) for root in allowed):
            where = within if within is not None else self.describe(write)
            raise OutsideRootsError(
                f"The {what} {text!r} lies outside {where}, so the app will not {'write' if write else 'read'} it; "
                "move it there, or start the app with --allow-dir FOLDER to add its folder."
            )
        return resolved

    def describe(self, write: bool = False) -> str:
        return "the app's folders (" + ", ".join(str(p) for p in (self.writable if write else self.readable)) + ")"
