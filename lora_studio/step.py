"""The maths of one training step: per-sample random draws, latents, text conditioning, the diffusion loss.

Every random draw of a step (captions, crops, flips, noise, timesteps, dropout) comes from generators
seeded by (seed, step, micro-batch, sample), so a resumed run repeats exactly what an uninterrupted run
would have done: on the CPU the final LoRA weights are bit-identical.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from . import buckets as bucketing
from .cache import LatentCache, LatentEntry, TextCache, encode_pixels
from .conditioning import encode_captions
from .config import DatasetConfig, OptimConfig
from .data import Item, bucket_mask, build_caption, make_step_sample
from .ema import lora_parameters
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
    device = device or next(encoders[0].parameters()).device  # the UNet may be parked elsewhere (low_vram)
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


def cached_latent(
    latent_cache: LatentCache, item: Item, bucket: bucketing.Bucket, index: int, flip_aug: bool, rng: random.Random
) -> dict[str, torch.Tensor]:
    resized, crop = bucketing.plan_crop(item.width, item.height, bucket, False, random.Random(0))
    flip = flip_aug and rng.random() < 0.5
    cached = latent_cache.get(item, LatentEntry(index, bucket, resized, crop, flip))
    if cached is None:
        raise TrainingError(f"the latent cache lost the entry of {item.path}; delete the cache folder and rerun")
    return {**cached, "crop": crop}


def batch_latents(
    vae: torch.nn.Module, latent_cache: LatentCache | None, dataset: DatasetConfig, items: list[Item],
    buckets: list[bucketing.Bucket], indices: list[int], draws: list[Draw], device: torch.device,
) -> tuple:  # fmt: skip
    """Scaled latents of a batch (from the cache, or one VAE batch), each sample's caption and crop (SDXL
    conditioning), and the loss weights of masked loss (None without). `items`, `buckets` are the whole dataset's;
    `indices` pick the batch."""
    if latent_cache is not None:
        entries = [cached_latent(latent_cache, items[i], buckets[i], i, dataset.flip_aug, d.rng)
                   for i, d in zip(indices, draws, strict=True)]  # fmt: skip
        mean, std = torch.stack([e["mean"] for e in entries]), torch.stack([e["std"] for e in entries])
        crops = [e["crop"] for e in entries]
        captions = [build_caption(items[i], dataset, d.rng) for i, d in zip(indices, draws, strict=True)]
        masks = [e.get("mask") for e in entries]
    else:
        samples = [make_step_sample(items[i], buckets[i], dataset, d.rng) for i, d in zip(indices, draws, strict=True)]
        mean, std = encode_pixels(vae, torch.stack([s.pixels for s in samples]))  # one VAE batch
        captions, crops = [s.caption for s in samples], [s.crop for s in samples]
        masks = [bucket_mask(items[i], buckets[i], s.resized, s.crop, s.flip, mean.shape[-2:])
                 for i, s in zip(indices, samples, strict=True)]  # None for an item without a mask  # fmt: skip
    latents = mean + std * torch.stack([torch.randn(mean.shape[1:], generator=d.gen) for d in draws])
    latents = (latents - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    weights = loss_weights(masks, dataset.unmasked_weight, mean.shape)
    return latents.to(device), captions, crops, None if weights is None else weights.to(device)


def loss_weights(masks: list[torch.Tensor | None], unmasked_weight: float, shape: torch.Size) -> torch.Tensor | None:
    """Per-latent-pixel loss weights (B, 1, h, w) from the batch's masks: unmasked_weight + (1 - unmasked_weight) x
    mask, and 1 for an image without a mask; None when no image of the batch has one (the plain loss)."""
    if all(m is None for m in masks):
        return None
    full = torch.ones((1, *shape[-2:]))
    return torch.stack([full if m is None else unmasked_weight + (1.0 - unmasked_weight) * m for m in masks])


def conditioning(
    base: BaseModel, encoders: list[torch.nn.Module], text_cache: TextCache | None, captions: list[str],
    crops: list, clip_skip: int, device: torch.device,
) -> tuple[torch.Tensor, dict | None]:  # fmt: skip
    """The UNet's text conditioning of a batch: cached embeddings where every caption has one, else through
    `encoders` (the trained, possibly DDP-wrapped ones, so their gradients are synchronised); SDXL adds its
    pooled embedding and micro-conditioning (original size, crop, target size)."""
    entries = [text_cache.get(c) for c in captions] if text_cache is not None else [None]
    if all(e is not None for e in entries):
        encoded = {k: torch.stack([e[k] for e in entries]).to(device) for k in entries[0]}
    else:
        encoded = encode_text(base, captions, clip_skip, encoders if text_cache is None else None, device)
    added = None
    if base.family == "sdxl":
        time_ids = torch.tensor([[*c.original_size, *c.crop_top_left, *c.target_size] for c in crops], device=device,
                                dtype=encoded["hidden"].dtype)  # fmt: skip
        added = {"text_embeds": encoded["pooled"], "time_ids": time_ids}
    return encoded["hidden"], added


def predict(
    unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
    timesteps: torch.Tensor, hidden: torch.Tensor, added: dict | None, weight_dtype: torch.dtype = torch.float32,
    autocast=nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(prediction, target) of `unet` on `latents` noised with `noise` at `timesteps`: the noise, or the velocity
    for a v-prediction model. `autocast` is the run's mixed precision context (accelerate's)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    with autocast():
        pred = unet(
            noisy.to(weight_dtype), timesteps, encoder_hidden_states=hidden.to(weight_dtype), added_cond_kwargs=added
        ).sample
    return pred.float(), target.float()


def diffusion_loss(
    unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor, hidden: torch.Tensor, added: dict | None,
    draws: list[Draw], optim: OptimConfig, weight_dtype: torch.dtype = torch.float32, autocast=nullcontext,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Each sample's noise-prediction (or v-prediction) MSE, with its noise and timestep from its own draws;
    offset noise and min-SNR weighting as `optim` says; `weights` (B, 1, h, w) scale each latent pixel's error
    (masked loss: a pixel of weight 0 adds nothing and gets no gradient)."""
    shape = latents.shape[1:]
    noise = torch.stack([torch.randn(shape, generator=d.gen) for d in draws]).to(latents.device)
    if optim.noise_offset:
        # Offset noise (Guttenberg 2023): lets the model learn overall brightness, i.e. very dark/bright images.
        offset = torch.stack([torch.randn((shape[0], 1, 1), generator=d.gen) for d in draws]).to(latents.device)
        noise = noise + optim.noise_offset * offset
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, steps, (1,), generator=d.gen) for d in draws]).to(latents.device)
    pred, target = predict(unet, scheduler, latents, noise, timesteps, hidden, added, weight_dtype, autocast)
    per_sample = masked_mse(pred, target, weights)
    if optim.min_snr_gamma:
        # Min-SNR-gamma weighting (Hang et al. 2023); the v-prediction form divides by SNR + 1.
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=optim.min_snr_gamma)
        v_prediction = scheduler.config.prediction_type == "v_prediction"
        per_sample = per_sample * (clipped / (snr + 1 if v_prediction else snr))
    return per_sample


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean squared error, each latent pixel weighted (as kohya's masked loss: the mean over every
    pixel, so a half-masked image contributes about half)."""
    error = F.mse_loss(pred, target, reduction="none")
    return (error if weights is None else error * weights).mean(dim=(1, 2, 3))


def batch_losses(session: Session, indices: list[int], draws: list[Draw]) -> torch.Tensor:
    """Each sample's loss on one batch with the session's models, data and settings: the glue between a run and
    the maths."""
    config, base, device = session.config, session.base, session.device
    latents, captions, crops, weights = batch_latents(base.vae, session.latent_cache, config.dataset, session.items,
                                                      session.buckets, indices, draws, device)  # fmt: skip
    encoders = [session.models.get(name, e) for name, e in zip(TEXT_ENCODER_NAMES, base.text_encoders, strict=False)]
    hidden, added = conditioning(base, encoders, session.text_cache, captions, crops, config.clip_skip, device)
    losses = diffusion_loss(session.models["unet"], session.noise_scheduler, latents, hidden, added, draws,
                            config.optimizer, session.weight_dtype, session.accelerator.autocast, weights)  # fmt: skip
    prior = config.regularization.prior_loss_weight
    if prior != 1.0 and any(session.items[i].regularization for i in indices):
        scale = [prior if session.items[i].regularization else 1.0 for i in indices]
        losses = losses * torch.tensor(scale, device=losses.device)
    return losses


def batch_loss(session: Session, indices: list[int], draws: list[Draw]) -> torch.Tensor:
    """The batch's mean loss: what the optimizer minimises."""
    return batch_losses(session, indices, draws).mean()


