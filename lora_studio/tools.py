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
from .lora_read import fitted_to
from .models import BASE_MODEL_VERSION, MODELSPEC_ARCHITECTURE, TEXT_ENCODER_NAMES, BaseModel
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


def check_svd_target(rank: int | None, energy: float | None) -> None:
    """An SVD keeps either `rank` singular values or the fewest holding `energy` (0-1] of their squares."""
    if (rank is None) == (energy is None):
        raise LoraFileError("Give either a target rank or a kept-energy ratio, not both and not neither.")
    if rank is not None and rank < 1:
        raise LoraFileError(f"The target rank must be at least 1, not {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise LoraFileError(f"The kept-energy ratio must lie in (0, 1], not {energy}.")


def resize_lora(lora: LoraFile, rank: int | None = None, energy: float | None = None) -> tuple[LoraFile, ResizeReport]:
    """Truncated SVD of each module's delta: to `rank`, or to the fewest singular values whose squared sum
    keeps `energy` (0-1] of the total. Each module keeps its scale (alpha / rank), as kohya's resize does."""
    check_svd_target(rank, energy)
    lora = lora.as_plain_lora()  # LoHa/LoKr: their exact LoRA equivalent, which the SVD then truncates
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
    pipeline = base.pipeline
    load_into_pipeline(pipeline, fitted_to(lora, base), "merge")
    pipeline.fuse_lora(lora_scale=strength, adapter_names=["merge"])
    pipeline.unload_lora_weights()
    path = Path(path)
    save_single_file(base, path, dtype)
    return path


# --- bake a stack: several LoRAs at their strengths as one file --------------------------------------------------

BASE_KEYS = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_clip_skip", "ss_resolution",
             "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
             "modelspec.prediction_type", "modelspec.resolution", "modelspec.encoder_layer")  # fmt: skip


@dataclass
class BakeReport:
    """What a bake made: the stack it came from, its rank, and (after an SVD) what the truncation lost."""

    stack: list[tuple[str, float]]  # (file or name, strength)
    modules: int
    rank: int  # the largest module rank of the result
    resize: ResizeReport | None = None

    def sentence(self) -> str:
        parts = " + ".join(f"{Path(name).name} x {strength:g}" for name, strength in self.stack)
        exact = ("exact (ranks concatenated)" if self.resize is None else
                 f"SVD to rank {self.rank}, Frobenius error {self.resize.total_error:.4g} "
                 f"({100 * self.resize.relative_error:.2f}% of the stack's)")  # fmt: skip
        return f"Baked {parts}: {self.modules} modules, rank up to {self.rank}, {exact}."


def bake_stack(
    stack: list[tuple[LoraFile, float]], rank: int | None = None, energy: float | None = None
) -> tuple[LoraFile, BakeReport]:
    """LoRAs at their strengths as one LoRA whose delta is exactly the stack's sum: each module's downs stacked and
    its ups scaled by strength x alpha/rank and set side by side (alpha = the new rank, so the scale is 1). With a
    `rank` or an `energy`, an SVD then truncates it (`resize_lora`) and the report gives the error."""
    if not stack:
        raise LoraFileError("Choose at least one LoRA to bake.")
    families = {lora.family for lora, _ in stack} - {None}
    if len(families) > 1:
        raise LoraFileError(f"The stack mixes model families ({', '.join(sorted(families))}); bake LoRAs of one.")
    grouped: dict[str, list[tuple[LoraModule, float, str]]] = {}
    for lora, strength in stack:
        label = lora.path.name if lora.path else "a LoRA"
        for name, module in lora.as_plain_lora().modules.items():
            if module.dora_scale is not None:
                raise LoraFileError(f"{label}: module {name} is DoRA, whose change is not a plain sum, so a stack "
                                    "with it cannot be baked exactly; bake plain LoRAs (or LoCon) only.")  # fmt: skip
            grouped.setdefault(name, []).append((module, float(strength), label))
    modules = {name: _concatenated(name, parts) for name, parts in grouped.items()}
    first = stack[0][0]
    described = " + ".join(f"{(lora.path.stem if lora.path else 'lora')} x {s:g}" for lora, s in stack)
    metadata = {k: first.metadata[k] for k in BASE_KEYS if k in first.metadata}
    ranks = {m.rank for m in modules.values()}
    metadata |= {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_training_comment": f"baked by LoRA Studio from {described}",
        "modelspec.title": "baked stack",
        "modelspec.description": f"{described}, baked into one LoRA",
    }
    metadata["ss_network_alpha"] = metadata["ss_network_dim"] if metadata["ss_network_dim"] != "Dynamic" else "Dynamic"
    triggers = [lora.metadata.get("modelspec.trigger_phrase", "") for lora, _ in stack]
    if any(triggers):
        metadata["modelspec.trigger_phrase"] = ", ".join(t for t in triggers if t)
    baked = LoraFile(modules, metadata, "kohya", next(iter(families), None))
    sources = [(str(lora.path) if lora.path else "lora", float(s)) for lora, s in stack]
    if rank is None and energy is None:
        return baked, BakeReport(sources, len(modules), max(m.rank for m in modules.values()))
    resized, report = resize_lora(baked, rank, energy)
    return resized, BakeReport(sources, len(modules), max(m.rank for m in resized.modules.values()), report)


