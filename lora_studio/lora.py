"""Where LoRA goes: target selection by preset, injection with peft, and the trainable parameters.

UNet presets (`LoraConfig.unet_targets`):
- `attn`: `to_q`/`to_k`/`to_v`/`to_out.0` of every attn1 and attn2 (the diffusers examples' set);
- `attn-ff`: kohya's default set, every Linear / 1x1 conv inside the transformer blocks: adds
  `proj_in`, `proj_out`, `ff.net.0.proj` and `ff.net.2` (192 modules on SD1.5, 722 on SDXL);
- `full`: adds LoCon on the 3x3 convs of the resnets and the down/upsamplers, at `conv_rank`.
Text encoders: `q/k/v/out_proj` and `fc1`/`fc2` of every layer (72 modules on SD1.5, 264 on SDXL).

Scale is kohya's: alpha / rank. LoRA weights are kept in fp32 while the frozen model stays in its
working dtype, so small updates are not rounded away in bf16/fp16.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model

from .conditioning import unread_layers
from .config import LoraConfig

ADAPTER_NAME = "default"
ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # fmt: skip
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_DEFAULT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# Resnet and resampler convs (LoCon); conv_shortcut is 1x1 and conv_in/conv_out stay frozen, as in kohya.
LOCON = re.compile(r".*(resnets\.\d+\.conv[12]|downsamplers\.0\.conv|upsamplers\.0\.conv)$")
TRANSFORMER = re.compile(r".*attentions\.\d+$")


def unet_target_names(unet: torch.nn.Module, preset: str) -> list[str]:
    """Full module names the preset adapts, in model order."""
    names = []
    for name, _ in unet.named_modules():
        inside_transformer = ".transformer_blocks." in name
        if inside_transformer and name.endswith(ATTENTION):
            names.append(name)
        elif preset in ("attn-ff", "full") and inside_transformer and name.endswith(FEED_FORWARD):
            names.append(name)
        elif preset in ("attn-ff", "full") and name.endswith((".proj_in", ".proj_out")) and _in_transformer(name):
            names.append(name)
        elif preset == "full" and LOCON.match(name):
            names.append(name)
    return names


def _in_transformer(name: str) -> bool:
    return bool(TRANSFORMER.match(name.rsplit(".", 1)[0]))


def text_encoder_target_names(
    text_encoder: torch.nn.Module, targets: Iterable[str], unread: Iterable[int] = ()
) -> list[str]:
    """The encoder's layers to adapt: those ending in a target name, except in layers the conditioning never reads
    (`conditioning.unread_layers`: an adapter there would be saved as zeros and dead weight in every file)."""
    suffixes = tuple(f".{t}" for t in targets)
    skipped = tuple(f".layers.{index}." for index in unread)
    return [
        name for name, _ in text_encoder.named_modules()
        if ".layers." in name and name.endswith(suffixes) and not any(s in f"{name}." for s in skipped)
    ]  # fmt: skip


def peft_config(settings: LoraConfig, target_names: list[str], with_convs: bool = False) -> PeftLoraConfig:
    """peft's config for one model part; LoCon convs get their own rank and alpha through peft's patterns."""
    patterns = {LOCON.pattern: settings.conv_rank} if with_convs and settings.conv_rank else {}
    alphas = {LOCON.pattern: settings.conv_alpha or settings.alpha} if patterns else {}
    return PeftLoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_names,
        rank_pattern=patterns,
        alpha_pattern=alphas,
        use_dora=settings.use_dora,
        init_lora_weights=True if settings.init_lora_weights == "default" else "gaussian",
    )


def inject_lora(base, settings: LoraConfig, clip_skip: int = 1) -> dict[str, list[str]]:
    """Add LoRA adapters to the UNet and (if trained) the text encoders. Returns the adapted names per part.

    Injection goes through peft's own `inject_adapter_in_model` for every part: transformers 5's
    `add_adapter` would demand peft >= 0.22, and one path for all parts keeps them consistent.
    """
    injected: dict[str, list[str]] = {}
    unet_names = unet_target_names(base.unet, settings.unet_targets)
    _inject(base.unet, peft_config(settings, unet_names, with_convs=True))
    injected["unet"] = unet_names
    if settings.train_text_encoder:
        sdxl, count = base.family == "sdxl", len(base.text_encoders)
        for index, encoder in enumerate(base.text_encoders):
            layers = encoder.config.num_hidden_layers
            unread = unread_layers(layers, clip_skip, sdxl, pooled=sdxl and index == count - 1)
            names = text_encoder_target_names(encoder, settings.text_encoder_targets, unread)
            if not names:  # every layer unread (a tiny encoder with a large clip skip): nothing there would learn
                continue
            _inject(encoder, peft_config(settings, names))
            injected[f"text_encoder{'' if index == 0 else '_2'}"] = names
    return injected


def _inject(model: torch.nn.Module, config: PeftLoraConfig) -> None:
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    cast_training_params(model, dtype=torch.float32)  # trainable (LoRA) weights only; the rest stays as loaded


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