def training_step(session: Session, indices: list[int], micro: int = 0) -> torch.Tensor:
    """One micro-batch: forward, backward, and (when accumulation completes) an optimizer step.

    Returns each sample's loss, detached and still on the device: reading it waits for the GPU, which the loop
    does only now and then (`loss_reads`)."""
    seed = session.config.seed
    draws = sample_draws(seed, session.step, micro, indices)
    torch.manual_seed(seed * 1_000_003 + session.step * 101 + micro)  # LoRA dropout draws from the global RNG
    if session.config.torch_compile and session.config.compile_mode == "reduce-overhead":
        # The last step's graph outputs may now be overwritten: nothing keeps them (the losses left on the device
        # for loss_reads are computed from them outside the graph, in tensors of their own).
        torch.compiler.cudagraph_mark_step_begin()
    with session.accelerator.accumulate(*session.models.values()):
        losses = batch_losses(session, indices, draws)
        loss = losses.mean()
        session.accelerator.backward(loss)
        if session.accelerator.sync_gradients and session.config.optimizer.max_grad_norm:
            clip_to = session.config.optimizer.max_grad_norm
            session.accelerator.clip_grad_norm_(lora_parameters(session.optimizer), clip_to)
        session.optimizer.step()
        if session.ema is not None and session.accelerator.sync_gradients:
            session.ema.step(lora_parameters(session.optimizer))
        session.lr_scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
    return losses.detach()
