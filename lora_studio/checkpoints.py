"""Reading a checkpoint's table of contents and telling its family, without loading any weights.

`read_checkpoint_index` gives tensor names, shapes and metadata of a single-file checkpoint (safetensors
through the shared header reader; pickle only when explicitly allowed, then weights-only);
`detect_family` names SD1 / SD2 (512 or 768-v) / SDXL from the keys, and refuses what is not a base model
(a LoRA, a VAE alone) in one sentence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .errors import ModelLoadError
from .safetensors_io import SafetensorsFileError, read_header

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}

LORA_KEY_MARKERS = ("lora_down", "lora_up", ".lora_A.", ".lora_B.", "hada_w1", "lokr_w1", ".lora.down.")


@dataclass
class CheckpointIndex:
    """The names and shapes of a checkpoint's tensors, and its metadata, without loading the data."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_safetensors_index(path: Path) -> CheckpointIndex:
    """Names, shapes and metadata from the shared header reader, which turns any malformed header into a sentence."""
    try:
        header = read_header(path)
    except SafetensorsFileError as exc:
        raise ModelLoadError(str(exc)) from None
    return CheckpointIndex(path, header.shapes, header.metadata)


def read_pickle_index(path: Path, allow_pickle: bool) -> CheckpointIndex:
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} is a pickle checkpoint ({path.suffix}), which can run code when opened, so it is refused; "
            "convert it to .safetensors, or allow pickle files explicitly if you trust its source."
        )
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise ModelLoadError(
            f"{path} could not be read as a weights-only checkpoint ({type(exc).__name__}); "
            "it may be damaged or contain code objects; convert it to .safetensors with the tool that made it."
        ) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return CheckpointIndex(path, shapes, {})


def vae_tensor_count(index: CheckpointIndex) -> int:
    """How many of a file's tensors are a VAE's (A1111's or diffusers' names, alone or under first_stage_model.)."""
    return sum(1 for k in index.shapes if k.removeprefix(layout.VAE_PREFIX).startswith(layout.VAE_PARTS))


def is_vae_alone(index: CheckpointIndex) -> bool:
    """A VAE file (what A1111 lists under models/VAE): VAE tensors and no UNet, text encoder or LoRA ones."""
    keys = index.shapes.keys()
    others = any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.", "lora_")) or
                 any(m in k for m in LORA_KEY_MARKERS) for k in keys)  # fmt: skip
    return not others and vae_tensor_count(index) > 0


def read_checkpoint_index(path: Path, allow_pickle: bool = False) -> CheckpointIndex:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return read_pickle_index(path, allow_pickle)
    return read_safetensors_index(path)


@dataclass
class Detected:
    family: str
    prediction_type: str
    notes: list[str]


def detect_family(index: CheckpointIndex, prediction_type: str | None = None) -> Detected:
    """Tell SD1 / SD2 / SD2-v / SDXL apart from the key layout, or say clearly what the file is instead."""
    keys = index.shapes.keys()
    _reject_non_base_models(index)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise ModelLoadError(
            f"{index.path} is an SDXL refiner, which is not a base model for LoRA training; "
            "pick the SDXL base checkpoint (or a fine-tune of it)."
        )
    elif has(layout.SD2_TEXT_PREFIX):
        family = "sd2"
    elif has(layout.SD1_TEXT_PREFIX):
        family = "sd1"
    else:
        raise ModelLoadError(
            f"{index.path} has a UNet but no text encoder (no cond_stage_model.* or conditioner.* keys); "
            "LoRA training needs a full checkpoint, so use the complete model file."
        )
    in_channels = index.shapes.get(layout.UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise ModelLoadError(
            f"{index.path} is a {in_channels}-channel UNet (an inpainting or other special model); "
            "train LoRAs on the ordinary text-to-image base model of that family."
        )
    prediction, notes = _prediction_type(index, family, prediction_type)
    return Detected(with_prediction(family, prediction), prediction, notes)


def _reject_non_base_models(index: CheckpointIndex) -> None:
    keys = list(index.shapes)
    path = index.path
    if any(m in k for k in keys for m in LORA_KEY_MARKERS) or any(k.startswith("lora_") for k in keys):
        raise ModelLoadError(
            f"{path} is a LoRA adapter, not a base model; choose the checkpoint it was trained on as the base "
            "and load this file as an adapter in the Preview tab."
        )
    if any(k.startswith(layout.UNET_PREFIX) for k in keys):
        return
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        what = "a Flux model"
    elif any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
        what = "an SD3 model"
    elif vae_tensor_count(index):
        raise ModelLoadError(
            f"{path} is a VAE on its own, not a base model; give an SD 1.x, SD 2.x or SDXL checkpoint as the base, "
            "and this file as its `vae` (the Train form's General section, or the Preview's VAE list)."
        )
    elif any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
        what = "a diffusers-format UNet weights file"
    else:
        what = "not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)"
    raise ModelLoadError(
        f"{path} is {what}, an architecture LoRA Studio cannot train on; "
        "give an SD 1.x, SD 2.x or SDXL checkpoint (.safetensors) or a diffusers folder of one."
    )


def _prediction_type(index: CheckpointIndex, family: str, requested: str | None) -> tuple[str, list[str]]:
    """Epsilon or v: the caller's choice, else the file's own metadata, else a guess from its name."""
    if requested:
        return normalise_prediction(requested), []
    declared = index.metadata.get("modelspec.prediction_type") or index.metadata.get("prediction_type")
    if declared:
        return normalise_prediction(declared), []
    if "v_pred" in index.shapes:  # marker tensor some v-prediction SDXL fine-tunes carry (read by ComfyUI)
        return "v_prediction", []
    if family == "sd2":
        name = index.path.name.lower()
        if "768" in name or re.search(r"(^|[-_.])v[-_]?pred", name):
            return "v_prediction", [
                f"assumed v-prediction for {index.path.name} (768 in its name); override it if wrong"
            ]
        return "epsilon", [
            f"assumed epsilon prediction for SD2 file {index.path.name}; if it is a 768-v model, choose v-prediction"
        ]
    return "epsilon", []


def with_prediction(family: str, prediction: str) -> str:
    """SD2 is two families to its users (512 epsilon, 768 v); the others keep their name either way."""
    return "sd2-v" if family == "sd2" and prediction == "v_prediction" else family


def normalise_prediction(value: str) -> str:
    v = value.strip().lower()
    if v in ("v", "v_prediction", "v-prediction", "vpred", "v_pred"):
        return "v_prediction"
    if v in ("epsilon", "eps", "noise"):
        return "epsilon"
    raise ModelLoadError(f"prediction type {value!r} is unknown; use 'epsilon' or 'v_prediction'.")


def family_of_configs(pipeline_class: str, unet_config: Mapping, text_hidden_act: str) -> str:
    """SD1, SD2 or SDXL from a diffusers folder's configs alone (no weights needed)."""
    if pipeline_class == "StableDiffusionXLPipeline":
        return "sdxl"
    cross_dim = unet_config.get("cross_attention_dim")
    if cross_dim in (768, 1024):
        return "sd1" if cross_dim == 768 else "sd2"
    # Small custom models: OpenCLIP (SD2) text encoders use gelu, OpenAI CLIP (SD1) quick_gelu.
    return "sd2" if text_hidden_act == "gelu" else "sd1"
