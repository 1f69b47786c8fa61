"""LoRA files: write the kohya format every consumer loads, or diffusers' own; read any common format.

The kohya layout (INTEROP.md) is the only one A1111/Forge, ComfyUI and diffusers all load completely:
`<prefix>_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
(+ `.dora_scale` for DoRA), with
- `lora_unet_` + the diffusers module path for SD1/SD2 UNets, + the SGM block names for SDXL;
- `lora_te_text_model_…` for the SD1/SD2 text encoder, `lora_te1_…`/`lora_te2_…` for SDXL's two,
  always with `text_model` even though transformers 5's CLIPTextModel has no such level;
- every value of the safetensors header a string, and nothing but LoRA tensors in the tensor dict.

This module writes. A LoRA in memory is `lora_file.LoraFile`; reading any format is `lora_read.py`; the
metadata and hashes are `lora_metadata.py`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from .fsutil import atomic_path, write_bytes_atomic
from .lora import ADAPTER_NAME
from .lora_file import (
    ALPHA,
    DIFFUSERS_METADATA_KEY,
    UP,
    LoraFile,
    LoraFileError,
    _cpu,
)
from .lora_metadata import model_hashes
from .lora_read import fitted_to


def save_kohya(lora: LoraFile, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write `lora` in the kohya format with its metadata and hashes; atomic (temp file, fsync, rename)."""
    path = Path(path)
    tensors = lora.state_dict(dtype)
    check_tensors(tensors, path)
    metadata = {str(k): str(v) for k, v in lora.metadata.items() if k != DIFFUSERS_METADATA_KEY}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
    write_bytes_atomic(path, serialize(tensors, metadata=metadata))
    return path


def published_text_encoder_key(key: str) -> str:
    """A text-encoder adapter key in the layout diffusers files have always had (`text_model.encoder.layers…`):
    transformers 5's CLIPTextModel is flat (`encoder.layers…`), but ComfyUI's key map and diffusers before it expect
    the `text_model.` level (INTEROP.md). Reading takes both (`lora_file.kohya_name`)."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def save_diffusers(
    parts: dict[str, torch.nn.Module],
    pipeline_class,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
    adapter_name: str = ADAPTER_NAME,
) -> Path:
    """diffusers' own format (`unet.…lora_A.weight`), with the peft adapter configs in the header so that
    `load_lora_weights` applies alpha != rank at the right scale."""
    from peft import get_peft_model_state_dict

    path = Path(path)
    layers, adapter_metadata = {}, {}
    for part, model in parts.items():
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        if part.startswith("text_encoder"):
            state = {published_text_encoder_key(k): v for k, v in state.items()}
        layers[f"{part}_lora_layers"] = {k: _cpu(v, dtype) for k, v in state.items()}
        adapter_metadata[f"{part}_lora_adapter_metadata"] = model.peft_config[adapter_name].to_dict()
    check_tensors({f"{p}.{k}": v for p, sd in layers.items() for k, v in sd.items()}, path)
    with atomic_path(path) as tmp:
        staging = tmp.with_suffix(".dir")
        try:
            pipeline_class.save_lora_weights(
                staging, weight_name=path.name, safe_serialization=True, **layers, **adapter_metadata
            )
            written = staging / path.name
            if metadata:  # add our ss_*/modelspec keys beside diffusers' own
                with safe_open(str(written), "pt") as f:
                    header = dict(f.metadata() or {})
                    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
                header |= {k: str(v) for k, v in metadata.items()}
                tmp.write_bytes(serialize(tensors, metadata=header))
            else:
                tmp.write_bytes(written.read_bytes())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def load_into_pipeline(pipeline, lora: LoraFile, adapter_name: str) -> None:
    """diffusers' `load_lora_weights` of a LoRA already checked against the base (`check_compatible`).

    transformers 5.x's `load_adapter` counts every text-encoder weight whose name contains the adapter
    name, or "lora", as an adapter weight. So a short name ("d" is in "encoder") or any second adapter
    makes it log a report listing base weights or the first adapter's weights as MISSING and "newly
    initialized". Nothing is changed (tested: the base and earlier adapters keep equal tensors), so
    that one logger is quieted for this call rather than alarm people on every preview.
    """
    import logging

    report = logging.getLogger("transformers.integrations.peft")  # where load_adapter logs its report
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        pipeline.load_lora_weights(with_one_alpha(lora.state_dict(torch.float32)), adapter_name=adapter_name)
    finally:
        report.setLevel(level)


def with_one_alpha(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya tensors with every module's alpha folded into its lora_up and written as 1, so one alpha serves all.

    diffusers (0.42) gives a module whose alpha differs from the file's most common one its own alpha through an
    `alpha_pattern` whose keys, for attention layers, name no module (`…attn1.processor.to_k_lora.down.weight`):
    peft ignores them and those layers get the common alpha. Files whose alphas differ per module (block_alphas,
    conv_alpha, a baked stack, a LoHa/LoKr's plain equivalent) would preview at wrong scales. The change
    alpha / rank * up @ down is the same with up' = alpha * up and alpha' = 1."""
    out = dict(tensors)
    for key, alpha in tensors.items():
        if key.endswith(ALPHA) and key.removesuffix(ALPHA) + UP in tensors:
            up = key.removesuffix(ALPHA) + UP
            out[up] = tensors[up] * alpha.float()
            out[key] = torch.ones_like(alpha)
    return out


def convert_to_diffusers(lora: LoraFile, base, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Rewrite any LoRA in diffusers' own format: diffusers loads it into `base` (which fixes the module
    paths and per-module alphas) and saves it back with its adapter configs and our metadata."""
    fitted = fitted_to(lora, base)
    pipeline = base.pipeline
    load_into_pipeline(pipeline, fitted, "convert")
    try:
        parts = {n: m for n, m in base.lora_parts().items() if "convert" in getattr(m, "peft_config", {})}
        metadata = {k: v for k, v in lora.metadata.items() if not k.startswith("sshs_")}
        return save_diffusers(parts, type(pipeline), path, dtype, metadata, adapter_name="convert")
    finally:
        pipeline.delete_adapters(["convert"])


def check_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse to write NaN/inf weights: a file that loads but renders black is worse than no file."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise LoraFileError(
            f"Not writing {path}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); the training diverged, "
            "so lower the learning rate or use an earlier checkpoint."
        )
