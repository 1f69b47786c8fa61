"""The maths of one training step: per-sample random draws, latents, text conditioning, the diffusion loss.

Every random draw of a step (captions, crops, flips, noise, timesteps, dropout) comes from generators
seeded by (seed, step, micro-batch, sample), so a resumed run repeats exactly what an uninterrupted run
would have done: on the CPU the final LoRA weights are bit-identical.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from . import buckets as bucketing
from .cache import LatentEntry, encode_pixels
from .conditioning import encode_captions
from .data import build_caption, make_step_sample
from .models import TEXT_ENCODER_NAMES, BaseModel
from .session import Session, TrainingError


def encode_text(
    base: BaseModel,
    captions: list[str],
    clip_skip: int,
    encoders: list[torch.nn.Module] | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Conditioning for a batch of captions (conditioning.encode_captions) through the base's tokenizers and
    `encoders` (default: its own; training passes the prepared, possibly DDP-wrapped ones)."""
    encoders = encoders or base.text_encoders
    device = device or base.unet.device
    return encode_captions(base.tokenizers, encoders, captions, clip_skip, base.family == "sdxl", device)


@dataclass(frozen=True)
class Draw:
    """One sample's own random sources for one step (caption, crop, flip, noise, timestep).

    Keyed by (seed, step, micro-batch, item, occurrence) rather than by batch, so a sample gets the
    same draws however samples are grouped: resumed runs, and several processes splitting a batch,
    see exactly what one uninterrupted process would."""

    rng: random.Random
    gen: torch.Generator


def sample_draws(seed: int, step: int, micro: int, indices: list[int]) -> list[Draw]:
    seen: dict[int, int] = {}
    draws = []
    for index in indices:
        occurrence = seen[index] = seen.get(index, -1) + 1
        key = f"{seed}-{step}-{micro}-{index}-{occurrence}"
        number = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)
        draws.append(Draw(random.Random(key), torch.Generator().manual_seed(number)))
    return draws


def cached_latent(session: Session, index: int, rng: random.Random) -> dict[str, torch.Tensor]:
    item, bucket = session.items[index], session.buckets[index]
    resized, crop = bucketing.plan_crop(item.width, item.height, bucket, False, random.Random(0))
    flip = session.config.dataset.flip_aug and rng.random() < 0.5
    cached = session.latent_cache.get(item, LatentEntry(index, bucket, resized, crop, flip))
    if cached is None:
        raise TrainingError(f"the latent cache lost the entry of {item.path}; delete the cache folder and rerun")
    return {**cached, "crop": crop}


def batch_latents(session: Session, indices: list[int], draws: list[Draw]) -> tuple:
    """Scaled latents of a batch, plus each sample's caption and crop (SDXL conditioning)."""
    config, base = session.config, session.base
    captions, crops = [], []
    if session.latent_cache is not None:
        entries = [cached_latent(session, index, d.rng) for index, d in zip(indices, draws, strict=True)]
        mean, std = torch.stack([e["mean"] for e in entries]), torch.stack([e["std"] for e in entries])
        crops = [e["crop"] for e in entries]
        captions = [
            build_caption(session.items[i], config.dataset, d.rng) for i, d in zip(indices, draws, strict=True)
        ]
    else:
        samples = [
            make_step_sample(session.items[i], session.buckets[i], config.dataset, d.rng)
            for i, d in zip(indices, draws, strict=True)
        ]
        mean, std = encode_pixels(base.vae, torch.stack([s.pixels for s in samples]))  # one VAE batch
        captions, crops = [s.caption for s in samples], [s.crop for s in samples]
    latents = mean + std * torch.stack([torch.randn(mean.shape[1:], generator=d.gen) for d in draws])
    vae_config = base.vae.config
    latents = (latents - (getattr(vae_config, "shift_factor", None) or 0.0)) * vae_config.scaling_factor
    return latents.to(session.device), captions, crops


def conditioning(session: Session, captions: list[str], crops: list) -> tuple[torch.Tensor, dict | None]:
    base = session.base
    if session.text_cache is not None:
        entries = [session.text_cache.get(c) for c in captions]
        if any(e is None for e in entries):
            encoded = encode_text(base, captions, session.config.clip_skip)
        else:
            encoded = {k: torch.stack([e[k] for e in entries]).to(session.device) for k in entries[0]}
    else:
        # Through the prepared (possibly DDP-wrapped) encoders, so their gradients are synchronised.
        pairs = zip(TEXT_ENCODER_NAMES, base.text_encoders, strict=False)
        encoders = [session.models.get(name, e) for name, e in pairs]
        encoded = encode_text(base, captions, session.config.clip_skip, encoders, session.device)
    added = None
    if base.family == "sdxl":
        time_ids = torch.tensor(
            [[*c.original_size, *c.crop_top_left, *c.target_size] for c in crops],
            device=session.device,
            dtype=encoded["hidden"].dtype,
        )
        added = {"text_embeds": encoded["pooled"], "time_ids": time_ids}
    return encoded["hidden"], added


def diffusion_loss(
    session: Session, latents: torch.Tensor, hidden: torch.Tensor, added: dict | None, draws: list[Draw]
) -> torch.Tensor:
    config, scheduler = session.config, session.noise_scheduler
    shape = latents.shape[1:]
    noise = torch.stack([torch.randn(shape, generator=d.gen) for d in draws]).to(latents.device)
    if config.optimizer.noise_offset:
        # Offset noise (Guttenberg 2023): lets the model learn overall brightness, i.e. very dark/bright images.
        offset = torch.stack([torch.randn((shape[0], 1, 1), generator=d.gen) for d in draws]).to(latents.device)
        noise = noise + config.optimizer.noise_offset * offset
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, steps, (1,), generator=d.gen) for d in draws]).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    weight_dtype = session.weight_dtype
    with session.accelerator.autocast():
        pred = session.models["unet"](
            noisy.to(weight_dtype), timesteps, encoder_hidden_states=hidden.to(weight_dtype), added_cond_kwargs=added
        ).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.optimizer.min_snr_gamma:
        # Min-SNR-gamma weighting (Hang et al. 2023); the v-prediction form divides by SNR + 1.
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=config.optimizer.min_snr_gamma)
        per_sample = per_sample * (clipped / (snr + 1 if v_prediction else snr))
    return per_sample.mean()


def training_step(session: Session, indices: list[int], micro: int = 0) -> float:
    """One micro-batch: forward, backward, and (when accumulation completes) an optimizer step."""
    seed = session.config.seed
    draws = sample_draws(seed, session.step, micro, indices)
    torch.manual_seed(seed * 1_000_003 + session.step * 101 + micro)  # LoRA dropout draws from the global RNG
    with session.accelerator.accumulate(*session.models.values()):
        latents, captions, crops = batch_latents(session, indices, draws)
        hidden, added = conditioning(session, captions, crops)
        loss = diffusion_loss(session, latents, hidden, added, draws)
        session.accelerator.backward(loss)
        if session.accelerator.sync_gradients and session.config.optimizer.max_grad_norm:
            params = [p for group in session.optimizer.param_groups for p in group["params"]]
            session.accelerator.clip_grad_norm_(params, session.config.optimizer.max_grad_norm)
        session.optimizer.step()
        session.lr_scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()
