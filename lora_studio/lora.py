"""Where LoRA goes: target selection by preset, injection with peft, and the trainable parameters.

UNet presets (`LoraConfig.unet_targets`):
- `attn`: `to_q`/`to_k`/`to_v`/`to_out.0` of every attn1 and attn2 (the diffusers examples' set);
- `attn-ff`: kohya's default set, every Linear / 1x1 conv inside the transformer blocks: adds
  `proj_in`, `proj_out`, `ff.net.0.proj` and `ff.net.2` (192 modules on SD1.5, 722 on SDXL);
- `full`: adds LoCon on the 3x3 convs of the resnets and the down/upsamplers, at `conv_rank`.
Text encoders: `q/k/v/out_proj` and `fc1`/`fc2` of every layer (72 modules on SD1.5, 264 on SDXL).
`lora.network` = loha / lokr puts peft's LoHa / LoKr on the same layers (written in LyCORIS' format: lycoris.py).
kohya's rank and module dropout: peft's own for LoHa / LoKr (LyCORIS' semantics), forward hooks on peft's LoRA layers
for LoRA (`add_rank_and_module_dropout`, kohya's networks/lora.py semantics).

Scale is kohya's: alpha / rank. LoRA weights are kept in fp32 while the frozen model stays in its
working dtype, so small updates are not rounded away in bf16/fp16.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model

from . import layout
from .conditioning import unread_layers
from .config import LoraConfig
from .errors import LoraStudioError
from .models import TEXT_ENCODER_NAMES

ADAPTER_NAME = "default"
ADAPTER_MARKERS = ("lora_", "hada_", "lokr_")  # peft's parameter prefixes for LoRA/DoRA, LoHa and LoKr
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


BLOCK_PATH = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


SGM_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")
SDXL_BLOCK_START = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}


def block_index(path: str, blocks: int, unet_config=None) -> int | None:
    """The UNet block a layer (diffusers path) lies in: of 3 (down, mid, up), or of kohya's 25 SD 1.x/2.x blocks
    (`networks/lora.py` get_block_index: IN00 = conv_in, IN01-IN11, MID = 12, OUT00-OUT11 = 13-24), or of its 23
    SDXL blocks, counted on the SGM UNet's names (0 = time/label embedding, input_blocks 0-8 = 1-9, middle_block
    parts 0-2 = 10-12, output_blocks 0-8 = 13-21, 22 = out; `unet_config` gives those names). None: outside the
    blocks (conv_in, the time embedding)."""
    if blocks == 23:
        try:
            match = SGM_BLOCK.match(layout.unet_key_to_ldm(f"{path}.weight", unet_config))
        except KeyError:  # no SGM name (conv_in and the like)
            return None
        return SDXL_BLOCK_START[match[1]] + int(match[2]) if match else None
    if path.startswith("mid_block."):
        return 1 if blocks == 3 else 12
    match = BLOCK_PATH.match(path)
    if match is None:
        return None
    if blocks == 3:
        return 0 if match[1] == "down" else 2
    i, j = int(match[2]), int(match[4])
    index = 3 * i + (2 if match[3].endswith("samplers") else j)
    return 1 + index if match[1] == "down" else 13 + index


def block_settings(
    settings: LoraConfig, names: list[str], unet_config=None
) -> tuple[list[str], dict[str, int], dict[str, float]]:
    """The UNet layers left after `block_lr_weights` and `block_ranks` (a block at 0 is left out), and peft's
    per-layer rank and alpha patterns for the blocks whose values differ from the defaults. Convs keep conv_rank, as
    kohya's block_dims leave them, unless `conv_block_ranks` (kohya's conv_block_dims) gives their blocks' own."""
    if settings.block_lr_weights:  # a block at learning rate 0 is left out, as kohya leaves it out
        names = [n for n in names if block_lr_weight(n, settings.block_lr_weights, unet_config) != 0]
    if not settings.block_ranks and not settings.conv_block_ranks:
        return names, {}, {}
    kept, ranks, alphas = [], {}, {}
    for name in names:
        if LOCON.match(name):
            if not _conv_block_setting(settings, name, unet_config, kept, ranks, alphas):
                kept.append(name)
            continue
        index = block_index(name, len(settings.block_ranks), unet_config) if settings.block_ranks else None
        if index is None:
            kept.append(name)
            continue
        rank = settings.block_ranks[index]
        if rank == 0:
            continue
        kept.append(name)
        alpha = settings.block_alphas[index] if settings.block_alphas else settings.alpha
        if rank != settings.rank or alpha != settings.alpha:
            ranks[re.escape(name)], alphas[re.escape(name)] = rank, alpha  # peft matches keys as regexes
    return kept, ranks, alphas


