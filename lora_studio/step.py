"""The maths of one training step: per-sample random draws, latents, text conditioning, the diffusion loss.

Every random draw of a step (captions, crops, flips, noise, timesteps, dropout) comes from generators
seeded by (seed, step, micro-batch, sample), so a resumed run repeats exactly what an uninterrupted run
would have done: on the CPU the final LoRA weights are bit-identical.
"""

from __future__ import annotations

import hashlib
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from . import buckets as bucketing
from .cache import LatentCache, LatentEntry, TextCache, encode_pixels
from .conditioning import WINDOW, encode_captions
from .config import DatasetConfig, OptimConfig
from .data import Item, bucket_mask, build_caption, make_step_sample
from .ema import lora_parameters
from .lora import cap_update_norms
from .models import TEXT_ENCODER_NAMES, BaseModel, to_device
from .session import Session, TrainingError


def encode_text(
    base: BaseModel,
    captions: list[str],
    clip_skip: int,
    encoders: list[torch.nn.Module] | None = None,
    device: torch.device | None = None,
    max_tokens: int = WINDOW,
    emphasis: bool = False,
) -> dict[str, torch.Tensor]:
    """Conditioning for a batch of captions (conditioning.encode_captions) through the base's tokenizers and
    `encoders` (default: its own; training passes the prepared, possibly DDP-wrapped ones)."""
    encoders = encoders or base.text_encoders
    device = device or next(encoders[0].parameters()).device  # the UNet may be parked elsewhere (low_vram)
    return encode_captions(base.tokenizers, encoders, captions, clip_skip, base.family == "sdxl", device, max_tokens,
                           emphasis)  # fmt: skip


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
    latent_cache: LatentCache, item: Item, bucket: bucketing.Bucket, index: int, dataset: DatasetConfig,
    rng: random.Random,
) -> dict[str, torch.Tensor]:
    resized, crop = bucketing.plan_crop(item.width, item.height, bucket, False, random.Random(0))
    flip = dataset.for_subset(item.subset).flip_aug and rng.random() < 0.5
    cached = latent_cache.get(item, LatentEntry(index, bucket, resized, crop, flip))
    if cached is None:
        raise TrainingError(f"the latent cache lost the entry of {item.path}; delete the cache folder and rerun")
    return {**cached, "crop": crop}


