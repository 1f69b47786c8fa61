"""Reading any LoRA file (kohya, OneTrainer, diffusers, PEFT) into a `LoraFile`, and checking it fits a base.

Every header goes through the shared checked reader first; anything malformed or hostile becomes one
LoraFileError sentence naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import LoraStudioError
from .lora_file import (
    ALPHA,
    DIFFUSERS_METADATA_KEY,
    DORA,
    DOWN,
    KOHYA_PREFIXES,
    UP,
    LoraFile,
    LoraFileError,
    LoraModule,
    as_dora_scale,
    kohya_name,
    module_map,
)
from .lora_inspect import (
    CROSS_ATTENTION_WIDTH,
    check_lora_path,
    check_module_shapes,
    family_from_metadata,
    family_of,
    is_onetrainer_sdxl,
    kohya_module_name,
    missing_half,
    not_finite,
    read_lora_header,
    unknown_tensors,
    vector_alpha,
)
from .lycoris import ALGOS, LycorisModule, algo_of, read_module
from .models import FAMILY_NAMES, TEXT_ENCODER_NAMES
from .paths import sd_config_dir


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Read a kohya, OneTrainer, diffusers or PEFT LoRA file, checked and converted to kohya names."""
    path = check_lora_path(path)
    header = read_lora_header(path)
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
        if is_onetrainer_sdxl(modules):
            fmt = "onetrainer"
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


def _kohya_modules(tensors: dict[str, torch.Tensor], source) -> dict[str, LoraModule | LycorisModule]:
    """kohya's LoRA/LoCon/DoRA modules and LyCORIS' LoHa/LoKr ones (same names, other suffixes: lycoris.py)."""
    modules, known = {}, set()
    grouped: dict[str, set[str]] = {}
    for key in tensors:
        name = kohya_module_name(key)
        grouped.setdefault(name, set()).add(key[len(name) + 1:])
    for name, suffixes in sorted(grouped.items()):
        algo = algo_of(suffixes)
        if algo is not None:
            modules[name] = _lycoris_module(name, algo, suffixes, tensors, source)
            known |= {f"{name}.{s}" for s in suffixes}
            continue
        down, up = tensors.get(name + DOWN), tensors.get(name + UP)
        if down is None or up is None:
            raise missing_half(source, name, DOWN if down is None else UP)
        alpha = tensors.get(name + ALPHA)
        if alpha is not None and alpha.numel() != 1:
            raise vector_alpha(source, name, alpha.numel())
        # kohya's rule: no alpha means scale 1, i.e. alpha = rank.
        alpha_value = float(alpha.float().item()) if alpha is not None else float(down.shape[0])
        mid = tensors.get(name + MID)
        if mid is not None:
            down = _with_tucker_core(name, down, mid, source)
        dora = tensors.get(name + DORA)
        modules[name] = LoraModule(down, up, alpha_value, dora)
        known |= {name + s for s in (DOWN, UP, ALPHA, DORA, MID)}
    unknown = set(tensors) - known
    if unknown:
        raise unknown_tensors(source, unknown)
    return modules


MID = ".lora_mid.weight"  # LyCORIS LoCon's Tucker core (use_tucker / use_cp): [r, r, kh, kw]


def _with_tucker_core(name: str, down: torch.Tensor, mid: torch.Tensor, source) -> torch.Tensor:
    """A LyCORIS LoCon conv with a Tucker core as a plain one: the core folded into lora_down (exactly, as ComfyUI
    applies it: down'[a, i, :, :] = sum_b mid[a, b, :, :] * down[b, i])."""
    if mid.dim() != 4 or down.dim() != 4 or mid.shape[0] != mid.shape[1] or mid.shape[1] != down.shape[0]:
        raise LoraFileError(f"{source}: module {name} has lora_mid of shape {tuple(mid.shape)} that does not fit its "
                            f"lora_down {tuple(down.shape)}; the file is damaged.")  # fmt: skip
    return torch.einsum("abkl,bi->aikl", mid.float(), down.flatten(1).float()).to(down.dtype)


def _lycoris_module(name: str, algo: str, suffixes: set[str], tensors, source) -> LycorisModule:
    if "dora_scale" in suffixes:
        raise LoraFileError(f"{source}: {algo} module {name} has a dora_scale (LyCORIS' weight decomposition), "
                            "which this app does not apply; export it without dora_wd.")  # fmt: skip
    keys = ALGOS[algo]
    unknown = suffixes - set(keys) - {"alpha"}
    if unknown:
        raise unknown_tensors(source, {f"{name}.{s}" for s in unknown})
    alpha = tensors.get(f"{name}.alpha")
    if alpha is not None and alpha.numel() != 1:
        raise vector_alpha(source, name, alpha.numel())
    factors = {s: tensors[f"{name}.{s}"] for s in suffixes if s in keys}
    return read_module(name, algo, factors, float(alpha.float().item()) if alpha is not None else None, source)


PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


DIFFUSERS_PARTS = ("unet", *TEXT_ENCODER_NAMES)


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


def check_modules(modules: dict[str, LoraModule | LycorisModule], source) -> None:
    for name, m in modules.items():
        if isinstance(m, LycorisModule):  # checked as it was read (`lycoris.read_module`)
            continue
        check_module_shapes(name, tuple(m.down.shape), tuple(m.up.shape), source)
        for label, t in (("lora_down", m.down), ("lora_up", m.up)):
            if not torch.isfinite(t.float()).all():
                raise not_finite(source, name, label)


def detect_family(lora: LoraFile) -> str | None:
    """From the metadata when it says, else from the key names and the layer widths."""
    return family_of(lora.metadata, {name: m.facts().down_shape for name, m in lora.modules.items()})


def _family_from_shapes(downs: dict[tuple[str, str], torch.Tensor | None], metadata) -> str | None:
    declared = family_from_metadata(metadata)
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
        if isinstance(m, LycorisModule):  # flat tensors: compare the output width and the input times the kernel
            expected, got = (weight.shape[0], weight[0].numel()), (m.out_features, m.flat_in)
            if m.kernel:
                expected, got = expected + tuple(weight.shape[2:]), got + m.kernel
        else:
            got = (m.up.shape[0], m.down.shape[1], *(m.down.shape[2:] if m.down.dim() == 4 else weight.shape[2:]))
        if got != expected:
            raise LoraFileError(
                f"{source}: module {name} changes a weight of shape {expected} by one of shape {got}; the LoRA was "
                "trained for a different model of this family, so pick its base model."
            )
    return targets


def fitted_to(lora: LoraFile, base) -> LoraFile:
    """`lora` checked against `base` (`check_compatible`), with any LoHa/LoKr module as its exact plain-LoRA
    equivalent at the base's layer shapes: what diffusers' `load_lora_weights` can load."""
    targets = check_compatible(lora, base)
    return lora.as_plain_lora({name: tuple(targets[name][2].weight.shape) for name in lora.modules})