def _conv_block_setting(settings: LoraConfig, name: str, unet_config, kept: list, ranks: dict, alphas: dict) -> bool:
    """A 3x3 conv under `conv_block_ranks` (kohya's conv_block_dims): kept at its block's rank and alpha, or left out
    at rank 0. False when no conv block setting covers it (it keeps conv_rank)."""
    if not settings.conv_block_ranks:
        return False
    index = block_index(name, len(settings.conv_block_ranks), unet_config)
    if index is None:
        return False
    rank = settings.conv_block_ranks[index]
    if rank:
        kept.append(name)
        ranks[re.escape(name)] = rank
        alphas[re.escape(name)] = (settings.conv_block_alphas[index] if settings.conv_block_alphas
                                   else settings.conv_alpha or settings.alpha)  # fmt: skip
    return True


def block_lr_weight(path: str, weights: list[float], unet_config=None) -> float:
    """The learning-rate multiplier of the UNet layer at `path` (diffusers' name) under `lora.block_lr_weights`; 1
    outside the blocks (conv_in, the time embedding) and when no weights are given."""
    if not weights:
        return 1.0
    index = block_index(path, len(weights), unet_config)
    return 1.0 if index is None else weights[index]


def chosen_by_patterns(part: str, names: list[str], settings: LoraConfig, family: str, unet_config=None) -> list[str]:
    """The layers `include_modules` / `exclude_modules` keep, matched against their kohya names (as in the file)."""
    from .lora_file import kohya_name

    if not settings.include_modules and not settings.exclude_modules:
        return names
    include = re.compile(settings.include_modules) if settings.include_modules else None
    exclude = re.compile(settings.exclude_modules) if settings.exclude_modules else None
    kept = []
    for name in names:
        kohya = kohya_name(part, name, family, unet_config)
        if (include is None or include.search(kohya)) and (exclude is None or not exclude.search(kohya)):
            kept.append(name)
    return kept


def peft_config(
    settings: LoraConfig, target_names: list[str], with_convs: bool = False, ranks: dict | None = None,
    alphas: dict | None = None,
):  # fmt: skip
    """peft's config for one model part (LoRA, LoHa or LoKr, as `lora.network` says); LoCon convs get their own
    rank and alpha through peft's patterns, and per-block ranks (`block_settings`) theirs."""
    # peft takes the first pattern that matches a layer: the per-layer (block) entries go before the convs' pattern.
    locon = {LOCON.pattern: settings.conv_rank} if with_convs and settings.conv_rank else {}
    conv_alpha = {LOCON.pattern: settings.conv_alpha or settings.alpha} if locon else {}
    alphas = {**(alphas or {}), **conv_alpha}
    patterns = {**(ranks or {}), **locon}
    if settings.network != "lora":
        return lycoris_config(settings, target_names, patterns, alphas)
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


def lycoris_config(settings: LoraConfig, target_names: list[str], ranks: dict, alphas: dict):
    """peft's LoHa or LoKr config. Convs keep LyCORIS' flat factors ([r, in·kh·kw]: use_effective_conv2d off, its
    Tucker form being optional there too); LoKr decomposes only its larger factor, as LyCORIS does by default."""
    from peft import LoHaConfig, LoKrConfig

    common = dict(r=settings.rank, alpha=settings.alpha, target_modules=target_names, rank_pattern=ranks,
                  alpha_pattern=alphas, use_effective_conv2d=False, init_weights=True,
                  rank_dropout=settings.rank_dropout, module_dropout=settings.module_dropout)  # fmt: skip
    if settings.network == "loha":
        return LoHaConfig(**common)
    return LoKrConfig(**common, decompose_both=False, decompose_factor=settings.lokr_factor)


