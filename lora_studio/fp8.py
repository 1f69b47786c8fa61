"""8-bit storage of frozen weights (`fp8_base`, kohya's fp8_base / fp8_base_unet): the UNet's, and those of frozen
text encoders that stay on the GPU (`TrainConfig.fp8_text_encoders`).

Each frozen Linear and Conv2d keeps its weight in float8 (e4m3, kohya's choice) and hands out a copy in the
compute dtype whenever the layer reads it: a torch parametrization does the widening, so every reader (the
layer's forward, peft's DoRA norms, a recomputed checkpointed block) sees the same wide values. The widening of
float8 to bf16/fp16/fp32 is exact, so training matches a base whose weights were rounded to float8 once. The
rounding is a plain cast, as kohya's: no per-tensor scale, so weights under 2**-10 in size (half float8's smallest
step) become 0.

Why not diffusers' `enable_layerwise_casting`: it narrows the module's parameters again after each forward, and
autograd's saved copy of that parameter then changes dtype under it; gradient checkpointing's recomputation
refuses that ("Recomputed values ... have different metadata"). A parametrization leaves the stored weight alone.

The LoRA's own layers, norms and biases keep their precision (they are small). Autograd keeps each widened
weight for the backward pass, so only with gradient checkpointing (which the config requires with fp8_base) do
the wide copies live one block at a time.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.utils import parametrize

STORAGE_DTYPE = torch.float8_e4m3fn


class Widen(nn.Module):
    """The parametrization: the stored 8-bit weight, as the compute dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def storable_on(device: torch.device | str) -> bool:
    """Whether `device` holds and widens float8 tensors (Apple's MPS has had no float8 type)."""
    try:
        torch.ones(2, device=device).to(STORAGE_DTYPE).to(torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def adapter_modules(model: nn.Module) -> set[int]:
    """The ids of every module that belongs to an adapter (peft's lora_A/lora_B, LoHa's and LoKr's own layers)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                part = getattr(module, name, None)
                if isinstance(part, nn.Module):
                    ids.update(id(inner) for inner in part.modules())
    return ids


def narrow_frozen_weights(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the frozen Linear/Conv2d weights of `model` (any adapters left out) in float8, widened to
    `compute_dtype` on every read. An adapter added later wraps the narrowed layer and, reading its weight, takes
    the compute dtype as with a wide base. Returns how many weights were narrowed."""
    adapters = adapter_modules(model)
    narrowed = 0
    for module in list(model.modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or id(module) in adapters:
            continue
        if module.weight.requires_grad or parametrize.is_parametrized(module, "weight"):
            continue
        module.weight = nn.Parameter(module.weight.detach().to(STORAGE_DTYPE), requires_grad=False)
        parametrize.register_parametrization(module, "weight", Widen(compute_dtype), unsafe=True)
        narrowed += 1
    return narrowed
