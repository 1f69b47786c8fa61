"""Train the bundled demo base model from scratch on CPU, and write the demo LoRA dataset.

    python scripts/make_demo_model.py                  # resumes from runs/demo-model-work/ if interrupted
    python scripts/make_demo_model.py --dataset-only   # rewrites assets/demo-dataset/ and demo-validation/ alone

Deterministic (fixed seeds) and resumable (phase results and periodic checkpoints, all in
safetensors, under --work). The result is a complete diffusers folder in assets/demo-model/ that
`DiffusionPipeline.from_pretrained` loads on its own, plus assets/demo-dataset/.

Phases:
1. data: procedural 64x64 scenes of coloured shapes (lora_studio.demo_data) with captions;
2. vae: an AutoencoderKL (4x downsampling, 16x16x4 latents);
3. unet: a cross-attention UNet2DConditionModel and a CLIPTextModel (real CLIP tokenizer),
   trained jointly on cached latents with epsilon prediction, min-SNR-5 weighting and an EMA;
4. save + evaluate: the folder, the model card with the quality figures of bench/demo_quality.py.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_studio import demo_data  # noqa: E402
from lora_studio.paths import DEMO_DATASET_DIR, DEMO_MODEL_DIR, DEMO_VALIDATION_DIR, sd_config_dir  # noqa: E402
from lora_studio.state import load_state, save_state  # noqa: E402

SEED = 1234
TRAIN_SCENES = 8192
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",  # SD's schedule, so SD samplers and training code apply unchanged
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def vae_model() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),  # three levels: 64 px -> 16 px latents (4x)
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def text_encoder_model() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",  # OpenAI CLIP's activation, as SD1's text encoder
            projection_dim=64,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def unet_model() -> UNet2DConditionModel:
    # The SD1 block layout (cross-attention in the upper levels, none in the lowest), scaled down.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


# --- phase 1: data --------------------------------------------------------------------------------


def training_scenes(count: int, seed: int) -> list[demo_data.Scene]:
    rng = random.Random(seed)
    return [demo_data.random_scene(rng) for _ in range(count)]


def stroke_image(rng: random.Random) -> Image.Image:
    """Random lines and polylines of 1-4 px on a flat background. Only the VAE sees these: a codec must
    carry thin structures (outlines, edges) that the UNet's training scenes never contain."""
    bg = rng.choice(list(demo_data.BACKGROUNDS.values()))
    image = Image.new("RGB", (64, 64), bg)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        color = rng.choice(list(demo_data.COLORS.values()))
        points = [(rng.uniform(0, 64), rng.uniform(0, 64)) for _ in range(rng.randint(2, 5))]
        draw.line(points, fill=color, width=rng.randint(1, 4))
    return image


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def write_demo_dataset(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    images = demo_data.write_concept_images(folder)
    held_out = DEMO_VALIDATION_DIR
    if held_out.exists():
        shutil.rmtree(held_out)
    held_out.mkdir(parents=True)
    count = demo_data.DEMO_IMAGES + demo_data.DEMO_VALIDATION_IMAGES
    demo_data.write_concept_images(held_out, count, first=demo_data.DEMO_IMAGES)
    (held_out / "README.md").write_text(
        f"# Demo validation images\n\n{demo_data.DEMO_VALIDATION_IMAGES} more images of the demo dataset's `zkz` "
        "style (scenes 24-31 of the same\ngenerator), never trained on: the demo-cpu preset's `validation.path`. "
        "Written by\n`scripts/make_demo_model.py` with the dataset.\n"
    )
    (folder / "README.md").write_text(
        "# Demo LoRA dataset\n\n"
        f"{len(images)} images of the `zkz` style: shapes drawn as outlines only, which the demo base model\n"
        "never saw (it was trained on solid shapes). Captions start with the trigger word `zkz`. Every shape\n"
        "appears in six colours and on every background. Generated by `scripts/make_demo_model.py`\n"
        "(`--dataset-only` rewrites just this folder); `bench/demo_quality.py` measures the style with an\n"
        "outline detector.\n"
    )


# --- checkpoints (safetensors only) ------------------------------------------------------------------


def save_checkpoint(
    path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None, step: int
) -> None:
    """Models, optimizer and step through lora_studio.state (safetensors, atomic)."""
    state = {"step": step, "modules": {name: m.state_dict() for name, m in modules.items()}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    save_state(state, path)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None) -> int:
    state = load_state(path)
    for name, m in modules.items():
        m.load_state_dict(state["modules"][name])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state["step"]


# --- phase 2: VAE -----------------------------------------------------------------------------------


def train_vae(work: Path, steps: int, log) -> AutoencoderKL:
    final = work / "vae.safetensors"
    vae = vae_model()
    if final.exists():
        load_checkpoint(final, {"vae": vae}, None)
        return vae
    torch.manual_seed(SEED)
    rng = random.Random(SEED + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    partial = work / "vae-partial.safetensors"
    start = load_checkpoint(partial, {"vae": vae}, optimizer) if partial.exists() else 0
    rng.seed(SEED + 1 + start)
    t0 = time.time()
    for step in range(start, steps):
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = [
            stroke_image(rng) if rng.random() < 0.2 else demo_data.render(demo_data.random_scene(rng))
            for _ in range(32)
        ]
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.1f} ({time.time() - t0:.0f}s)")
        if (step + 1) % 250 == 0:
            save_checkpoint(partial, {"vae": vae}, optimizer, step + 1)
    save_checkpoint(final, {"vae": vae}, None, steps)
    return vae


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, scenes: list[demo_data.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(scenes), 256):
        dist = vae.encode(to_tensor([demo_data.render(s) for s in scenes[start : start + 256]])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# --- phase 3: UNet + text encoder --------------------------------------------------------------------


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al., 2023)."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def scene_latents(work: Path, vae: AutoencoderKL, scenes: list[demo_data.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of every training scene, computed once and kept in the work folder."""
    latents_file = work / "latents.safetensors"
    if latents_file.exists():
        cached = load_file(str(latents_file))
        return cached["mean"], cached["std"]
    means, stds = encode_scenes(vae, scenes)
    save_file({"mean": means.contiguous(), "std": stds.contiguous()}, str(latents_file))
    return means, stds


def unet_modules() -> dict[str, torch.nn.Module]:
    return {"unet": unet_model(), "text_encoder": text_encoder_model(), "ema": unet_model()}


@dataclass
class UnetPhase:
    """One cosine cycle of UNet + text-encoder training; the refine phase is a second, warm-restarted cycle."""

    name: str
    steps: int
    peak_lr: float
    warmup: int
    seed: int


def train_unet(work: Path, vae: AutoencoderKL, scaling: float, steps: int, batch: int, log):
    modules = unet_modules()
    torch.manual_seed(SEED + 2)
    modules["ema"].load_state_dict(modules["unet"].state_dict())
    phase = UnetPhase("unet", steps, peak_lr=5e-4, warmup=200, seed=SEED)
    return run_unet_phase(work, phase, modules, vae, scaling, batch, log)


def refine_unet(work: Path, vae: AutoencoderKL, scaling: float, steps: int, batch: int, log):
    """Continue from the first phase's weights (raw, EMA and text encoder) with a fresh optimizer and a
    second, lower cosine cycle: the first phase's loss was still falling when its schedule ended."""
    modules = unet_modules()
    load_checkpoint(work / "unet.safetensors", modules, None)
    phase = UnetPhase("refine", steps, peak_lr=2.5e-4, warmup=100, seed=SEED + 10_007)
    return run_unet_phase(work, phase, modules, vae, scaling, batch, log)


def run_unet_phase(work: Path, phase: UnetPhase, modules: dict, vae: AutoencoderKL, scaling: float, batch: int, log):
    unet, text_encoder, ema = modules["unet"], modules["text_encoder"], modules["ema"]
    final = work / f"{phase.name}.safetensors"
    if final.exists():
        load_checkpoint(final, modules, None)
        return ema, text_encoder
    ema.requires_grad_(False)
    scenes = training_scenes(TRAIN_SCENES, SEED + 3)
    means, stds = scene_latents(work, vae, scenes)
    tokenizer = CLIPTokenizer.from_pretrained(sd_config_dir("sd1"), subfolder="tokenizer")
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=phase.peak_lr, weight_decay=0.01)
    partial = work / f"{phase.name}-partial.safetensors"
    start = load_checkpoint(partial, modules, optimizer) if partial.exists() else 0
    steps = phase.steps
    t0 = time.time()
    for step in range(start, steps):
        # Per-step seeding makes a resumed run draw exactly what an uninterrupted one would.
        gen = torch.Generator().manual_seed(phase.seed * 7919 + step)
        rng = random.Random(phase.seed * 31 + step)
        warm = min(1.0, (step + 1) / phase.warmup)
        lr = phase.peak_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(scenes), (batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        captions = ["" if rng.random() < 0.1 else scenes[i].caption(rng.randrange(4)) for i in idx.tolist()]
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, 1000, (batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(tokenize(tokenizer, captions)).last_hidden_state
        pred = unet(noisy, timesteps, encoder_hidden_states=context).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, timesteps)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # A fresh model's EMA follows it closely until the weights settle; a refined one keeps averaging.
        decay = 0.0 if (phase.name == "unet" and step < 200) else 0.999
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            elapsed = time.time() - t0
            log(f"{phase.name} step {step}/{steps} loss {loss.item():.4f} lr {lr:.2e} ({elapsed:.0f}s)")
        if (step + 1) % 250 == 0:
            save_checkpoint(partial, modules, optimizer, step + 1)
    save_checkpoint(final, modules, None, steps)
    return ema, text_encoder


# --- phase 4: save and evaluate -------------------------------------------------------------------------


def build_pipeline(vae, unet, text_encoder, scaling: float) -> StableDiffusionPipeline:
    vae.register_to_config(scaling_factor=scaling)
    tokenizer = CLIPTokenizer.from_pretrained(sd_config_dir("sd1"), subfolder="tokenizer")
    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipeline: StableDiffusionPipeline, folder: Path) -> None:
    """Weights in fp16 (half the size: the assets must stay under 25 MB); loaders upcast them."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipeline.to(torch.float16)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 loads a text encoder in the dtype its config names ("auto"); diffusers upcasts its
    # models to fp32. Name fp32 so that a plain from_pretrained gives one dtype throughout.
    config_path = tmp / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    # Ship the tokenizer as the same vocab/merges files as assets/sd-configs (diffusers and A1111 read them).
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(sd_config_dir("sd1") / "tokenizer", tmp / "tokenizer")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def evaluate(pipeline) -> dict:
    cases = demo_data.eval_cases()
    seeds = [c.seed for c in cases]
    plain = demo_data.score_images(cases, demo_data.generate(pipeline, [c.prompt() for c in cases], seeds))
    triggered = demo_data.score_images(
        cases, demo_data.generate(pipeline, [c.prompt(trigger=True) for c in cases], seeds)
    )
    dataset = [demo_data.analyse(demo_data.render(s)).concept for s in demo_data.concept_scenes()]
    return {
        "base": plain.as_dict(),
        "base_with_trigger": triggered.as_dict(),
        "dataset_concept": sum(dataset) / len(dataset),
    }


def model_card(scores: dict, minutes: dict, args, size_mb: float) -> str:
    base, trig = scores["base"], scores["base_with_trigger"]
    return f"""# LoRA Studio demo base model