def inject_lora(base, settings: LoraConfig, clip_skip: int = 1) -> dict[str, list[str]]:
    """Add LoRA adapters to the UNet and (if trained) the text encoders. Returns the adapted names per part.

    Injection goes through peft's own `inject_adapter_in_model` for every part: transformers 5's
    `add_adapter` would demand peft >= 0.22, and one path for all parts keeps them consistent.
    """
    injected: dict[str, list[str]] = {}
    unet_config = base.unet.config if base.family == "sdxl" else None
    check_block_layout("block_ranks", len(settings.block_ranks), base.family)
    check_block_layout("block_lr_weights", len(settings.block_lr_weights), base.family)
    check_block_layout("conv_block_ranks", len(settings.conv_block_ranks), base.family)
    unet_names = chosen_by_patterns("unet", unet_target_names(base.unet, settings.unet_targets), settings,
                                    base.family, unet_config)  # fmt: skip
    unet_names, ranks, alphas = block_settings(settings, unet_names, unet_config)
    if not unet_names:
        raise LoraStudioError("No UNet layer is left to adapt: lora.include_modules, exclude_modules or block_ranks "
                              "leave out every one; loosen them.")  # fmt: skip
    _inject(base.unet, peft_config(settings, unet_names, with_convs=True, ranks=ranks, alphas=alphas), settings)
    injected["unet"] = unet_names
    if settings.train_text_encoder:
        sdxl, count = base.family == "sdxl", len(base.text_encoders)
        for index, encoder in enumerate(base.text_encoders):
            layers = encoder.config.num_hidden_layers
            unread = unread_layers(layers, clip_skip, sdxl, pooled=sdxl and index == count - 1)
            part = TEXT_ENCODER_NAMES[index]
            names = text_encoder_target_names(encoder, settings.text_encoder_targets, unread)
            names = chosen_by_patterns(part, names, settings, base.family)
            if not names:  # every layer unread (a tiny encoder with a large clip skip): nothing there would learn
                continue
            _inject(encoder, peft_config(settings, names), settings)
            injected[part] = names
    return injected


def check_block_layout(setting: str, count: int, family: str) -> None:
    """kohya's 25 blocks are SD 1.x/2.x's, its 23 SDXL's; 3 (down, mid, up) fit any family."""
    if count == 25 and family == "sdxl":
        raise LoraStudioError(f"lora.{setting} has kohya's 25 SD 1.x/2.x blocks, but the base model is SDXL; give "
                              "kohya's 23 SDXL blocks or 3 values (down, mid, up) instead.")  # fmt: skip
    if count == 23 and family != "sdxl":
        raise LoraStudioError(f"lora.{setting} has kohya's 23 SDXL blocks, but the base model is not SDXL; give "
                              "kohya's 25 SD 1.x/2.x blocks or 3 values (down, mid, up) instead.")  # fmt: skip


def _inject(model: torch.nn.Module, config, settings: LoraConfig) -> None:
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_(any(marker in name for marker in ADAPTER_MARKERS))
    cast_training_params(model, dtype=torch.float32)  # trainable (LoRA) weights only; the rest stays as loaded
    if settings.network == "lora":
        add_rank_and_module_dropout(model, settings.rank_dropout, settings.module_dropout)


def add_rank_and_module_dropout(model: torch.nn.Module, rank_dropout: float, module_dropout: float) -> None:
    """kohya's rank and module dropout (networks/lora.py) on each peft LoRA layer of `model`, acting in training
    mode only: the down projection's output keeps each rank with chance 1 - rank_dropout, per image, scaled by
    1 / (1 - rank_dropout) (kohya: "as if the rank changed"); the whole update is left out with chance
    module_dropout, per layer and step. Draws come from torch's generators, which a resume restores and gradient
    checkpointing replays."""
    from peft.tuners.lora import LoraLayer

    if not rank_dropout and not module_dropout:
        return
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A:
            if rank_dropout:
                layer.lora_A[ADAPTER_NAME].register_forward_hook(functools.partial(_drop_ranks, rank_dropout))
            if module_dropout:
                layer.lora_B[ADAPTER_NAME].register_forward_hook(functools.partial(_drop_module, module_dropout))


