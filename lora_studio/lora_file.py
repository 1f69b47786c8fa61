"""A LoRA in memory, whatever file it came from: kohya-named modules (down, up, alpha, DoRA scale) plus the
file's metadata, so preview, inspect, resize, merge and the writers have one thing to work on; and the
kohya names of a trained model's modules (INTEROP.md).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from . import layout
from .lora import ADAPTER_NAME
from .lora_inspect import (  # noqa: F401  (the kohya key spelling, re-exported for the writers and readers)
    ALPHA,
    DORA,
    DOWN,
    KOHYA_PREFIXES,
    SGM_BLOCKS,
    UP,
    LoraFileError,
    ModuleFacts,
    part_of,
    summarise,
)
from .lycoris import LycorisModule, from_peft_layer, guessed_weight_shape

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers-native files only (INTEROP.md)
PART_PREFIX = {  # part (as diffusers names pipeline components) -> kohya prefix, per family
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "default": {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"},
}


def low_rank_update(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """scale x up @ down in fp32, shaped like the adapted layer's weight (a conv's down carries the kernel, its up is
    1x1): a file's module (LoraModule.delta) and a training layer (lora.lora_update) alike."""
    product = up.flatten(1).float() @ down.flatten(1).float()
    return (scale * product).reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraModule:
    """One adapted layer: delta W = (alpha / rank) * up @ down, optionally DoRA-rescaled."""

    algo: ClassVar[str] = "lora"  # beside LyCORIS' loha / lokr (`lycoris.LycorisModule`)

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

    def facts(self) -> ModuleFacts:
        return ModuleFacts(tuple(self.down.shape), tuple(self.up.shape), self.alpha, self.dora_scale is not None)

    def delta(self) -> torch.Tensor:
        """The weight update at strength 1, shaped like the adapted layer's weight."""
        return low_rank_update(self.up, self.down, self.scale)


@dataclass
class LoraFile:
    modules: dict[str, LoraModule | LycorisModule]  # kohya names, without the .lora_down/... suffix
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"  # the format it was read from: kohya, onetrainer, diffusers or peft
    family: str | None = None  # sd1 / sd2 / sd2-v / sdxl, or None when nothing tells
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The kohya tensors, ready for safetensors or for diffusers' `load_lora_weights`."""
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            if isinstance(module, LycorisModule):
                tensors |= module.state_dict(name, dtype)
                continue
            tensors[name + DOWN] = _cpu(module.down, dtype)
            tensors[name + UP] = _cpu(module.up, dtype)
            tensors[name + ALPHA] = torch.tensor(float(module.alpha), dtype=dtype or module.down.dtype)
            if module.dora_scale is not None:
                tensors[name + DORA] = _cpu(module.dora_scale, dtype)
        return tensors

    @property
    def network(self) -> str:
        """lora, loha or lokr: what its modules are (LoRA for a file that mixes kinds, as no trainer writes)."""
        algos = {m.algo for m in self.modules.values()}
        return algos.pop() if len(algos) == 1 else "lora"

    def has_lycoris(self) -> bool:
        return any(isinstance(m, LycorisModule) for m in self.modules.values())

    def as_plain_lora(self, shapes: dict[str, tuple[int, ...]] | None = None) -> LoraFile:
        """This LoRA with every LoHa/LoKr module replaced by its exact plain-LoRA equivalent (`LycorisModule.as_lora`),
        shaped as `shapes` (kohya name -> layer weight shape, from a base model) says, else as the names suggest."""
        if not self.has_lycoris():
            return self
        shapes = shapes or {}
        modules = {}
        for name, module in self.modules.items():
            if isinstance(module, LycorisModule):
                shape = shapes.get(name) or guessed_weight_shape(name, module, self.family)
                module = module.as_lora(shape)
            modules[name] = module
        metadata = dict(self.metadata)
        if "ss_network_module" in metadata:  # it is a plain LoRA now; the LyCORIS arguments no longer apply
            metadata["ss_network_module"] = "networks.lora"
            metadata["ss_network_args"] = json.dumps(plain_network_args(metadata.get("ss_network_args")))
        return LoraFile(modules, metadata, self.format, self.family, self.path, list(self.notes))

    def parts(self) -> Counter:
        return Counter(part_of(name) for name in self.modules)

    def summary(self) -> dict:
        """What `inspect` prints: family, format, module counts, rank and alpha (the most common ones)."""
        facts = {name: m.facts() for name, m in self.modules.items()}
        return summarise(facts, self.metadata, self.format, self.family, self.path, self.notes)


def plain_network_args(raw: str | None) -> dict:
    """A file's `ss_network_args` without LyCORIS' own (algo, factor, ...), for its plain-LoRA equivalent."""
    try:
        args = json.loads(raw or "{}")
    except ValueError:
        return {}
    return {k: v for k, v in args.items() if k not in ("algo", "factor", "preset")} if isinstance(args, dict) else {}


def _cpu(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous()


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


def lora_from_models(parts: dict[str, torch.nn.Module], family: str, unet_config=None) -> LoraFile:
    """Collect the trained adapters of each part (peft LoRA, LoHa or LoKr layers) as kohya-named modules."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    modules: dict[str, LoraModule | LycorisModule] = {}
    for part, model in parts.items():
        for path, layer in model.named_modules():
            if isinstance(layer, LycorisLayer) and ADAPTER_NAME in layer._available_adapters:
                modules[kohya_name(part, path, family, unet_config)] = from_peft_layer(layer, ADAPTER_NAME)
                continue
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
