"""LoRA files: write the kohya format every consumer loads, or diffusers' own; read any common format.

The kohya layout (INTEROP.md) is the only one A1111/Forge, ComfyUI and diffusers all load completely:
`<prefix>_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
(+ `.dora_scale` for DoRA), with
- `lora_unet_` + the diffusers module path for SD1/SD2 UNets, + the SGM block names for SDXL;
- `lora_te_text_model_…` for the SD1/SD2 text encoder, `lora_te1_…`/`lora_te2_…` for SDXL's two,
  always with `text_model` even though transformers 5's CLIPTextModel has no such level;
- every value of the safetensors header a string, and nothing but LoRA tensors in the tensor dict.

Inside the app a LoRA is a `LoraFile`: kohya-named modules plus the header metadata, whatever format
it came from, so preview, inspect, resize and merge have one thing to work on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from . import layout
from .errors import LoraStudioError
from .fsutil import atomic_path, write_bytes_atomic
from .lora import ADAPTER_NAME
from .models import BASE_MODEL_VERSION, FAMILY_NAMES, MODELSPEC_ARCHITECTURE
from .paths import sd_config_dir
from .safetensors_io import SafetensorsFileError, read_header

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DOWN, UP, ALPHA, DORA = ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"
PART_PREFIX = {  # part (as diffusers names pipeline components) -> kohya prefix, per family
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "default": {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"},
}
SGM_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
FAMILY_BY_VERSION = {v: k for k, v in BASE_MODEL_VERSION.items()}
# Width of the text the UNet cross-attends to, and of the text encoder, per family.
CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TEXT_ENCODER_WIDTH = {768: "sd1", 1024: "sd2"}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers-native files only (INTEROP.md)


class LoraFileError(LoraStudioError):
    """A LoRA file that cannot be read, does not fit the base model, or cannot be written."""


@dataclass
class LoraModule:
    """One adapted layer: delta W = (alpha / rank) * up @ down, optionally DoRA-rescaled."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float
    dora_scale: torch.Tensor | None = None  # [out, 1] (linear) or [out, 1, 1, 1] (conv), LyCORIS' layout

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update at strength 1, shaped like the adapted layer's weight."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (self.scale * product).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoraFile:
    modules: dict[str, LoraModule]  # kohya names, without the .lora_down/... suffix
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"  # the format it was read from: kohya, onetrainer, diffusers or peft
    family: str | None = None  # sd1 / sd2 / sd2-v / sdxl, or None when nothing tells
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The kohya tensors, ready for safetensors or for diffusers' `load_lora_weights`."""
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            tensors[name + DOWN] = _cpu(module.down, dtype)
            tensors[name + UP] = _cpu(module.up, dtype)
            tensors[name + ALPHA] = torch.tensor(float(module.alpha), dtype=dtype or module.down.dtype)
            if module.dora_scale is not None:
                tensors[name + DORA] = _cpu(module.dora_scale, dtype)
        return tensors

    def parts(self) -> Counter:
        return Counter(name.split("_", 2)[1] if not name.startswith("lora_unet_") else "unet" for name in self.modules)

    def summary(self) -> dict:
        """What `inspect` prints: family, format, module counts, rank and alpha (the most common ones)."""
        ranks = Counter(m.rank for m in self.modules.values())
        alphas = Counter(m.alpha for m in self.modules.values())
        return {
            "path": str(self.path) if self.path else None,
            "family": self.family,
            "format": self.format,
            "modules": len(self.modules),
            "modules_per_part": dict(self.parts()),
            "rank": ranks.most_common(1)[0][0] if ranks else None,
            "alpha": alphas.most_common(1)[0][0] if alphas else None,
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
            "dora": any(m.dora_scale is not None for m in self.modules.values()),
            "sshs_model_hash": self.metadata.get("sshs_model_hash"),
            "sshs_legacy_hash": self.metadata.get("sshs_legacy_hash"),
            "metadata": self.metadata,
            "notes": self.notes,
        }


