"""An exponential moving average of the LoRA weights (diffusers' `EMAModel`), and lending it to samples, the
validation loss and the saved files; likewise a schedule-free optimizer's own average (`schedule_free_average`).

The average lives beside the live weights: training always steps the live ones, and `ema_weights` swaps the
average in for the length of a block (a sample, a validation pass, a file write), then puts the live weights
back bit for bit. The average and its step count are part of the resumable state, so a resume stays exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel

from .config import LoraConfig


def lora_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """Every trained parameter, in the optimizer's fixed order (the order the average's shadow copies follow)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def make_ema(settings: LoraConfig, optimizer: torch.optim.Optimizer) -> EMAModel | None:
    """The average of the optimizer's parameters when `lora.ema_decay` is set, else None."""
    if not settings.ema_decay:
        return None
    return EMAModel(lora_parameters(optimizer), decay=settings.ema_decay, use_ema_warmup=settings.ema_warmup)


def load_ema(ema: EMAModel, state: dict, settings: LoraConfig, device: torch.device) -> None:
    """A saved average back in place, on the training device, with this run's decay settings (a resume may change
    them; the average itself and its step count are the saved ones)."""
    ema.load_state_dict(state)
    ema.to(device)
    ema.decay, ema.use_ema_warmup = settings.ema_decay, settings.ema_warmup


@contextmanager
def ema_weights(ema: EMAModel | None, optimizer: torch.optim.Optimizer, use: bool = True) -> Iterator[None]:
    """The averaged weights in the model while the block runs (when there is an average and `use`), the live ones
    restored after, exactly."""
    if ema is None or not use:
        yield
        return
    params = lora_parameters(optimizer)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer trains at one point and saves another (schedule-free: `train()`/`eval()` switch)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one
    return type(inner).__module__.startswith("schedulefree.")


@contextmanager
def schedule_free_average(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """A schedule-free optimizer's averaged weights (its `eval()` point, the ones to sample, judge and save) in
    the model while the block runs, and the weights being trained put back after, bit for bit.

    `train()` after `eval()` returns to the training point only within rounding; restoring a copy keeps an
    interrupted and resumed run equal to one that never stopped. Other optimizers: nothing changes."""
    if not is_schedule_free(optimizer):
        yield
        return
    params = lora_parameters(optimizer)
    training_point = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, saved in zip(params, training_point, strict=True):
                param.copy_(saved)