def _drop_ranks(chance: float, module: torch.nn.Module, _inputs, down: torch.Tensor) -> torch.Tensor | None:
    if not module.training:
        return None
    rank_axis = 1 if down.dim() == 4 else down.dim() - 1  # a conv's (B, r, H, W); a linear's (..., r)
    shape = [1] * down.dim()
    shape[0], shape[rank_axis] = down.shape[0], down.shape[rank_axis]
    kept = torch.rand(shape, device=down.device) > chance
    return down * kept.to(down.dtype) / (1.0 - chance)


def _drop_module(chance: float, module: torch.nn.Module, _inputs, update: torch.Tensor) -> torch.Tensor | None:
    if not module.training:
        return None
    kept = torch.rand(()) >= chance  # on the CPU, as kohya draws it: nothing waits for the GPU
    return update * kept.to(update.dtype)


def skip_input_casts(models: Iterable[torch.nn.Module]) -> int:
    """Let the adapters of models that run under autocast take their input in the dtype it comes in. Returns how
    many layers now do.

    peft casts each adapted layer's input to its adapter's dtype first: fp32 here (the LoRA weights stay fp32), so
    under a bf16/fp16 autocast every adapted layer copied its whole half-precision input to fp32, and autocast
    copied it back to half for the adapter's matmul: two elementwise kernels forward and two backward per layer
    (768 on SD1.5's default 192 UNet layers), for bit-identical results, since autocast rounds the widened copy
    back to the values it came from. Left on where the input meets other arithmetic first, so skipping the cast
    could round differently: DoRA (its norm terms) and LoRA dropout (drawn and scaled in the input's dtype).
    Without autocast the cast is needed (a half input into an fp32 matmul fails), so callers skip it only there."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    skipped = 0
    for model in models:
        for layer in model.modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            if isinstance(layer, LoraLayer) and (
                ADAPTER_NAME not in layer.lora_A
                or ADAPTER_NAME in layer.lora_variant
                or not isinstance(layer.lora_dropout[ADAPTER_NAME], torch.nn.Identity)
            ):
                continue
            layer.cast_input_dtype_enabled = False
            skipped += 1
    return skipped


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def lora_update(layer, adapter: str = ADAPTER_NAME) -> torch.Tensor:
    """A peft LoRA layer's weight update B x A x scaling, shaped as the layer's weight."""
    from .lora_file import low_rank_update  # lora_file imports this module (ADAPTER_NAME)

    return low_rank_update(layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, layer.scaling[adapter])


@torch.no_grad()
def cap_update_norms(models: Iterable[torch.nn.Module], max_norm: float) -> torch.Tensor:
    """kohya's max-norm regularization (`scale_weight_norms`): each LoRA layer whose update B x A x scaling has a
    Frobenius norm above `max_norm` gets A and B each multiplied by sqrt(max_norm / norm), so its update has norm
    `max_norm` (and A and B keep their balance). Returns how many layers were scaled, as a tensor: nothing here
    reads a value back (a layer under the cap is multiplied by exactly 1), so a GPU is never waited for."""
    from peft.tuners.lora import LoraLayer

    scaled = torch.zeros((), dtype=torch.int64)
    for model in models:
        for layer in model.modules():
            if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
                continue
            norm = lora_update(layer).norm()
            ratio = torch.clamp(max_norm / norm.clamp(min=max_norm / 2), max=1.0)  # kohya's guard against 0
            factor = ratio.sqrt()
            layer.lora_A[ADAPTER_NAME].weight.mul_(factor)
            layer.lora_B[ADAPTER_NAME].weight.mul_(factor)
            scaled = scaled.to(ratio.device) + (ratio < 1)
    return scaled