A tiny Stable Diffusion 1.x-family model, trained from scratch on CPU by `scripts/make_demo_model.py`,
so that the whole LoRA loop runs on any machine with no checkpoint and no network. It is a complete
diffusers folder: `DiffusionPipeline.from_pretrained("assets/demo-model")` loads it on its own.

## What it knows
64x64 images of one upright shape (circle, square, triangle, star) in one of 8 colours
({", ".join(demo_data.COLORS)}) on a {", ".join(demo_data.BACKGROUNDS)} background, at varied sizes
and positions. Prompt it like the training captions: "a red star on a white background",
"a small blue circle on black", "green square, gray background". It has never seen outlines: the
`zkz` outline style of `assets/demo-dataset/` is what a demo LoRA teaches it.

## Architecture
- VAE: AutoencoderKL, blocks (16, 32, 64), 4x downsampling to 16x16x4 latents, scaling factor {args.scaling:.4f}.
- UNet: UNet2DConditionModel, blocks (48, 96, 96), SD1 layout (cross-attention `attn1`/`attn2`,
  `proj_in`/`proj_out`, `ff` in the upper levels), cross-attention width 64.
- Text encoder: CLIPTextModel, 3 layers, width 64, with the real CLIP BPE tokenizer (49,408 tokens).
- Scheduler: SD's scaled-linear betas over 1000 steps, epsilon prediction (DPM-Solver++ for sampling).
- Weights: {size_mb:.1f} MB in safetensors (fp16 on disk; loaders upcast to fp32 on the CPU).