def _concatenated(name: str, parts: list[tuple[LoraModule, float, str]]) -> LoraModule:
    shapes = {(tuple(m.down.shape[1:]), m.up.shape[0]) for m, _, _ in parts}
    if len(shapes) > 1:
        labels = ", ".join(label for _, _, label in parts)
        raise LoraFileError(f"Module {name} has different layer shapes in {labels}; they were trained for different "
                            "base models, so they cannot be baked together.")  # fmt: skip
    down = torch.cat([m.down.float() for m, _, _ in parts], dim=0)
    up = torch.cat([m.up.float() * (strength * m.scale) for m, strength, _ in parts], dim=1)
    return LoraModule(down=down, up=up, alpha=float(down.shape[0]))  # alpha = rank: the scale is in the ups


# --- extract: a LoRA from a fine-tuned checkpoint's difference to its base -------------------------------------


def extract_lora(
    base: BaseModel, tuned: BaseModel, rank: int | None = None, energy: float | None = None,
    targets: str = "attn-ff", text_encoders: bool = True, min_difference: float = 1e-6,
) -> tuple[LoraFile, ResizeReport]:  # fmt: skip
    """What kohya's `extract_lora_from_models` does: per adapted layer (the `targets` preset's, and the text
    encoders' unless off), the SVD of tuned - base kept to `rank` or to `energy` (0-1] of its squared singular
    values; alpha = rank, so the file applies the kept part at strength 1. Layers whose largest change is below
    `min_difference` are left out (kohya: an untrained text encoder). The report holds each layer's error."""
    from .lora import TEXT_ENCODER_DEFAULT, text_encoder_target_names, unet_target_names
    from .lora_file import kohya_name

    check_svd_target(rank, energy)
    if base.family != tuned.family:
        raise LoraFileError(f"The fine-tuned model is {tuned.family} but the base is {base.family}; extract from a "
                            "fine-tune of that very base.")  # fmt: skip
    parts = {"unet": (base.unet, tuned.unet, unet_target_names(base.unet, targets))}
    if text_encoders:
        pairs = zip(base.text_encoders, tuned.text_encoders, strict=True)
        for part, (a, b) in zip(TEXT_ENCODER_NAMES, pairs, strict=False):
            parts[part] = (a, b, text_encoder_target_names(a, TEXT_ENCODER_DEFAULT))
    modules, rows = {}, {}
    error_sq = norm_sq = 0.0
    for part, (before, after, names) in parts.items():
        tuned_layers = dict(after.named_modules())
        for path, layer in before.named_modules():
            if path not in names:
                continue
            other = tuned_layers.get(path)
            if other is None or other.weight.shape != layer.weight.shape:
                raise LoraFileError(f"Layer {part}.{path} differs in shape between the two models; they are not a "
                                    "base and its fine-tune.")  # fmt: skip
            difference = other.weight.detach().double().cpu() - layer.weight.detach().double().cpu()
            if difference.abs().max() < min_difference:
                continue
            name = kohya_name(part, path, base.family, base.unet.config if base.family == "sdxl" else None)
            modules[name], error, norm = _low_rank(difference, rank, energy)
            rows[name] = {"rank": modules[name].rank, "error": error, "norm": norm}
            error_sq, norm_sq = error_sq + error**2, norm_sq + norm**2
    if not modules:
        raise LoraFileError("The two models have the same weights in every layer a LoRA adapts; nothing to extract.")
    ranks = {m.rank for m in modules.values()}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
        "ss_base_model_version": BASE_MODEL_VERSION[base.family], "ss_v2": str(base.family in ("sd2", "sd2-v")),
        "ss_sd_model_name": Path(str(base.source)).name,
        "ss_training_comment": f"extracted by LoRA Studio from {Path(str(tuned.source)).name} minus its base",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": MODELSPEC_ARCHITECTURE[base.family] + "/lora",
        "modelspec.title": f"{Path(str(tuned.source)).stem} (extracted)",
    }  # fmt: skip
    lora = LoraFile(modules, metadata, "kohya", base.family)
    return lora, ResizeReport(rows, math.sqrt(error_sq), math.sqrt(norm_sq))


def _low_rank(difference: torch.Tensor, rank: int | None, energy: float | None) -> tuple[LoraModule, float, float]:
    """One layer's difference as up @ down of the kept rank (alpha = rank: scale 1), its error and its norm."""
    flat = difference.flatten(1)  # a conv's [out, in, kh, kw] as [out, in * kh * kw], as kohya does
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    if rank is not None:
        keep = min(rank, s.numel())
    else:
        cumulative = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-30)
        keep = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1
        keep = min(keep, s.numel())
    root = s[:keep].sqrt()
    up, down = u[:, :keep] * root, root[:, None] * vh[:keep]
    error = float(torch.linalg.norm(flat - up @ down))
    down = down.reshape(keep, *difference.shape[1:])
    up = up.reshape(difference.shape[0], keep, *([1] * (difference.dim() - 2)))
    return LoraModule(down=down.float(), up=up.float(), alpha=float(keep)), error, float(torch.linalg.norm(flat))
