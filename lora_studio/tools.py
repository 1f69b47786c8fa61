"""Tools: write a base model back to one single-file checkpoint; resize and merge LoRA files.

The writer produces the original LDM/SGM layout that A1111, Forge, ComfyUI and diffusers'
`from_single_file` read; merging a LoRA into a checkpoint saves through it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import layout
from .export import load_into_pipeline
from .lora_file import LoraFile, LoraFileError, LoraModule
from .lora_read import check_compatible
from .models import BASE_MODEL_VERSION, MODELSPEC_ARCHITECTURE, BaseModel
from .safetensors_io import save_tensors


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
    save_tensors(state, path, metadata=single_file_metadata(base, title))


# --- LoRA tools: resize, merge (inspect is lora_inspect.py, which needs no torch) -----------------------------


@dataclass
class ResizeReport:
    """Frobenius norms of what each module lost, and in total (sqrt of the sum of squares)."""

    per_module: dict[str, dict[str, float]]
    total_error: float
    total_norm: float

    @property
    def relative_error(self) -> float:
        return self.total_error / self.total_norm if self.total_norm else 0.0

    def as_dict(self) -> dict:
        return {
            "per_module": self.per_module,
            "total_error": self.total_error,
            "total_norm": self.total_norm,
            "relative_error": self.relative_error,
        }


def resize_lora(lora: LoraFile, rank: int | None = None, energy: float | None = None) -> tuple[LoraFile, ResizeReport]:
    """Truncated SVD of each module's delta: to `rank`, or to the fewest singular values whose squared sum
    keeps `energy` (0-1] of the total. Each module keeps its scale (alpha / rank), as kohya's resize does."""
    if (rank is None) == (energy is None):
        raise LoraFileError("Give either a target rank or a kept-energy ratio, not both and not neither.")
    if rank is not None and rank < 1:
        raise LoraFileError(f"The target rank must be at least 1, not {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise LoraFileError(f"The kept-energy ratio must lie in (0, 1], not {energy}.")
    modules, rows = {}, {}
    error_sq = norm_sq = 0.0
    for name, module in lora.modules.items():
        resized, error, norm = _resize_module(module, rank, energy)
        modules[name] = resized
        rows[name] = {"rank": resized.rank, "from_rank": module.rank, "error": error, "norm": norm}
        error_sq += error**2
        norm_sq += norm**2
    metadata = dict(lora.metadata)
    ranks = {m.rank for m in modules.values()}
    if len(ranks) == 1:
        metadata["ss_network_dim"] = str(ranks.pop())
        alphas = {m.alpha for m in modules.values()}
        if len(alphas) == 1:
            metadata["ss_network_alpha"] = str(float(alphas.pop()))  # kohya: "16.0"
    else:
        metadata["ss_network_dim"] = "Dynamic"
        metadata["ss_network_alpha"] = "Dynamic"
    resized = LoraFile(modules, metadata, lora.format, lora.family, None, list(lora.notes))
    return resized, ResizeReport(rows, math.sqrt(error_sq), math.sqrt(norm_sq))


def _resize_module(module: LoraModule, rank: int | None, energy: float | None):
    delta = module.delta().flatten(1).double()  # [out, in * kh * kw]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if rank is not None:
        keep = rank
    else:
        cumulative = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-30)
        keep = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1
    keep = min(keep, module.rank, s.numel())  # resizing never adds rank: the delta has at most module.rank
    scale = module.scale
    root = s[:keep].sqrt()
    up = (u[:, :keep] * root) / math.sqrt(scale)
    down = (root[:, None] * vh[:keep]) / math.sqrt(scale)
    error = float(torch.linalg.norm(delta - (u[:, :keep] * s[:keep]) @ vh[:keep]))
    down_shape = (keep, *module.down.shape[1:])
    up_shape = (module.up.shape[0], keep, *module.up.shape[2:])
    resized = LoraModule(  # fp32: the writers cast to the chosen save precision
        down=down.reshape(down_shape).float(),
        up=up.reshape(up_shape).float(),
        alpha=scale * keep,  # same alpha/rank as before
        dora_scale=module.dora_scale,
    )
    return resized, error, float(torch.linalg.norm(delta))


def merge_lora(
    base: BaseModel, lora: LoraFile, strength: float, path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Bake `lora` at `strength` into `base` and write a single-file checkpoint (original layout).

    The fusing is diffusers' own (`load_lora_weights` + `fuse_lora`), the same code that previews it, so
    the merged model renders what the preview showed.
    """
    check_compatible(lora, base)
    pipeline = base.pipeline
    load_into_pipeline(pipeline, lora, "merge")
    pipeline.fuse_lora(lora_scale=strength, adapter_names=["merge"])
    pipeline.unload_lora_weights()
    path = Path(path)
    save_single_file(base, path, dtype)
    return path
