"""Tiny, seeded Stable Diffusion pipelines with the real structure of each family.

Built in the test the way diffusers' and peft's own tests do (UNet widths (32, 64), CLIP hidden
size 32), with the real tokenizer and scheduler configs from `assets/`. SDXL's two text encoders
get different widths because diffusers tells them apart in a single file by width.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lora_studio.paths import sd_config_dir

SD_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    norm_num_groups=32,
    attention_head_dim=(2, 4),
)


def text_config(hidden: int, act: str, layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=layers,
        projection_dim=hidden,
        hidden_act=act,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def scheduler_for(family: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    cls = {"sd1": PNDMScheduler, "sd2": PNDMScheduler, "sd2-v": DDIMScheduler, "sdxl": EulerDiscreteScheduler}[family]
    return cls.from_pretrained(sd_config_dir(family), subfolder="scheduler")


def tokenizer_for(family: str, name: str = "tokenizer") -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(sd_config_dir(family), subfolder=name)


def tiny_pipeline(family: str, seed: int = 0):
    """A randomly initialised (seeded) pipeline of `family`: sd1, sd2, sd2-v or sdxl."""
    torch.manual_seed(seed)
    if family == "sdxl":
        te1 = CLIPTextModel(text_config(32, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(text_config(64, "gelu"))
        unet = UNet2DConditionModel(
            **SD_UNET,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32 + 64,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
        )
        return StableDiffusionXLPipeline(
            vae=tiny_vae(),
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer_for("sdxl"),
            tokenizer_2=tokenizer_for("sdxl", "tokenizer_2"),
            unet=unet,
            scheduler=scheduler_for("sdxl"),
        )
    is_sd2 = family in ("sd2", "sd2-v")
    unet = UNet2DConditionModel(
        **SD_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        use_linear_projection=is_sd2,
    )
    te = CLIPTextModel(text_config(32, "gelu" if is_sd2 else "quick_gelu"))
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=te,
        tokenizer=tokenizer_for(family),
        unet=unet,
        scheduler=scheduler_for(family),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def caption_images(folder: Path) -> Path:
    """Four 32x32 images with captions "a thing, number i" (two comma tags, for tag-frequency checks)."""
    from PIL import Image

    for i in range(4):
        image = Image.new("RGB", (32, 32), (60 * i, 100, 200))
        image.paste((250, 250, 250), (0, 0, 10, 10))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a thing, number {i}")
    return folder
