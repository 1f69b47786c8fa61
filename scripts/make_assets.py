"""Write the offline assets: diffusers configs for each family and the CLIP tokenizer files.

Run once (and again only if a config changes):

    python scripts/make_assets.py [--wheel open_clip_torch-*.whl]

The CLIP BPE data is the `bpe_simple_vocab_16e6.txt.gz` that ships inside the `open-clip-torch`
wheel. Without `--wheel` the script asks pip to download that wheel (no dependencies) into a temp
folder. open-clip is never a runtime dependency: only the files this script writes are shipped.

The configs are the published diffusers configs of SD 1.5, SD 2.1-base (512, epsilon),
SD 2.1 (768, v-prediction) and SDXL base 1.0, so single-file checkpoints load without the hub.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "sd-configs"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"

# --- tokenizer ---------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2/CLIP BPE (same order as OpenAI's)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    # The file's first line is a version header; lines [1:48895] are the merges CLIP uses
    # (49152 - 256 - 2 entries). Vocab order: byte chars, byte chars + </w>, merges, specials.
    merges = bpe_text.split("\n")[1:48895]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def tokenizer_config(pad_token: str) -> dict:
    # model_max_length 77 is required: without it the tokenizer would not truncate/pad to CLIP's context.
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    cfg = tokenizer_config(pad_token)
    write_json(folder / "tokenizer_config.json", cfg)
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    write_json(folder / "special_tokens_map.json", specials)


def read_bpe_text(wheel: Path | None) -> str:
    if wheel is None:
        tmp = Path(tempfile.mkdtemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), OPEN_CLIP_WHEEL], check=True
        )
        wheel = next(tmp.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return gzip.decompress(zf.read(BPE_MEMBER)).decode("utf-8")


# --- diffusers configs -------------------------------------------------------------------------

SCALED_LINEAR = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}

CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# SD2 uses OpenCLIP ViT-H without its last layer (the penultimate layer is the conditioning).
OPEN_CLIP_H = CLIP_L | {
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
OPEN_CLIP_BIGG = CLIP_L | {
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

SD_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
}
SD1_UNET = SD_UNET_COMMON | {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "sample_size": 64,
}
SD2_UNET = SD1_UNET | {
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
SDXL_UNET = SD_UNET_COMMON | {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "sample_size": 128,
}

VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

PNDM_EPS = {
    "_class_name": "PNDMScheduler",
    **SCALED_LINEAR,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
DDIM_V = {
    "_class_name": "DDIMScheduler",
    **SCALED_LINEAR,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
}
EULER_EPS = {
    "_class_name": "EulerDiscreteScheduler",
    **SCALED_LINEAR,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

SD_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# family -> (model_index, unet, vae, scheduler, [(text encoder folder, config, tokenizer folder, pad token)])
FAMILIES = {
    "sd1": (SD_INDEX, SD1_UNET, VAE, PNDM_EPS, [("text_encoder", CLIP_L, "tokenizer", "<|endoftext|>")]),
    "sd2": (SD_INDEX, SD2_UNET, VAE, PNDM_EPS, [("text_encoder", OPEN_CLIP_H, "tokenizer", "!")]),
    "sd2-v": (
        SD_INDEX | {"scheduler": ["diffusers", "DDIMScheduler"]},
        SD2_UNET | {"sample_size": 96},
        VAE | {"sample_size": 768},
        DDIM_V,
        [("text_encoder", OPEN_CLIP_H, "tokenizer", "!")],
    ),
    "sdxl": (
        SDXL_INDEX,
        SDXL_UNET,
        VAE | {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        EULER_EPS,
        [
            ("text_encoder", CLIP_L, "tokenizer", "<|endoftext|>"),
            ("text_encoder_2", OPEN_CLIP_BIGG, "tokenizer_2", "!"),
        ],
    ),
}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_family(root: Path, family: str, vocab: dict[str, int], merges: list[str]) -> None:
    index, unet, vae, scheduler, encoders = FAMILIES[family]
    folder = root / family
    write_json(folder / "model_index.json", index)
    write_json(folder / "unet" / "config.json", unet)
    write_json(folder / "vae" / "config.json", vae)
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    for encoder_dir, encoder_cfg, tokenizer_dir, pad in encoders:
        write_json(folder / encoder_dir / "config.json", encoder_cfg)
        write_tokenizer(folder / tokenizer_dir, vocab, merges, pad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="a local open_clip_torch wheel (default: pip download it)")
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()
    vocab, merges = build_vocab_and_merges(read_bpe_text(args.wheel))
    for family in FAMILIES:
        write_family(args.out, family, vocab, merges)
    print(f"wrote {', '.join(FAMILIES)} under {args.out}")


if __name__ == "__main__":
    main()
