"""The validation loss: held-out images scored at fixed noise and fixed timesteps, so two passes differ only by
the weights.

Each held-out image is encoded once (the latent distribution's mean, centre crop, no flip), captioned without
shuffle or dropout, and given its own noise for each of `validation.timesteps` timesteps spread over the
schedule. The noise comes from a generator keyed by (seed, image content), never from the training RNG, and the
pass runs in eval mode under no_grad: a run with validation trains bit-for-bit the weights a run without it does,
and a resume stays exact. The loss is the plain MSE of the prediction (no min-SNR weighting, whatever
`optimizer.loss_type` the run trains with, so passes compare across runs), averaged over
timesteps per image and over images for the pass.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import buckets as bucketing
from .cache import encode_pixels
from .config import TrainConfig
from .data import Item, bucket_mask, bucket_pixels, validation_caption
from .events import ValidationEvent
from .models import TEXT_ENCODER_NAMES, BaseModel
from .session import Session, emit, trained_models
from .step import conditioning, loss_weights, masked_mse, predict

log = logging.getLogger(__name__)


@dataclass
class HeldOutImage:
    item: Item
    latent: torch.Tensor  # (C, h, w), scaled as the UNet sees it, on the training device
    noise: torch.Tensor  # (timesteps, C, h, w): this image's fixed noise, one per timestep
    caption: str
    crop: bucketing.Crop  # SDXL's micro-conditioning
    encoded: tuple[torch.Tensor, dict | None] | None  # the text conditioning, when the text encoders are frozen
    weights: torch.Tensor | None = None  # (1, 1, h, w) loss weights from its mask, with masked loss


@dataclass
class ValidationSet:
    images: list[HeldOutImage]
    timesteps: torch.Tensor  # the fixed timesteps every image is scored at


def fixed_timesteps(count: int, num_train_timesteps: int) -> torch.Tensor:
    """The centres of `count` equal parts of the schedule: 4 of 1000 gives 125, 375, 625, 875."""
    return torch.tensor([int((k + 0.5) * num_train_timesteps / count) for k in range(count)], dtype=torch.long)


def fixed_noise(seed: int, item: Item, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """`count` noise tensors for one image, the same in every pass and every resume (keyed by the image's bytes)."""
    key = f"{seed}-validation-{item.content_hash}"
    generator = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
    return torch.randn((count, *shape), generator=generator)


def build_validation_set(
    config: TrainConfig, base: BaseModel, items: list[Item], resolution: int, device: torch.device
) -> ValidationSet:
    """Encode the held-out images once with the base's VAE (and, when frozen, its text encoders), onto `device`;
    the first `validation.max_images` of them when that is set."""
    cap = config.validation.max_images
    if cap and len(items) > cap:
        log.info("validation: scoring the first %d of %d held-out images (validation.max_images)", cap, len(items))
        items = items[:cap]
    buckets = bucketing.assign_buckets([(i.width, i.height) for i in items], config.dataset, resolution)
    pairs = zip(items, buckets, strict=True)
    with torch.no_grad():
        images = [held_out_image(config, base, item, bucket, device) for item, bucket in pairs]
    timesteps = fixed_timesteps(config.validation.timesteps, base.scheduler.config.num_train_timesteps)
    log.info("validation: %d held-out images at timesteps %s", len(images), timesteps.tolist())
    return ValidationSet(images, timesteps.to(device))


def held_out_image(
    config: TrainConfig, base: BaseModel, item: Item, bucket: bucketing.Bucket, device: torch.device
) -> HeldOutImage:
    """One held-out image as every pass sees it: centre crop, no flip, the latent distribution's mean, its fixed
    noise, its caption without shuffle or dropout (encoded now when the text encoders are frozen), its mask."""
    vae = base.vae
    resized, crop = bucketing.plan_crop(item.width, item.height, bucket, False, random.Random(0))
    pixels = bucket_pixels(item, bucket, resized, crop, False, config.dataset.alpha_background)
    mean, _std = encode_pixels(vae, pixels[None])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latent = ((mean[0] - shift) * vae.config.scaling_factor).float()
    caption = validation_caption(item, config.dataset)
    encoded = None
    if not config.lora.train_text_encoder:
        encoded = conditioning(base, base.text_encoders, None, [caption], [crop], config.clip_skip, device,
                               config.max_token_length, config.weighted_captions)  # fmt: skip
    noise = fixed_noise(config.validation_seed, item, config.validation.timesteps, tuple(latent.shape))
    mask = bucket_mask(item, bucket, resized, crop, False, tuple(latent.shape[-2:]))
    weights = loss_weights([mask], config.dataset.unmasked_weight, latent.shape)
    return HeldOutImage(item, latent.to(device), noise.to(device), caption, crop, encoded,
                        None if weights is None else weights.to(device))  # fmt: skip


def image_loss(session: Session, image: HeldOutImage, timesteps: torch.Tensor) -> float:
    """One held-out image's MSE, averaged over the fixed timesteps."""
    return timestep_losses(session, image, timesteps).mean().item()


def timestep_losses(session: Session, image: HeldOutImage, timesteps: torch.Tensor) -> torch.Tensor:
    """One held-out image's MSE at each fixed timestep (one UNet batch of them)."""
    models, base, count = trained_models(session), session.base, len(timesteps)
    if image.encoded is not None:
        hidden, added = image.encoded
    else:
        encoders = [models.get(n, e) for n, e in zip(TEXT_ENCODER_NAMES, base.text_encoders, strict=False)]
        hidden, added = conditioning(base, encoders, None, [image.caption], [image.crop], session.config.clip_skip,
                                     session.device, session.config.max_token_length,
                                     session.config.weighted_captions)  # fmt: skip
    hidden = hidden.expand(count, *hidden.shape[1:])
    added = {k: v.expand(count, *v.shape[1:]) for k, v in added.items()} if added else None
    latents = image.latent.expand(count, *image.latent.shape)
    pred, target = predict(models["unet"], session.noise_scheduler, latents, image.noise, timesteps, hidden, added,
                           session.weight_dtype, session.accelerator.autocast)  # fmt: skip
    return masked_mse(pred, target, image.weights)


def validation_pass(session: Session) -> dict[str, float]:
    """Each held-out image's loss with the current weights, in eval mode (LoRA dropout off) and without gradients."""
    held_out = session.validation
    models = trained_models(session)
    for model in models.values():
        model.eval()
    try:
        with torch.no_grad(), session.averaged(session.config.lora.ema_for_samples):
            return {str(i.item.path): image_loss(session, i, held_out.timesteps) for i in held_out.images}
    finally:
        for model in models.values():
            model.train()


def validate(session: Session) -> ValidationEvent:
    """A validation pass at this step: logged to metrics.jsonl, TensorBoard and image_losses.json, and emitted."""
    per_image = validation_pass(session)
    loss = sum(per_image.values()) / len(per_image)
    session.run.append_metrics({"step": session.step, "epoch": session.position.epoch, "validation_loss": loss,
                                "time": round(time.time(), 3)})  # fmt: skip
    if session.tensorboard is not None:
        session.tensorboard.add_scalar("validation/loss", loss, session.step)
    session.run.record_image_losses("validation", session.step, per_image)
    event = ValidationEvent(session.step, loss, per_image)
    session.last_validation = event
    emit(session, event)
    log.info("validation loss at step %d: %.6f", session.step, loss)
    return event


def validation_due(session: Session, checkpoint: bool, epoch_before: int | None = None) -> bool:
    """After a step: every `validation.every_n_steps`, as every `validation.every_n_epochs`th epoch ends (the step
    began in `epoch_before`), and at every checkpoint (so each saved file has a score)."""
    settings = session.config.validation
    if not settings.enabled:
        return False
    by_steps = bool(settings.every_n_steps and session.step % settings.every_n_steps == 0)
    by_epochs = epoch_before is not None and bucketing.epochs_due(settings.every_n_epochs, epoch_before,
                                                                  session.position.epoch)  # fmt: skip
    return checkpoint or by_steps or by_epochs


def record_file(session: Session, lora_file: Path) -> None:
    """Note a LoRA file's validation loss in the run folder, when this step was validated."""
    done = session.last_validation
    if done is not None and done.step == session.step:
        session.run.record_validation(lora_file, session.step, done.loss)
