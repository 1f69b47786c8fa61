"""A LoRA file as the starting point of a new run (kohya's `--network_weights`): train a LoRA further on new or
more images, with a fresh optimizer, schedule and step count.

The file is read before the model loads (a wrong path fails in a second) and put into the freshly added adapters
before the optimizer and any average see them. Every module of the file must land in a trained layer of the same
rank, or the new file would silently lose part of the old one; layers the file does not have start as usual (at
zero). The file's alpha/rank scale is folded into the up matrix, so at strength 1 the starting LoRA changes the
model exactly as the file does, whatever `lora.alpha` says.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import LoraStudioError
from .lora import ADAPTER_NAME
from .lora_file import LoraFile, LoraModule, kohya_name
from .lora_read import check_compatible, load_lora
from .session import TrainingError

log = logging.getLogger(__name__)


def read_start_file(path: str) -> LoraFile:
    """The file `lora.network_weights` names, read in any format the app reads; LoHa/LoKr and DoRA files are
    refused (their weights are not a LoRA's down and up)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise TrainingError(f"lora.network_weights: {source} is not a file; give the path of a LoRA "
                                "(.safetensors) to start from, or leave it empty to start from zero")  # fmt: skip
    try:
        lora = load_lora(source)
    except LoraStudioError as exc:
        raise TrainingError(f"lora.network_weights: {exc}") from None
    if lora.has_lycoris():
        raise TrainingError(f"lora.network_weights: {source} is a {lora.network} (LyCORIS) file; only a plain "
                                "LoRA can start a run here, so pick one or leave the setting empty")  # fmt: skip
    if any(m.dora_scale is not None for m in lora.modules.values()):
        raise TrainingError(f"lora.network_weights: {source} is a DoRA file; only a plain LoRA can start a run "
                                "here, so pick one or leave the setting empty")  # fmt: skip
    return lora


def with_file_ranks(config: TrainConfig, lora: LoraFile) -> TrainConfig:
    """`config` training at `lora`'s rank, and its 3x3 convs' (LoCon) at their rank (kohya's dim_from_weights). A file
    whose layers have several ranks (a resized or block-dimmed LoRA) cannot be one lora.rank: refused by name."""
    ranks = {name: module.rank for name, module in lora.modules.items() if not is_conv3x3(module)}
    convs = {name: module.rank for name, module in lora.modules.items() if is_conv3x3(module)}
    for kind, found in (("layers", ranks), ("3x3 convs", convs)):
        if len(set(found.values())) > 1:
            shown = ", ".join(f"{rank} ({name})" for rank, name in sorted({(r, n) for n, r in found.items()})[:4])
            raise TrainingError(f"lora.rank_from_weights: the {kind} of {lora.path} have several ranks ({shown}, "
                                "...); set lora.rank (or block_ranks) yourself, or make it one rank with "
                                "`lora-studio resize`")  # fmt: skip
    update: dict = {"rank": next(iter(ranks.values()), config.lora.rank)}
    if convs:
        update.update(conv_rank=next(iter(convs.values())), unet_targets="full")
    log.info("lora.rank_from_weights: rank %d%s from %s", update["rank"],
             f", conv rank {update['conv_rank']}" if convs else "", lora.path)  # fmt: skip
    return TrainConfig.model_validate({**config.model_dump(), "lora": {**config.lora.model_dump(), **update}})


def is_conv3x3(module: LoraModule) -> bool:
    return module.down.dim() == 4 and tuple(module.down.shape[-2:]) != (1, 1)


def trained_layers(parts: dict[str, torch.nn.Module], family: str, unet_config) -> dict[str, torch.nn.Module]:
    """kohya name -> peft LoRA layer, for every layer this run trains."""
    from peft.tuners.lora import LoraLayer

    return {kohya_name(part, path, family, unet_config): layer
            for part, model in parts.items() for path, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A}  # fmt: skip


def apply_start_file(lora: LoraFile, base, parts: dict[str, torch.nn.Module]) -> None:
    """Copy the file's modules into this run's adapters (same rank, scale folded into up); refuse a file that
    does not fit the base model or the layers these settings train."""
    source = lora.path or "the starting LoRA"
    try:
        check_compatible(lora, base)  # the family, and each module's layer shape
    except LoraStudioError as exc:
        raise TrainingError(f"lora.network_weights: {exc}") from None
    layers = trained_layers(parts, base.family, base.unet.config)
    untrained = sorted(n for n in lora.modules if n not in layers)
    if untrained:
        raise TrainingError(
            f"lora.network_weights: {len(untrained)} of the {len(lora.modules)} modules of {source} are layers "
            f"these settings do not train (e.g. {untrained[0]}), so the new file would lose them; widen "
            "lora.unet_targets, turn lora.train_text_encoder on or clear the module filters to match the file"
        )
    for name, module in lora.modules.items():
        copy_module(name, module, layers[name], source)
    fresh = len(layers) - len(lora.modules)
    log.info("started from %s: %d layers from the file%s", source, len(lora.modules),
             f", {fresh} new at zero" if fresh else "")  # fmt: skip


def copy_module(name: str, module: LoraModule, layer, source) -> None:
    down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
    if module.rank != layer.r[ADAPTER_NAME]:
        raise TrainingError(
            f"lora.network_weights: module {name} of {source} has rank {module.rank}, but this run trains it at "
            f"rank {layer.r[ADAPTER_NAME]}; set lora.rank (and conv_rank, block_ranks) to the file's, or shrink the "
            "file first with `lora-studio resize`"
        )
    with torch.no_grad():
        down.copy_(module.down.reshape(down.shape).to(down.dtype))
        up.copy_((module.up.float() * (module.scale / layer.scaling[ADAPTER_NAME])).reshape(up.shape).to(up.dtype))