def batch_latents(
    vae: torch.nn.Module, latent_cache: LatentCache | None, dataset: DatasetConfig, items: list[Item],
    buckets: list[bucketing.Bucket], indices: list[int], draws: list[Draw], device: torch.device, epoch: int = 0,
) -> tuple:  # fmt: skip
    """Scaled latents of a batch (from the cache, or one VAE batch), each sample's caption and crop (SDXL
    conditioning), and the loss weights of masked loss (None without). `items`, `buckets` are the whole dataset's;
    `indices` pick the batch; `epoch` (from 0) is the one it belongs to, for caption_dropout_every_n_epochs."""
    if latent_cache is not None:
        entries = [cached_latent(latent_cache, items[i], buckets[i], i, dataset, d.rng)
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
    every = dataset.caption_dropout_every_n_epochs
    if every and (epoch + 1) % every == 0:  # kohya counts epochs from 1: epochs N, 2N, ... drop every caption
        captions = ["" for _ in captions]
    latents = mean + std * torch.stack([torch.randn(mean.shape[1:], generator=d.gen) for d in draws])
    latents = (latents - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    weights = loss_weights(masks, dataset.unmasked_weight, mean.shape)
    return to_device(latents, device), captions, crops, None if weights is None else to_device(weights, device)


def loss_weights(masks: list[torch.Tensor | None], unmasked_weight: float, shape: torch.Size) -> torch.Tensor | None:
    """Per-latent-pixel loss weights (B, 1, h, w) from the batch's masks: unmasked_weight + (1 - unmasked_weight) x
    mask, and 1 for an image without a mask; None when no image of the batch has one (the plain loss)."""
    if all(m is None for m in masks):
        return None
    full = torch.ones((1, *shape[-2:]))
    return torch.stack([full if m is None else unmasked_weight + (1.0 - unmasked_weight) * m for m in masks])


def conditioning(
    base: BaseModel, encoders: list[torch.nn.Module], text_cache: TextCache | None, captions: list[str],
    crops: list, clip_skip: int, device: torch.device, max_tokens: int = WINDOW, emphasis: bool = False,
) -> tuple[torch.Tensor, dict | None]:  # fmt: skip
    """The UNet's text conditioning of a batch: cached embeddings where every caption has one, else through
    `encoders` (the trained, possibly DDP-wrapped ones, so their gradients are synchronised); SDXL adds its
    pooled embedding and micro-conditioning (original size, crop, target size)."""
    entries = [text_cache.get(c) for c in captions] if text_cache is not None else [None]
    if all(e is not None for e in entries):
        encoded = {k: to_device(torch.stack([e[k] for e in entries]), device) for k in entries[0]}
    else:
        encoded = encode_text(base, captions, clip_skip, encoders if text_cache is None else None, device, max_tokens,
                              emphasis)  # fmt: skip
    added = None
    if base.family == "sdxl":
        time_ids = to_device(torch.tensor([[*c.original_size, *c.crop_top_left, *c.target_size] for c in crops],
                                          dtype=encoded["hidden"].dtype), device)  # fmt: skip
        added = {"text_embeds": encoded["pooled"], "time_ids": time_ids}
    return encoded["hidden"], added


def predict(
    unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
    timesteps: torch.Tensor, hidden: torch.Tensor, added: dict | None, weight_dtype: torch.dtype = torch.float32,
    autocast=nullcontext, input_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(prediction, target) of `unet` on `latents` noised with `noise` at `timesteps`: the noise, or the velocity
    for a v-prediction model. `autocast` is the run's mixed precision context (accelerate's). `input_noise`, when
    given, noises the input in place of `noise` (input perturbation: the target keeps `noise`)."""
    noisy = scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
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
    """Each sample's noise-prediction (or v-prediction) loss, with its noise and timestep from its own draws; the
    noise shaping (offset, multi-resolution, input perturbation), the timestep range, the loss type and the
    min-SNR / debiased weighting as `optim` says; `weights` (B, 1, h, w) scale each latent pixel's error
    (masked loss: a pixel of weight 0 adds nothing and gets no gradient).

    Each sample draws from its own generator in a fixed order: noise, offset, timestep, then the draws of the
    newer options, so a run with none of those draws exactly what it drew before they existed."""
    noise, timesteps, input_noise = shaped_noise(latents, scheduler, draws, optim)
    pred, target = predict(unet, scheduler, latents, noise, timesteps, hidden, added, weight_dtype, autocast,
                           input_noise)  # fmt: skip
    per_sample = sample_losses(pixel_losses(pred, target, optim, huber_thresholds(optim, scheduler, timesteps)),
                               weights)  # fmt: skip
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    if optim.min_snr_gamma:
        # Min-SNR-gamma weighting (Hang et al. 2023); the v-prediction form divides by SNR + 1.
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=optim.min_snr_gamma)
        per_sample = per_sample * (clipped / (snr + 1 if v_prediction else snr))
    if optim.scale_v_pred_loss_like_noise_pred or optim.v_pred_like_loss:
        # kohya's SNR scale, SNR/(SNR+1) with SNR capped at 1000 (kohya's cap for t = 0); never 0 here, as
        # zero_terminal_snr (SNR 0 at the last timestep) is refused beside v_pred_like_loss.
        snr = torch.clamp(compute_snr(scheduler, timesteps), max=1000.0)
        scale = snr / (snr + 1)
        if optim.scale_v_pred_loss_like_noise_pred:
            per_sample = per_sample * scale
        if optim.v_pred_like_loss:
            per_sample = per_sample + per_sample / scale * optim.v_pred_like_loss
    if optim.debiased_estimation:
        # Debiased estimation (Yu et al. 2024, kohya's form): 1/sqrt(SNR), SNR capped at 1000; 1/(SNR+1) for v.
        snr = torch.clamp(compute_snr(scheduler, timesteps), max=1000.0)
        per_sample = per_sample * (1.0 / (snr + 1) if v_prediction else 1.0 / torch.sqrt(snr))
    return per_sample


def shaped_noise(latents: torch.Tensor, scheduler: DDPMScheduler, draws: list[Draw], optim: OptimConfig,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Each sample's noise (offset or multi-resolution as `optim` says), timestep and, with input perturbation,
    the noise its input gets; drawn from its own generator in a fixed order (a random strength right after the
    draw it scales, so a run without it draws as before)."""
    shape, device = latents.shape[1:], latents.device
    noise = to_device(torch.stack([torch.randn(shape, generator=d.gen) for d in draws]), device)
    if optim.noise_offset:
        # Offset noise (Guttenberg 2023): lets the model learn overall brightness, i.e. very dark/bright images.
        offset = to_device(torch.stack([torch.randn((shape[0], 1, 1), generator=d.gen) for d in draws]), device)
        strength = random_strengths(optim.noise_offset, optim.noise_offset_random_strength, draws, device)
        if optim.adaptive_noise_scale:
            # kohya's adaptive noise scale: each channel's offset grows with |its mean|, never below 0.
            means = latents.mean(dim=(2, 3), keepdim=True).abs()
            strength = torch.clamp(strength + optim.adaptive_noise_scale * means, min=0.0)
        noise = noise + strength * offset
    low, high = optim.min_timestep, min(optim.max_timestep, scheduler.config.num_train_timesteps)
    timesteps = to_device(torch.cat([torch.randint(low, high, (1,), generator=d.gen) for d in draws]), device)
    if optim.multires_noise_iterations:
        noise = torch.stack([pyramid_noise(n, d, optim.multires_noise_iterations, optim.multires_noise_discount)
                             for n, d in zip(noise, draws, strict=True)])  # fmt: skip
    input_noise = None
    if optim.ip_noise_gamma:
        extra = to_device(torch.stack([torch.randn(shape, generator=d.gen) for d in draws]), device)
        gamma = random_strengths(optim.ip_noise_gamma, optim.ip_noise_gamma_random_strength, draws, device)
        input_noise = noise + gamma * extra
    return noise, timesteps, input_noise


def random_strengths(strength: float, random: bool, draws: list[Draw], device: torch.device) -> torch.Tensor | float:
    """`strength`, or with `random` each sample's own uniform draw in [0, strength) (kohya's *_random_strength;
    kohya draws one per batch, one per sample here, so a sample's draw does not depend on its batch), shaped
    (B, 1, 1, 1)."""
    if not random:
        return strength
    return strength * to_device(torch.stack([torch.rand((1, 1, 1), generator=d.gen) for d in draws]), device)


def pyramid_noise(noise: torch.Tensor, draw: Draw, iterations: int, discount: float) -> torch.Tensor:
    """kohya's multi-resolution noise for one sample (C, H, W): levels of noise drawn at ever coarser sizes (each a
    random 2-4x smaller than the last), upsampled and added with weight discount**level, then scaled back to unit
    standard deviation. As kohya's, level 0 is a second full-size noise. Scaled per sample, not per batch, so a
    sample's noise does not depend on the batch it is in."""
    channels, height, width = noise.shape
    total = noise
    for level in range(iterations):
        ratio = draw.rng.random() * 2 + 2
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = to_device(torch.randn((1, channels, *size), generator=draw.gen), noise.device)
        total = total + F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * discount**level
        if 1 in size:
            break  # the coarsest level is one pixel wide
    return total / total.std()


def huber_thresholds(optim: OptimConfig, scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
    """Each sample's pseudo-Huber threshold for its timestep, by kohya's schedules; None for the l2 and l1 losses."""
    if optim.loss_type not in ("huber", "smooth_l1"):
        return None
    if optim.huber_schedule == "exponential":
        decay = -math.log(optim.huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-decay * timesteps.float()) * optim.huber_scale
    if optim.huber_schedule == "snr":
        alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1 - optim.huber_c) / (1 + sigmas) ** 2 + optim.huber_c
    return torch.full(timesteps.shape, optim.huber_c * optim.huber_scale, device=timesteps.device)


def pixel_losses(pred: torch.Tensor, target: torch.Tensor, optim: OptimConfig,
                 thresholds: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The loss of each latent pixel: squared error, absolute error, or kohya's pseudo-Huber forms with each
    sample's threshold c: huber = 2c(sqrt(e^2 + c^2) - c), smooth_l1 = 2(sqrt(e^2 + c^2) - c)."""
    if optim.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if optim.loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = thresholds.view(-1, *([1] * (pred.ndim - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if optim.loss_type == "huber" else 2 * root


def sample_losses(error: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean of its per-pixel losses, each latent pixel weighted (as kohya's masked loss: the mean
    over every pixel, so a half-masked image contributes about half)."""
    return (error if weights is None else error * weights).mean(dim=(1, 2, 3))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean squared error (sample_losses of the squared error): the validation loss, whatever loss
    the run trains with, so passes compare across runs."""
    return sample_losses(F.mse_loss(pred, target, reduction="none"), weights)


def batch_losses(session: Session, indices: list[int], draws: list[Draw]) -> torch.Tensor:
    """Each sample's loss on one batch with the session's models, data and settings: the glue between a run and
    the maths."""
    config, base, device = session.config, session.base, session.device
    latents, captions, crops, weights = batch_latents(base.vae, session.latent_cache, config.dataset, session.items,
                                                      session.buckets, indices, draws, device,
                                                      session.position.epoch)  # fmt: skip
    encoders = [session.models.get(name, e) for name, e in zip(TEXT_ENCODER_NAMES, base.text_encoders, strict=False)]
    hidden, added = conditioning(base, encoders, session.text_cache, captions, crops, config.clip_skip, device,
                                 config.max_token_length, config.weighted_captions)  # fmt: skip
    losses = diffusion_loss(session.models["unet"], session.noise_scheduler, latents, hidden, added, draws,
                            config.optimizer, session.weight_dtype, session.accelerator.autocast, weights)  # fmt: skip
    prior = config.regularization.prior_loss_weight
    if prior != 1.0 and any(session.items[i].regularization for i in indices):
        scale = [prior if session.items[i].regularization else 1.0 for i in indices]
        losses = losses * to_device(torch.tensor(scale), losses.device)
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
        if session.config.lora.scale_weight_norms and session.accelerator.sync_gradients:
            # After the step, before the average: the EMA follows the capped weights (kohya caps after each step).
            cap_update_norms(session.models.values(), session.config.lora.scale_weight_norms)
        if session.ema is not None and session.accelerator.sync_gradients:
            session.ema.step(lora_parameters(session.optimizer))
        session.lr_scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
    return losses.detach()
