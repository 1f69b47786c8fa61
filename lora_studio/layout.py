"""Key layouts of Stable Diffusion weights: diffusers module names <-> the original LDM/SGM names.

Single-file checkpoints (the `.safetensors` files people download) use the original CompVis/SGM
names; diffusers uses its own. diffusers ships the reader (LDM -> diffusers) but not the writer, so
the writer lives here. Each function maps a whole diffusers state dict at once and works on the
meta device too, which lets tests check the full-size key sets without allocating weights.

The same UNet block map gives the SGM block names that kohya-format SDXL LoRA keys need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def diffusers_to_ldm_mapping() -> dict:
    """diffusers' own fixed-name table, imported on first use (models.py uses this module's prefixes,
    and the app must start without waiting for diffusers)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING


# Top-level prefixes of each component inside a single-file checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # a VAE's tensors, in either key layout
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

UNET_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
OPEN_CLIP_LAYER_RENAMES = (
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.", ".attn."),
)


def unet_block_prefixes(config: Mapping) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every resnet, attention and resampler block of a UNet.

    Derived from the config rather than hard-coded for four levels, so it serves SD1/SD2 (4 levels),
    SDXL (3 levels, no attention in the first) and the tiny test models alike.
    """
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs: list[tuple[str, str]] = []

    block = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(layers):
            pairs.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{block}.0."))
            if down_attn[level]:
                pairs.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{block}.1."))
            block += 1
        if level < levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{block}.0.op."))
            block += 1

    pairs += [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]

    block = 0
    for level in range(levels):
        for j in range(layers + 1):
            pairs.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{block}.0."))
            if up_attn[level]:
                pairs.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{block}.1."))
            if j == layers and level < levels - 1:
                slot = 2 if up_attn[level] else 1
                pairs.append((f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{block}.{slot}."))
            block += 1
    return pairs


def _rename_prefix(key: str, pairs: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """(diffusers prefix, LDM prefix, rest of the name) for the first pair whose prefix starts `key`."""
    for new, old in pairs:
        if key.startswith(new):
            return new, old, key[len(new) :]
    return None


def unet_key_to_ldm(key: str, config: Mapping, pairs: list[tuple[str, str]] | None = None) -> str:
    """One diffusers UNet parameter name -> its LDM name (without the `model.diffusion_model.` prefix)."""
    mapping = diffusers_to_ldm_mapping()
    fixed = mapping["unet"]["layers"] | mapping["unet"]["addition_embed_type"]
    if key in fixed:
        return fixed[key]
    found = _rename_prefix(key, pairs if pairs is not None else unet_block_prefixes(config))
    if found is None:
        raise KeyError(f"UNet parameter {key!r} has no place in the original layout")
    diffusers_prefix, ldm_prefix, rest = found
    if ".resnets." in diffusers_prefix:
        for new, old in UNET_RESNET_RENAMES:
            rest = rest.replace(new, old)
    return ldm_prefix + rest


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    pairs = unet_block_prefixes(config)
    return {UNET_PREFIX + unet_key_to_ldm(k, config, pairs): v for k, v in state_dict.items()}


def vae_block_prefixes(config: Mapping) -> list[tuple[str, str]]:
    levels = len(config["block_out_channels"])
    pairs: list[tuple[str, str]] = []
    for level in range(levels):
        up = levels - 1 - level  # the LDM decoder counts its levels from the bottom
        pairs.append((f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block."))
        pairs.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample."))
        pairs.append((f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{up}.block."))
        pairs.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."))
        pairs.append((f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."))
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    return pairs


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    fixed = diffusers_to_ldm_mapping()["vae"]
    pairs = vae_block_prefixes(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in fixed:
            out[VAE_PREFIX + fixed[key]] = value
            continue
        found = _rename_prefix(key, pairs)
        if found is None:
            raise KeyError(f"VAE parameter {key!r} has no place in the original layout")
        _, ldm_prefix, rest = found
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in ldm_prefix:
            for new, old in VAE_ATTENTION_RENAMES:
                rest = rest.replace(new, old)
            if rest.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention uses 1x1 convs
        out[VAE_PREFIX + ldm_prefix + rest] = value
    return out


def _with_text_model_prefix(key: str) -> str:
    # transformers >= 5 made CLIPTextModel flat (`encoder.layers...`); the LDM layout keeps the
    # `text_model.` level, as CLIPTextModelWithProjection still does.
    if key.startswith(("text_model.", "text_projection.")):
        return key
    return "text_model." + key


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP text encoders (SD1, SDXL's first) are stored in transformers' own layout."""
    return {prefix + _with_text_model_prefix(k): v for k, v in state_dict.items()}


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text encoders (SD2, SDXL's second) use open_clip names and a fused q/k/v projection."""
    import torch  # here, not at the top: models.py reads this module's prefixes before torch is needed

    fixed = diffusers_to_ldm_mapping()["openclip"]["layers"]
    sd = {_with_text_model_prefix(k): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in fixed:
            out[prefix + fixed[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        if any(f".self_attn.{p}_proj." in key for p in ("k", "v")):
            continue  # written together with q below
        name = key
        for new, old in OPEN_CLIP_LAYER_RENAMES:
            name = name.replace(new, old)
        if ".attn.q_proj." in name:
            kind = name.rsplit(".", 1)[1]  # weight or bias
            qkv = [sd[key.replace(".q_proj.", f".{p}_proj.")] for p in ("q", "k", "v")]
            out[prefix + name.replace(f"q_proj.{kind}", f"in_proj_{kind}")] = torch.cat(qkv, dim=0)
        else:
            out[prefix + name] = value
    return out
