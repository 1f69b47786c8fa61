"""Whole-model tools: write a loaded base model back to one single-file checkpoint.

The writer produces the original LDM/SGM layout that A1111, Forge, ComfyUI and diffusers'
`from_single_file` read. It is what "merge a LoRA into a checkpoint" will save through.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import torch
from safetensors.torch import save_file

from . import layout
from .fsutil import atomic_path
from .models import BASE_MODEL_VERSION, BaseModel

MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}


def to_ldm_state_dict(base: BaseModel) -> dict[str, torch.Tensor]:
    """All of a base model's weights under their single-file names."""
    state = layout.unet_to_ldm(base.unet.state_dict(), base.unet.config)
    state |= layout.vae_to_ldm(base.vae.state_dict(), base.vae.config)
    encoders = base.text_encoders
    if base.family == "sdxl":
        state |= layout.clip_to_ldm(encoders[0].state_dict(), layout.SDXL_TEXT_PREFIXES[0])
        state |= layout.open_clip_to_ldm(encoders[1].state_dict(), layout.SDXL_TEXT_PREFIXES[1])
    elif base.family in ("sd2", "sd2-v"):
        state |= layout.open_clip_to_ldm(encoders[0].state_dict(), layout.SD2_TEXT_PREFIX)
    else:
        state |= layout.clip_to_ldm(encoders[0].state_dict(), layout.SD1_TEXT_PREFIX)
    return state


def single_file_metadata(base: BaseModel, title: str) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[base.family],
        "modelspec.title": title,
        "modelspec.resolution": f"{base.native_resolution}x{base.native_resolution}",
        "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ss_base_model_version": BASE_MODEL_VERSION[base.family],
    }


def save_single_file(base: BaseModel, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write `base` as one .safetensors checkpoint; the previous file at `path` survives any failure."""
    state = to_ldm_state_dict(base)
    # safetensors needs contiguous CPU tensors; no copies beyond that, since an SDXL model is ~7 GB in fp32.
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    title = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=single_file_metadata(base, title))
