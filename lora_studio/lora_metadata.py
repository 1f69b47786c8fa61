"""What a LoRA file says about itself: kohya's `ss_*` training metadata, ModelSpec keys and the `sshs_*` hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as serialize

from .models import BASE_MODEL_VERSION, MODELSPEC_ARCHITECTURE


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's `sshs_model_hash` and `sshs_legacy_hash`, computed as kohya's `precalculate_safetensors_hashes` does:
    over a re-serialisation holding only the `ss_*` metadata (other keys, such as the ModelSpec ones, must not change
    the hashes). The model hash covers the tensor bytes, the same as in the written file; the legacy one is the
    sha256 of bytes 0x100000-0x110000 of that re-serialisation, as sd-webui-additional-networks hashes, cut to 8."""
    data = serialize(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


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
        "ss_zero_terminal_snr": str(opt.zero_terminal_snr),
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
