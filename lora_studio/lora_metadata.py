"""What a LoRA file says about itself: kohya's `ss_*` training metadata, ModelSpec keys and the `sshs_*` hashes."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as serialize

from . import lycoris
from .lycoris import NETWORK_MODULE
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
    max_train_steps: int = 0
    num_reg_images: int = 0
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    session_id: int = 0


@functools.lru_cache(maxsize=8)
def _file_hashes(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """A1111's two hashes of a checkpoint file, as kohya's `model_hash` and `calculate_sha256` compute them: sha256
    of bytes 0x100000-0x110000 cut to 8, and of the whole file (seconds for a 7 GB SDXL file, so once per file)."""
    whole = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(0x100000)
        legacy = hashlib.sha256(file.read(0x10000)).hexdigest()[0:8]
        file.seek(0)
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            whole.update(chunk)
    return legacy, whole.hexdigest()


def base_model_hashes(source: str) -> dict[str, str]:
    """kohya's `ss_sd_model_hash` / `ss_new_sd_model_hash` for a single-file base model; none for a folder (diffusers
    layout, the demo) or a hub id, where kohya's functions have no file to hash."""
    path = Path(source)
    if not path.is_file():
        return {}
    stat = path.stat()
    legacy, whole = _file_hashes(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": whole}


def vae_keys(vae: str) -> dict[str, str]:
    """kohya's `ss_vae_name` (the file's or folder's name), and for a file `ss_vae_hash` / `ss_new_vae_hash` (A1111's
    two hashes, as for the base model); nothing when the base model's own VAE was used."""
    if not vae.strip():
        return {}
    path = Path(vae.strip())
    keys = {"ss_vae_name": path.name or vae.strip()}
    if path.is_file():
        stat = path.stat()
        legacy, whole = _file_hashes(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        keys |= {"ss_vae_hash": legacy, "ss_new_vae_hash": whole}
    return keys


def training_metadata(config, facts: TrainingFacts) -> dict[str, str]:
    """kohya's `ss_*` keys and the ModelSpec keys; every value a string (the safetensors header rule)."""
    lora, opt = config.lora, config.optimizer
    metadata = {
        "ss_output_name": config.name,
        "ss_base_model_version": BASE_MODEL_VERSION.get(facts.family, "sd_v1"),
        "ss_v2": str(facts.family in ("sd2", "sd2-v")),
        "ss_sd_model_name": Path(facts.base_source).name or facts.base_source,
        "ss_network_module": "networks.lora" if lora.network == "lora" else NETWORK_MODULE,
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(float(lora.alpha)),  # kohya writes str() of a float: "16.0"
        "ss_network_dropout": str(float(lora.dropout)) if lora.dropout else "None",
        "ss_network_args": json.dumps({k: str(v) for k, v in network_args(lora).items()}),
        "ss_clip_skip": str(config.clip_skip),
        "ss_max_token_length": str(config.max_token_length) if config.max_token_length != 75 else "None",
        "ss_weighted_captions": str(config.weighted_captions),
        "ss_epoch": str(facts.epochs),
        "ss_num_epochs": str(facts.epochs),
        "ss_steps": str(facts.steps),
        "ss_max_train_steps": str(facts.max_train_steps),
        "ss_session_id": str(facts.session_id),
        "ss_gradient_accumulation_steps": str(opt.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        # kohya's pair: fp8_base alone narrows the text encoders too, with fp8_base_unet only the UNet
        "ss_fp8_base": str(config.fp8_base),
        "ss_fp8_base_unet": str(config.fp8_base and not config.fp8_text_encoders()),
        "ss_learning_rate": str(float(opt.learning_rate)),
        "ss_unet_lr": str(float(opt.unet_lr or opt.learning_rate)),
        "ss_text_encoder_lr": str(float(opt.text_encoder_lr or opt.learning_rate)) if lora.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not lora.train_text_encoder),
        "ss_optimizer": opt.optimizer,
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_lr_warmup_steps": str(opt.lr_warmup_steps),
        "ss_min_snr_gamma": str(opt.min_snr_gamma),
        "ss_noise_offset": str(opt.noise_offset),
        "ss_noise_offset_random_strength": str(opt.noise_offset_random_strength),
        "ss_adaptive_noise_scale": str(opt.adaptive_noise_scale or None),  # kohya writes None when off
        "ss_ip_noise_gamma_random_strength": str(opt.ip_noise_gamma_random_strength),
        "ss_zero_terminal_snr": str(opt.zero_terminal_snr),
        "ss_scale_weight_norms": str(lora.scale_weight_norms or None),  # kohya writes None when off
        "ss_multires_noise_iterations": str(opt.multires_noise_iterations),
        "ss_multires_noise_discount": str(opt.multires_noise_discount),
        "ss_ip_noise_gamma": str(opt.ip_noise_gamma),
        "ss_debiased_estimation": str(opt.debiased_estimation),
        "ss_loss_type": opt.loss_type,
        "ss_huber_schedule": opt.huber_schedule,
        "ss_huber_c": str(opt.huber_c),
        "ss_huber_scale": str(opt.huber_scale),
        "ss_max_grad_norm": str(float(opt.max_grad_norm)),
        "ss_prior_loss_weight": str(float(config.regularization.prior_loss_weight)),
        "ss_seed": str(config.seed),
        "ss_mixed_precision": config.mixed_precision,
        "ss_training_started_at": f"{facts.started_at:.3f}",
        "ss_training_finished_at": f"{facts.finished_at:.3f}",
        "ss_training_comment": "trained with LoRA Studio",
    }
    return (metadata | dataset_keys(config.dataset, facts) | modelspec_keys(config, facts)
            | base_model_hashes(facts.base_source) | vae_keys(config.vae))  # fmt: skip


def network_args(lora) -> dict:
    """kohya's `ss_network_args`, spelled as kohya's network modules take them (block lists comma-separated)."""
    args = lycoris.network_args(lora.network, lora.lokr_factor) if lora.network != "lora" else {}
    if lora.conv_rank:
        args |= {"conv_dim": lora.conv_rank, "conv_alpha": lora.conv_alpha}
    if lora.use_dora:
        args["use_dora"] = True
    if lora.dropout:
        args["dropout"] = lora.dropout
    for name in ("rank_dropout", "module_dropout"):
        if getattr(lora, name):
            args[name] = f"{getattr(lora, name):g}"
    if lora.block_ranks:
        args["block_dims"] = ",".join(str(r) for r in lora.block_ranks)
        alphas = lora.block_alphas or [lora.alpha] * len(lora.block_ranks)
        args["block_alphas"] = ",".join(f"{a:g}" for a in alphas)
    if lora.conv_block_ranks:
        args["conv_block_dims"] = ",".join(str(r) for r in lora.conv_block_ranks)
        alphas = lora.conv_block_alphas or [lora.conv_alpha or lora.alpha] * len(lora.conv_block_ranks)
        args["conv_block_alphas"] = ",".join(f"{a:g}" for a in alphas)
    if len(lora.block_lr_weights) in (23, 25):  # kohya's down / mid / up lists (SDXL's have its first and last)
        down, mid, up = (slice(0, 12), slice(12, 13), slice(13, 25)) if len(lora.block_lr_weights) == 25 else (
            slice(1, 10), slice(10, 13), slice(13, 22))  # fmt: skip
        for name, part in (("down_lr_weight", down), ("mid_lr_weight", mid), ("up_lr_weight", up)):
            args[name] = ",".join(f"{w:g}" for w in lora.block_lr_weights[part])
    elif lora.block_lr_weights:
        args["block_lr_weights"] = ",".join(f"{w:g}" for w in lora.block_lr_weights)
    if lora.include_modules:
        args["include_patterns"] = json.dumps([lora.include_modules])
    if lora.exclude_modules:
        args["exclude_patterns"] = json.dumps([lora.exclude_modules])
    for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if getattr(lora, name):
            args[name] = f"{getattr(lora, name):g}"
    return args


def dataset_keys(dataset, facts: TrainingFacts) -> dict[str, str]:
    """kohya's per-dataset keys: images, folders (keyed by their names), tags, buckets and augmentations."""
    return {
        "ss_resolution": f"({facts.resolution}, {facts.resolution})",
        "ss_num_train_images": str(facts.num_images),
        "ss_num_reg_images": str(facts.num_reg_images),
        "ss_batch_size_per_device": str(dataset.batch_size),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs),
        "ss_bucket_info": json.dumps({"buckets": facts.buckets}),
        "ss_caption_dropout_rate": str(dataset.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": str(dataset.caption_dropout_every_n_epochs),
        "ss_shuffle_caption": str(dataset.shuffle_caption),
        "ss_keep_tokens": str(dataset.keep_tokens),
        "ss_flip_aug": str(dataset.flip_aug),
        "ss_color_aug": str(any(dataset.color_jitter)),
        "ss_enable_bucket": str(dataset.enable_bucket),
        "ss_min_bucket_reso": str(dataset.min_bucket_reso),
        "ss_max_bucket_reso": str(dataset.max_bucket_reso),
        "ss_cache_latents": str(dataset.cache_latents),
    }


def modelspec_keys(config, facts: TrainingFacts) -> dict[str, str]:
    """The Stability AI ModelSpec keys A1111 and ComfyUI show."""
    from datetime import datetime, timezone

    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE.get(facts.family, MODELSPEC_ARCHITECTURE["sd1"]) + "/lora",
        "modelspec.implementation": SGM_IMPLEMENTATION if facts.family == "sdxl" else "diffusers",
        "modelspec.title": config.name,
        "modelspec.resolution": f"{facts.resolution}x{facts.resolution}",
        "modelspec.date": datetime.fromtimestamp(facts.finished_at, timezone.utc).isoformat(timespec="seconds"),
        "modelspec.trigger_phrase": config.dataset.trigger_word,
        "modelspec.prediction_type": "v" if facts.prediction_type == "v_prediction" else "epsilon",
        "modelspec.encoder_layer": str(config.clip_skip),
        "modelspec.description": f"LoRA for {facts.base_source}, {facts.steps} steps",
    }
