"""The optimizer and the learning-rate schedule of a run, built from its config."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from .config import TrainConfig
from .lora import block_lr_weight
from .models import BaseModel
from .session import TrainingError

ADAM_BETAS = (0.9, 0.999)  # torch's AdamW, Prodigy and schedule-free AdamW default to these
LION_BETAS = (0.9, 0.99)  # lion-pytorch's default, the paper's choice for most tasks


PARTS = ("unet", "text_encoders")  # each parameter group's "part", in parameter_groups' order


def is_up_weight(name: str) -> bool:
    """Whether a trained parameter is a LoRA up (B) matrix, by peft's name for it."""
    return ".lora_B." in name


def parameter_groups(config: TrainConfig, base: BaseModel) -> list[dict]:
    """The trained parameters by learning rate: the UNet's, then the text encoders' when they train. With LoRA+
    a part is two groups, as kohya's: the rest (down matrices, DoRA magnitudes) at the part's rate, then the up
    matrices at the part's LoRA+ ratio times it. With `lora.block_lr_weights` the UNet's parameters are grouped by
    their block's multiplier too (those at 1 first: the rate the log shows is the first group's)."""
    opt = config.optimizer
    unet_ratio, text_ratio = config.lora.loraplus_ratios()
    parts = [([base.unet], opt.unet_lr or opt.learning_rate, unet_ratio)]
    if config.lora.train_text_encoder:
        parts.append((base.text_encoders, opt.text_encoder_lr or opt.learning_rate, text_ratio))
    groups = []
    for index, (models, lr, ratio) in enumerate(parts):
        named = [(n, p) for m in models for n, p in m.named_parameters() if p.requires_grad]
        by_weight: dict[tuple[float, bool], list] = {}
        for name, param in named:
            weight = block_weight_of(name, config, base) if index == 0 else 1.0
            by_weight.setdefault((weight, bool(ratio) and is_up_weight(name)), []).append(param)
        for (weight, up), params in sorted(by_weight.items(), key=lambda kv: (kv[0][1], kv[0][0] != 1.0)):
            groups.append({"params": params, "lr": lr * weight * (ratio if up else 1.0), "part": PARTS[index]})
    return groups


def block_weight_of(name: str, config: TrainConfig, base: BaseModel) -> float:
    """The block learning-rate multiplier of a trained UNet parameter (peft's name: LAYER.lora_A.default.weight)."""
    if not config.lora.block_lr_weights:
        return 1.0
    layer = name.split(".lora_")[0].split(".hada_")[0].split(".lokr_")[0]
    unet_config = base.unet.config if base.family == "sdxl" else None
    return block_lr_weight(layer, config.lora.block_lr_weights, unet_config)