def _cpu(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous()


# --- names ---------------------------------------------------------------------------------------------


def kohya_name(part: str, module_path: str, family: str, unet_config=None) -> str:
    """The kohya module name of one adapted layer (INTEROP.md's prefix rules)."""
    prefix = PART_PREFIX["sdxl" if family == "sdxl" else "default"][part]
    if part == "unet":
        if family == "sdxl":  # kohya trains SDXL on the SGM UNet, and every reader expects its names
            module_path = layout.unet_key_to_ldm(module_path + ".weight", unet_config).removesuffix(".weight")
        return f"{prefix}_{module_path.replace('.', '_')}"
    # transformers 5's CLIPTextModel is flat (`encoder.layers…`); readers expect `text_model.encoder.layers…`.
    path = module_path.removeprefix("text_model.")
    return f"{prefix}_text_model_{path.replace('.', '_')}"


def module_map(base) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """kohya name -> (part, module path, module) for every Linear/Conv2d of the base's UNet and encoders."""
    found = {}
    for part, model in base.lora_parts().items():
        for path, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or ".lora_" in path:
                continue
            path = path.removesuffix(".base_layer")  # a layer that already carries a LoRA (peft wraps it)
            if part == "unet" and base.family == "sdxl":
                try:
                    name = kohya_name(part, path, base.family, base.unet.config)
                except KeyError:  # conv_in, time embedding and the like have no SGM block name we use
                    continue
            else:
                name = kohya_name(part, path, base.family)
            found[name] = (part, path, module)
    return found


# --- from trained models ----------------------------------------------------------------------------------


def lora_from_models(parts: dict[str, torch.nn.Module], family: str, unet_config=None) -> LoraFile:
    """Collect the trained adapters of each part (peft layers) as kohya-named modules."""
    from peft.tuners.lora import LoraLayer

    modules: dict[str, LoraModule] = {}
    for part, model in parts.items():
        for path, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
                continue
            down = layer.lora_A[ADAPTER_NAME].weight
            up = layer.lora_B[ADAPTER_NAME].weight
            alpha = layer.scaling[ADAPTER_NAME] * layer.r[ADAPTER_NAME]
            magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight if layer.use_dora.get(ADAPTER_NAME) else None
            dora = as_dora_scale(magnitude, down, up)
            modules[kohya_name(part, path, family, unet_config)] = LoraModule(down, up, float(alpha), dora)
    return LoraFile(modules, family=family)


def as_dora_scale(magnitude: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """peft's DoRA magnitude ([out] linear, [1, out, 1, 1] conv) in LyCORIS' `dora_scale` layout
    ([out, 1] or [out, 1, 1, 1]), which ComfyUI and A1111 broadcast against the weight."""
    return None if magnitude is None else magnitude.reshape(up.shape[0], *([1] * (down.dim() - 1)))


# --- writing -----------------------------------------------------------------------------------------------


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's `sshs_model_hash` and `sshs_legacy_hash` of the file these tensors and metadata make.

    The hash strings have fixed lengths, so the header is serialised with same-length placeholders:
    the bytes the hashes cover come out exactly as in the final file.
    """
    placeholder = metadata | {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
    data = serialize(tensors, metadata=placeholder)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_kohya(lora: LoraFile, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write `lora` in the kohya format with its metadata and hashes; atomic (temp file, fsync, rename)."""
    path = Path(path)
    tensors = lora.state_dict(dtype)
    check_tensors(tensors, path)
    metadata = {str(k): str(v) for k, v in lora.metadata.items() if k != DIFFUSERS_METADATA_KEY}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
    write_bytes_atomic(path, serialize(tensors, metadata=metadata))
    return path


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
        pipeline.load_lora_weights(lora.state_dict(torch.float32), adapter_name=adapter_name)
    finally:
        report.setLevel(level)


def convert_to_diffusers(lora: LoraFile, base, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Rewrite any LoRA in diffusers' own format: diffusers loads it into `base` (which fixes the module
    paths and per-module alphas) and saves it back with its adapter configs and our metadata."""
    check_compatible(lora, base)
    pipeline = base.pipeline
    load_into_pipeline(pipeline, lora, "convert")
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


# --- reading -----------------------------------------------------------------------------------------------


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Read a kohya, OneTrainer, diffusers or PEFT LoRA file, checked and converted to kohya names."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path} does not exist; give the path of a .safetensors LoRA file.")
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(
            f"{path} is not a .safetensors file; LoRA files in pickle formats (.ckpt/.pt/.bin) are not read, "
            "convert them to .safetensors first."
        )
    try:
        header = read_header(path)
    except SafetensorsFileError as e:
        raise LoraFileError(str(e)) from None
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in header.tensors}
    try:
        lora = parse_state_dict(tensors, header.metadata, path, adapter_config=_peft_adapter_config(path))
    except LoraStudioError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, RecursionError) as exc:  # hostile or odd
        raise LoraFileError(
            f"{path} does not hold a LoRA this app can read ({type(exc).__name__}: {str(exc)[:200]}); export it "
            "again from the tool that made it."
        ) from None
    lora.path = path
    return lora


def parse_state_dict(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    source: str | os.PathLike = "the LoRA",
    adapter_config: dict | None = None,
) -> LoraFile:
    metadata = dict(metadata or {})
    if not tensors:
        raise LoraFileError(f"{source} holds no tensors; it is not a LoRA file.")
    keys = list(tensors)
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        modules, fmt = _kohya_modules(tensors, source), "kohya"
        if any(n.startswith("lora_te1_") for n in modules) and not any(n.startswith(SGM_BLOCKS) for n in modules):
            if any(n.startswith("lora_unet_") for n in modules):
                fmt = "onetrainer"  # SDXL with diffusers block names: OneTrainer's spelling of kohya
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        modules, fmt = _peft_modules(tensors, metadata, source, adapter_config)
    else:
        raise LoraFileError(
            f"{source} is not a LoRA file: none of its {len(keys)} tensors (e.g. {keys[0]}) has LoRA names "
            "(lora_down/lora_up or lora_A/lora_B); if it is a checkpoint, load it as a base model instead."
        )
    lora = LoraFile(modules, metadata, fmt)
    if fmt == "onetrainer":
        lora.modules = _sgm_names_for_sdxl(lora.modules)
        lora.notes.append("SDXL UNet keys used diffusers block names; converted to the SGM names kohya writes.")
    check_modules(lora.modules, source)
    lora.family = detect_family(lora)
    return lora


def _kohya_modules(tensors: dict[str, torch.Tensor], source) -> dict[str, LoraModule]:
    names = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in tensors}
    modules = {}
    for name in sorted(names):
        down, up = tensors.get(name + DOWN), tensors.get(name + UP)
        if down is None or up is None:
            missing = DOWN if down is None else UP
            raise LoraFileError(f"{source}: module {name} has no {missing.strip('.')} tensor; the file is incomplete.")
        alpha = tensors.get(name + ALPHA)
        if alpha is not None and alpha.numel() != 1:
            raise LoraFileError(f"{source}: the alpha of module {name} holds {alpha.numel()} values, not one number.")
        # kohya's rule: no alpha means scale 1, i.e. alpha = rank.
        alpha_value = float(alpha.float().item()) if alpha is not None else float(down.shape[0])
        dora = tensors.get(name + DORA)
        modules[name] = LoraModule(down, up, alpha_value, dora)
    unknown = set(tensors) - {n + s for n in modules for s in (DOWN, UP, ALPHA, DORA)}
    if unknown:
        raise LoraFileError(
            f"{source} has {len(unknown)} tensor(s) this app does not know, e.g. {sorted(unknown)[0]} "
            "(LyCORIS LoHa/LoKr are not supported); export it as plain LoRA."
        )
    return modules


PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
DIFFUSERS_PARTS = ("unet", "text_encoder", "text_encoder_2")


def _peft_modules(tensors, metadata, source, adapter_config) -> tuple[dict[str, LoraModule], str]:
    """diffusers (`unet.…lora_A.weight`, configs in the header) and PEFT (`base_model.model.…`) files."""
    configs = _diffusers_adapter_configs(metadata)
    fmt = "diffusers" if any(k.split(".", 1)[0] in DIFFUSERS_PARTS for k in tensors) else "peft"
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    magnitudes: dict[tuple[str, str], torch.Tensor] = {}
    for key, tensor in tensors.items():
        part, rest = _split_part(key, fmt)
        if rest.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in rest:
            magnitudes[(part, rest.split(".lora_magnitude_vector")[0])] = tensor
            continue
        if rest.endswith(".alpha"):
            continue
        match = PEFT_KEY.match(rest)
        if not match:
            raise LoraFileError(f"{source}: tensor {key} is neither lora_A nor lora_B; the file is not a plain LoRA.")
        pairs.setdefault((part, match["path"]), {})[match["which"]] = tensor
    family = _family_from_shapes({(part, path): t.get("A") for (part, path), t in pairs.items()}, metadata)
    unet_config = _bundled_unet_config(family)
    modules = {}
    for (part, path), ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise LoraFileError(
                f"{source}: module {part}.{path} lacks its lora_A or lora_B tensor; the file is incomplete."
            )
        down, up = ab["A"], ab["B"]
        config = configs.get(part) or adapter_config
        alpha = _alpha_for(path, config, down.shape[0]) if config else float(down.shape[0])
        dora = as_dora_scale(magnitudes.get((part, path)), down, up)
        modules[kohya_name(part, path, family or "sd1", unet_config)] = LoraModule(down, up, alpha, dora)
    return modules, fmt


def _split_part(key: str, fmt: str) -> tuple[str, str]:
    if fmt == "diffusers":
        part, rest = key.split(".", 1)
        return part, rest
    rest = key.removeprefix("base_model.model.")
    return ("text_encoder" if ".layers." in rest and "encoder" in rest else "unet"), rest


def _diffusers_adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    packed = json.loads(raw)
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        part, name = key.split(".", 1)
        configs.setdefault(part, {})[name] = value
    return configs


def _peft_adapter_config(path: Path) -> dict | None:
    config = path.with_name("adapter_config.json")
    return json.loads(config.read_text()) if config.is_file() else None


def _alpha_for(path: str, config: dict, rank: int) -> float:
    """peft's per-module alpha: alpha_pattern when a pattern matches the module, else lora_alpha."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    if patterns:
        key = get_pattern_key(patterns.keys(), path)
        if key in patterns and re.match(rf"(.*\.)?({key})$", path):
            return float(patterns[key])
    return float(config.get("lora_alpha", rank))


def _bundled_unet_config(family: str | None):
    if family != "sdxl":
        return None
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.load_config(sd_config_dir("sdxl"), subfolder="unet")


def _sgm_names_for_sdxl(modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """OneTrainer-style SDXL keys (`lora_unet_down_blocks_1_…`) -> kohya's SGM names."""
    config = _bundled_unet_config("sdxl")
    paths = {kohya_name("unet", p, "sd1"): p for p in _sdxl_unet_paths(config)}
    renamed = {}
    for name, module in modules.items():
        if name.startswith("lora_unet_") and name in paths:
            name = kohya_name("unet", paths[name], "sdxl", config)
        renamed[name] = module
    return renamed


def _sdxl_unet_paths(config) -> list[str]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]


def check_modules(modules: dict[str, LoraModule], source) -> None:
    for name, m in modules.items():
        if m.down.dim() not in (2, 4) or m.up.dim() != m.down.dim():
            raise LoraFileError(
                f"{source}: module {name} has lora_down of shape {tuple(m.down.shape)} and lora_up of shape "
                f"{tuple(m.up.shape)}; they must both be 2-D (linear) or 4-D (conv). The file is damaged."
            )
        if m.up.shape[1] != m.down.shape[0]:
            raise LoraFileError(
                f"{source}: module {name} has rank {m.down.shape[0]} in lora_down but {m.up.shape[1]} in lora_up; "
                "the file is damaged or was edited, so re-export it."
            )
        for label, t in (("lora_down", m.down), ("lora_up", m.up)):
            if not torch.isfinite(t.float()).all():
                raise LoraFileError(
                    f"{source}: module {name}'s {label} holds NaN or inf values; the training that made it diverged, "
                    "so use an earlier checkpoint."
                )


# --- family --------------------------------------------------------------------------------------------------


def detect_family(lora: LoraFile) -> str | None:
    """From the metadata when it says, else from the key names and the layer widths."""
    declared = _family_from_metadata(lora.metadata)
    if declared:
        return declared
    names = lora.modules
    if any(n.startswith(("lora_te1_", "lora_te2_")) or n.startswith(SGM_BLOCKS) for n in names):
        return "sdxl"
    for name, m in names.items():
        if name.startswith("lora_unet_") and name.endswith("attn2_to_k"):
            return CROSS_ATTENTION_WIDTH.get(m.down.shape[1])
    for name, m in names.items():
        if name.startswith("lora_te_") and name.endswith("q_proj"):
            return TEXT_ENCODER_WIDTH.get(m.down.shape[1])
    return None


def _family_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version in FAMILY_BY_VERSION:
        return FAMILY_BY_VERSION[version]
    if version.startswith("sdxl"):
        return "sdxl"
    architecture = metadata.get("modelspec.architecture", "")
    for family, arch in (("sdxl", "stable-diffusion-xl"), ("sd2-v", "v2-768-v"), ("sd2", "v2"), ("sd1", "v1")):
        if arch in architecture:
            return family
    return None


def _family_from_shapes(downs: dict[tuple[str, str], torch.Tensor | None], metadata) -> str | None:
    declared = _family_from_metadata(metadata)
    if declared:
        return declared
    if any(part == "text_encoder_2" for part, _ in downs):
        return "sdxl"
    for (part, path), down in downs.items():
        if part == "unet" and path.endswith("attn2.to_k") and down is not None:
            return CROSS_ATTENTION_WIDTH.get(down.shape[1])
    return None


def same_family(a: str | None, b: str | None) -> bool:
    """SD2 512-epsilon and 768-v share the architecture, so a LoRA for one is a LoRA for the other."""
    group = {"sd2-v": "sd2"}
    return a is None or b is None or group.get(a, a) == group.get(b, b)


def check_compatible(lora: LoraFile, base) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """Raise a clear error when `lora` does not fit `base`; return where each of its modules goes."""
    source = lora.path or "the LoRA"
    if not same_family(lora.family, base.family):
        raise LoraFileError(
            f"{source} is a {FAMILY_NAMES[lora.family]} LoRA but the base model {base.source} is "
            f"{FAMILY_NAMES.get(base.family, base.family)}; pick a base model of the same family or another LoRA."
        )
    targets = module_map(base)
    missing = [n for n in lora.modules if n not in targets]
    if missing:
        raise LoraFileError(
            f"{source}: {len(missing)} of its {len(lora.modules)} modules have no matching layer in {base.source} "
            f"(e.g. {missing[0]}); the LoRA was trained for a different model, so pick its base model."
        )
    for name, m in lora.modules.items():
        weight = targets[name][2].weight
        expected = (weight.shape[0], weight.shape[1], *weight.shape[2:])
        got = (m.up.shape[0], m.down.shape[1], *(m.down.shape[2:] if m.down.dim() == 4 else weight.shape[2:]))
        if got != expected:
            raise LoraFileError(
                f"{source}: module {name} changes a weight of shape {expected} by one of shape {got}; the LoRA was "
                "trained for a different model of this family, so pick its base model."
            )
    return targets


# --- metadata ------------------------------------------------------------------------------------------------

SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


@dataclass
class TrainingFacts:
    """What a run knows beyond its config, for the `ss_*` keys A1111's and kohya's tools show."""

    family: str
    base_source: str
    resolution: int
    num_images: int
    steps: int
    epochs: int
    tag_frequency: dict[str, dict[str, int]]
    dataset_dirs: dict[str, dict[str, int]]  # folder -> {"n_repeats": r, "img_count": n}
    buckets: list[dict]  # {"resolution": [w, h], "count": n}
    started_at: float
    finished_at: float
    prediction_type: str = "epsilon"


def training_metadata(config, facts: TrainingFacts) -> dict[str, str]:
    """kohya's `ss_*` keys and the ModelSpec keys; every value a string (the safetensors header rule)."""
    from datetime import datetime, timezone

    lora, opt = config.lora, config.optimizer
    network_args = {"conv_dim": lora.conv_rank, "conv_alpha": lora.conv_alpha} if lora.conv_rank else {}
    if lora.use_dora:
        network_args["use_dora"] = True
    if lora.dropout:
        network_args["dropout"] = lora.dropout
    sdxl = facts.family == "sdxl"
    metadata = {
        "ss_output_name": config.name,
        "ss_base_model_version": BASE_MODEL_VERSION.get(facts.family, "sd_v1"),
        "ss_v2": str(facts.family in ("sd2", "sd2-v")),
        "ss_sd_model_name": Path(facts.base_source).name or facts.base_source,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": f"{lora.alpha:g}",
        "ss_network_args": json.dumps({k: str(v) for k, v in network_args.items()}),
        "ss_resolution": f"({facts.resolution}, {facts.resolution})",
        "ss_clip_skip": str(config.clip_skip),
        "ss_num_train_images": str(facts.num_images),
        "ss_num_epochs": str(facts.epochs),
        "ss_steps": str(facts.steps),
        "ss_learning_rate": f"{opt.learning_rate:g}",
        "ss_unet_lr": f"{opt.unet_lr or opt.learning_rate:g}",
        "ss_text_encoder_lr": f"{opt.text_encoder_lr or opt.learning_rate:g}" if lora.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not lora.train_text_encoder),
        "ss_optimizer": opt.optimizer,
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_lr_warmup_steps": str(opt.lr_warmup_steps),
        "ss_min_snr_gamma": str(opt.min_snr_gamma),
        "ss_noise_offset": str(opt.noise_offset),
        "ss_seed": str(config.seed),
        "ss_mixed_precision": config.mixed_precision,
        "ss_training_started_at": f"{facts.started_at:.3f}",
        "ss_training_finished_at": f"{facts.finished_at:.3f}",
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_bucket_info": json.dumps({"buckets": facts.buckets}),
        "ss_caption_dropout_rate": str(config.dataset.caption_dropout_rate),
        "ss_shuffle_caption": str(config.dataset.shuffle_caption),
        "ss_keep_tokens": str(config.dataset.keep_tokens),
        "ss_flip_aug": str(config.dataset.flip_aug),
        "ss_training_comment": "trained with LoRA Studio",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE.get(facts.family, MODELSPEC_ARCHITECTURE["sd1"]) + "/lora",
        "modelspec.implementation": SGM_IMPLEMENTATION if sdxl else "diffusers",
        "modelspec.title": config.name,
        "modelspec.resolution": f"{facts.resolution}x{facts.resolution}",
        "modelspec.date": datetime.fromtimestamp(facts.finished_at, timezone.utc).isoformat(timespec="seconds"),
        "modelspec.trigger_phrase": config.dataset.trigger_word,
        "modelspec.prediction_type": "v" if facts.prediction_type == "v_prediction" else "epsilon",
        "modelspec.encoder_layer": str(config.clip_skip),
        "modelspec.description": f"LoRA for {facts.base_source}, {facts.steps} steps",
    }
    return metadata
