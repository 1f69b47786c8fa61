"""Where the bundled data lives. The app runs from its checkout (`pip install -e .`), like kohya_ss
and OneTrainer, so assets and presets are found next to the package rather than copied into it."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(os.environ.get("LORA_STUDIO_HOME", Path(__file__).resolve().parent.parent))
ASSETS_DIR = PROJECT_ROOT / "assets"
SD_CONFIGS_DIR = ASSETS_DIR / "sd-configs"
DEMO_MODEL_DIR = ASSETS_DIR / "demo-model"
DEMO_DATASET_DIR = ASSETS_DIR / "demo-dataset"
PRESETS_DIR = PROJECT_ROOT / "presets"


def models_dir() -> Path:
    """The folder the app lists base models from: LORA_STUDIO_MODELS (the app's --models-dir sets it),
    else models/ in the checkout. Read on each call so a changed setting shows without a restart."""
    return Path(os.environ.get("LORA_STUDIO_MODELS") or PROJECT_ROOT / "models").expanduser()


def sd_config_dir(family: str) -> Path:
    """The bundled diffusers config folder (configs and tokenizer files, no weights) of a family."""
    return SD_CONFIGS_DIR / family
