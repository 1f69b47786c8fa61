"""The optimizer and the learning-rate schedule of a run, built from its config."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from .config import TrainConfig
from .lora import trainable_parameters
from .models import BaseModel
from .session import TrainingError


def make_optimizer(config: TrainConfig, base: BaseModel, device: torch.device) -> torch.optim.Optimizer:
    opt = config.optimizer
    groups = [{"params": trainable_parameters(base.unet), "lr": opt.unet_lr or opt.learning_rate}]
    if config.lora.train_text_encoder:
        te_params = [p for e in base.text_encoders for p in trainable_parameters(e)]
        groups.append({"params": te_params, "lr": opt.text_encoder_lr or opt.learning_rate})
    if opt.optimizer == "adamw":
        # One fused kernel per step instead of a dozen per tensor: LoRA has hundreds of small tensors.
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, fused=fused)
    if opt.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise TrainingError("AdamW8bit (bitsandbytes) needs a CUDA GPU; on this device use optimizer = 'adamw'")
        bnb = _optional_import("bitsandbytes", "bitsandbytes")
        return bnb.optim.AdamW8bit(groups, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.optimizer == "prodigy":
        prodigyopt = _optional_import("prodigyopt", "prodigyopt")
        return prodigyopt.Prodigy(groups, betas=opt.betas, weight_decay=opt.weight_decay)
    from transformers.optimization import Adafactor

    # External learning rate, no relative steps: the settings kohya documents for LoRA with Adafactor.
    return Adafactor(
        groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=opt.weight_decay
    )


def _optional_import(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        raise TrainingError(
            f"the {module} optimizer is not installed; run `pip install {package}` "
            "(or `pip install lora-studio[optimizers]`), or choose optimizer = 'adamw'"
        ) from None


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total: int, processes: int = 1):
    """The rate schedule over `total` optimizer steps, stretched by the number of processes.

    accelerate's prepared scheduler steps once per process for every optimizer step (it assumes each
    process's dataloader shrank by that factor), so the schedule is built `processes` times longer, as
    diffusers' examples and kohya do. Every schedule here depends only on the ratios of the current,
    warm-up and total steps, so the rate at each optimizer step equals a single process's exactly.
    """
    opt = config.optimizer
    return get_scheduler(
        opt.lr_scheduler,
        optimizer,
        num_warmup_steps=opt.lr_warmup_steps * processes,
        num_training_steps=total * processes,
        num_cycles=opt.lr_scheduler_num_cycles,
    )