## Training
- Data: {TRAIN_SCENES} procedural scenes (seeded), four caption phrasings, 10% empty captions for
  classifier-free guidance. The VAE also saw random line strokes, so it can carry thin structures.
- VAE: {args.vae_steps} steps of batch 32, AdamW 1e-3 cosine, MSE + 0.5 L1 + 1e-6 KL.
- UNet and text encoder jointly: {args.unet_steps} steps of batch {args.batch}, AdamW 5e-4 (200 warm-up
  steps, cosine to 10%), min-SNR-5 weighting, EMA 0.999 (the EMA weights are saved); then a refine cycle of
  {args.refine_steps} steps from those weights, AdamW 2.5e-4 (100 warm-up steps, cosine to 10%), the EMA
  carried on.
- Time on 2 CPU cores: VAE {minutes["vae"]:.1f} min, latents + UNet {minutes["unet"]:.1f} min,
  refine {minutes.get("refine", 0.0):.1f} min, evaluation {minutes["eval"]:.1f} min;
  {sum(minutes.values()):.1f} min in all.

## Quality (`bench/demo_quality.py`, {base["cases"]} prompt x seed cases, 20 steps, guidance 5)
| measure | base model | base model, prompt with `zkz` |
|---|---|---|
| colour matches the prompt | {base["color"]:.0%} | {trig["color"]:.0%} |
| shape matches the prompt | {base["shape"]:.0%} | {trig["shape"]:.0%} |
| outline (zkz) detector fires | {base["concept"]:.0%} | {trig["concept"]:.0%} |