def make_optimizer(config: TrainConfig, base: BaseModel, device: torch.device) -> torch.optim.Optimizer:
    opt = config.optimizer
    groups = parameter_groups(config, base)
    adam_betas, lion_betas = opt.betas or ADAM_BETAS, opt.betas or LION_BETAS
    if opt.optimizer == "adamw":
        # One fused kernel per step instead of a dozen per tensor: LoRA has hundreds of small tensors.
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, betas=adam_betas, eps=opt.eps, weight_decay=opt.weight_decay, fused=fused)
    if opt.optimizer in ("adamw8bit", "lion8bit"):
        if device.type != "cuda":
            raise TrainingError(f"{opt.optimizer} (bitsandbytes) needs a CUDA GPU; on this device use optimizer = "
                                f"'{opt.optimizer.removesuffix('8bit')}'")  # fmt: skip
        bnb = _optional_import("bitsandbytes", "bitsandbytes")
        if opt.optimizer == "lion8bit":
            return bnb.optim.Lion8bit(groups, betas=lion_betas, weight_decay=opt.weight_decay)
        return bnb.optim.AdamW8bit(groups, betas=adam_betas, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.optimizer == "prodigy":
        prodigyopt = _optional_import("prodigyopt", "prodigyopt")
        return prodigyopt.Prodigy(groups, betas=adam_betas, eps=opt.eps, weight_decay=opt.weight_decay,
                                  d_coef=opt.prodigy_d_coef, use_bias_correction=opt.prodigy_bias_correction,
                                  safeguard_warmup=opt.prodigy_safeguard_warmup)  # fmt: skip
    if opt.optimizer == "dadapt_adam":
        dadaptation = _optional_import("dadaptation", "dadaptation")
        return dadaptation.DAdaptAdam(groups, betas=adam_betas, eps=opt.eps, weight_decay=opt.weight_decay,
                                      decouple=True)  # fmt: skip
    if opt.optimizer == "lion":
        lion_pytorch = _optional_import("lion_pytorch", "lion-pytorch")
        return lion_pytorch.Lion(groups, betas=lion_betas, weight_decay=opt.weight_decay)
    if opt.optimizer == "adamw_schedulefree":
        schedulefree = _optional_import("schedulefree", "schedulefree")
        optimizer = schedulefree.AdamWScheduleFree(
            groups, betas=adam_betas, eps=opt.eps, weight_decay=opt.weight_decay, warmup_steps=opt.lr_warmup_steps
        )
        optimizer.train()  # it starts in eval mode and refuses to step there
        return optimizer
    from transformers.optimization import Adafactor

    # External learning rate, no relative steps: the settings kohya documents for LoRA with Adafactor.
    return Adafactor(
        groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=opt.weight_decay
    )


def current_rate(optimizer: torch.optim.Optimizer, lr_scheduler) -> float:
    """The first group's learning rate as the last step used it: schedule-free warms up inside the optimizer,
    where the constant schedule cannot see it, and Prodigy and D-Adaptation step by their estimate d times the
    scheduled rate (what kohya logs as d*lr; the rate itself stays at its 1.0)."""
    group = getattr(optimizer, "optimizer", optimizer).param_groups[0]
    if group.get("scheduled_lr"):
        return float(group["scheduled_lr"])
    if "d" in group:  # Prodigy and D-Adaptation keep their estimate d in each group
        return float(group["d"]) * lr_scheduler.get_last_lr()[0]
    return lr_scheduler.get_last_lr()[0]


def _optional_import(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        raise TrainingError(
            f"the {package} optimizer is not installed; run `pip install {package}` "
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
    if opt.optimizer == "adamw_schedulefree":  # the optimizer warms up by itself and needs no schedule
        scheduler = get_scheduler("constant", optimizer)
    else:
        scheduler = get_scheduler(
            opt.lr_scheduler,
            optimizer,
            num_warmup_steps=opt.lr_warmup_steps * processes,
            num_training_steps=total * processes,
            num_cycles=opt.lr_scheduler_num_cycles,
            power=opt.lr_scheduler_power,
        )
    if opt.text_encoder_steps:
        stop_text_encoders(scheduler, optimizer, opt.text_encoder_steps * processes)
    return scheduler


def stop_text_encoders(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer,
                       after: int) -> None:  # fmt: skip
    """The text encoders' groups at rate 0 from scheduler step `after` on (`optimizer.text_encoder_steps`). Every
    schedule diffusers builds is a LambdaLR with one factor function per group; theirs gets a cut-off. A rate of 0
    leaves the weights exactly as they are with AdamW (its decoupled decay is lr x decay too), Adafactor and Lion;
    the config refuses the others this setting (`TrainConfig.text_encoder_stop_problems`). The gradients are still
    computed, so a DDP run keeps every parameter in use."""
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    scheduler.lr_lambdas = [
        (lambda step, factor=factor: factor(step) if step < after else 0.0) if group.get("part") == "text_encoders"
        else factor
        for factor, group in zip(scheduler.lr_lambdas, groups, strict=True)
    ]