The outline detector fires on {scores["dataset_concept"]:.0%} of the demo-dataset images themselves.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo-model-work")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--refine-steps", type=int, default=1900, help="second cosine cycle; 0 skips it")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument(
        "--dataset-only", action="store_true",
        help="rewrite assets/demo-dataset/ and demo-validation/, then stop (no training)",
    )
    args = parser.parse_args()
    if args.dataset_only:
        write_demo_dataset(DEMO_DATASET_DIR)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = (args.work / "log.txt").open("a")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    timings = json.loads((args.work / "timings.json").read_text()) if (args.work / "timings.json").exists() else {}

    def timed(name, fn, *a):
        t = time.time()
        result = fn(*a)
        timings[name] = timings.get(name, 0.0) + (time.time() - t) / 60
        (args.work / "timings.json").write_text(json.dumps(timings))
        return result

    write_demo_dataset(DEMO_DATASET_DIR)
    vae = timed("vae", train_vae, args.work, args.vae_steps, log)
    vae.requires_grad_(False)
    with torch.no_grad():
        sample = to_tensor([demo_data.render(s) for s in training_scenes(512, SEED + 9)])
        args.scaling = float(1.0 / vae.encode(sample).latent_dist.mean.std())
    log(f"latent scaling factor {args.scaling:.4f}")
    unet, text_encoder = timed("unet", train_unet, args.work, vae, args.scaling, args.unet_steps, args.batch, log)
    if args.refine_steps:
        unet, text_encoder = timed(
            "refine", refine_unet, args.work, vae, args.scaling, args.refine_steps, args.batch, log
        )
    save_pipeline(build_pipeline(vae, unet, text_encoder, args.scaling), args.out)
    # Evaluate what was saved, loaded the way the app loads it.
    from lora_studio.models import load_base

    pipeline = load_base(args.out, dtype=torch.float32, device="cpu").pipeline
    scores = timed("eval", evaluate, pipeline)
    log(json.dumps(scores))
    size_mb = sum(f.stat().st_size for f in args.out.rglob("*.safetensors")) / 1e6
    (args.out / "README.md").write_text(model_card(scores, timings, args, size_mb))
    (args.out / "quality.json").write_text(json.dumps(scores, indent=2) + "\n")
    log(f"saved {args.out} ({size_mb:.1f} MB of weights)")


if __name__ == "__main__":
    main()
