"""One training run in memory: its config, run folder, model, data, optimizer and position.

Shared by the phases: `train.py` (prepare, loop), `step.py` (one step's maths), `resume.py` (the
resumable state) and `outputs.py` (LoRA files, checkpoints, samples).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from . import buckets as bucketing
from .cache import LatentCache, TextCache
from .config import TrainConfig
from .data import Item, ScanReport
from .ema import ema_weights, schedule_free_average
from .errors import LoraStudioError
from .events import Commands, ValidationEvent
from .models import TEXT_ENCODER_NAMES, BaseModel, dtype_of
from .runs import RunFolder, RunLock

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from .validation import ValidationSet

log = logging.getLogger(__name__)


class TrainingError(LoraStudioError):
    """Training cannot start or had to stop; the message says why and what to do."""


@dataclass
class ImageLosses:
    """Each training image's loss over the epoch so far (the Dataset tab lists the highest first, to find mislabelled
    or odd images). Losses of one epoch are averaged per image and written when it ends."""

    current: dict[int, list[float]] = field(default_factory=dict)

    def add(self, indices: list[int], losses: list[float]) -> None:
        for index, loss in zip(indices, losses, strict=True):
            self.current.setdefault(index, []).append(loss)

    def take(self) -> dict[int, float]:
        """The epoch's mean loss per item index, and a fresh start for the next epoch."""
        means = {index: sum(losses) / len(losses) for index, losses in self.current.items()}
        self.current = {}
        return means


@dataclass
class Session:
    config: TrainConfig
    run: RunFolder
    accelerator: Accelerator
    base: BaseModel
    report: ScanReport
    buckets: list[bucketing.Bucket]
    latent_cache: LatentCache | None
    text_cache: TextCache | None
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    resolution: int
    models: dict[str, torch.nn.Module]  # the trained parts as accelerate prepared them (DDP-wrapped on several GPUs)
    on_event: Callable | None = None
    commands: Commands = field(default_factory=Commands)
    lock: RunLock | None = None  # held by the main process while it trains this run
    step: int = 0
    position: bucketing.Position = field(default_factory=bucketing.Position)  # of the next batch to train on
    smoothed_loss: float | None = None
    tensorboard: object | None = None  # a SummaryWriter when the tensorboard package is installed
    started_at: float = field(default_factory=time.time)  # wall clock, for the file's ss_training_started_at
    saved_step: int | None = None  # the step of the last state saved whole in state/ (what a resume continues)
    offloaded: dict[str, torch.nn.Module] = field(default_factory=dict)  # frozen parts kept off the device
    validation: ValidationSet | None = None  # the held-out images, on the main process when validation is on
    last_validation: ValidationEvent | None = None  # the newest validation pass (main process)
    validated_step: int | None = None  # the step of the newest validation pass (every process)
    image_losses: ImageLosses = field(default_factory=ImageLosses)
    ema: EMAModel | None = None  # the average of the LoRA weights, with lora.ema_decay

    @contextmanager
    def averaged(self, use_ema: bool = True) -> Iterator[None]:
        """The weights samples, validation and files see, in the trained parts while the block runs: a
        schedule-free optimizer's average (always), or the EMA when there is one and `use_ema`; the weights being
        trained are back after, exactly. (The config refuses the two averages together.)"""
        with schedule_free_average(self.optimizer), ema_weights(self.ema, self.optimizer, use_ema):
            yield

    @property
    def items(self) -> list[Item]:
        return self.report.items

    @property
    def device(self) -> torch.device:
        # The accelerator's, not `unet.device`: diffusers computes that by walking every module (slow per step).
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        return dtype_of(self.config.mixed_precision)

    @property
    def run_dir(self):
        return self.run.path


def offloadable_parts(config: TrainConfig, base: BaseModel) -> dict[str, torch.nn.Module]:
    """The base's modules for `config.frozen_parts_off_device()`, by diffusers' component names."""
    off = config.frozen_parts_off_device()
    parts = {"vae": base.vae} if "vae" in off else {}
    if "text_encoders" in off:
        parts |= dict(zip(TEXT_ENCODER_NAMES, base.text_encoders, strict=False))
    return parts


def offload_frozen_parts(session: Session, to: torch.device | str = "cpu") -> None:
    """Move the parts no step needs off the training device (issue 17's low-VRAM mode: on an SDXL card the
    VAE and both text encoders are ~1.7 GB in fp16 that the UNet's activations can use instead). Samples
    bring them back for the rendering (`frozen_parts_on_device`). A no-op when training on the CPU."""
    if session.device.type == "cpu" and torch.device(to).type == "cpu":
        return
    session.offloaded = offloadable_parts(session.config, session.base)
    for module in session.offloaded.values():
        module.to(to)
    if session.device.type == "cuda":
        torch.cuda.empty_cache()
    if session.offloaded:
        log.info("kept off %s while training: %s", session.device, ", ".join(session.offloaded))


@contextmanager
def modules_on(modules, device: torch.device | str):
    """`modules` on `device` while the block runs, each back where it was after (and the CUDA cache freed)."""
    modules = [m for m in modules if next(m.parameters()).device != torch.device(device)]
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            module.to(home)
        if torch.cuda.is_available() and modules:
            torch.cuda.empty_cache()


def frozen_parts_on_device(session: Session):
    """The offloaded parts on the training device for as long as the block runs (rendering samples)."""
    return modules_on(session.offloaded.values(), session.device)


def trained_parts(config: TrainConfig, base: BaseModel) -> dict[str, torch.nn.Module]:
    """The model parts that carry trained LoRA, named as diffusers' LoRA files name them (a text encoder whose every
    layer clip skip leaves unread carries none: `lora.inject_lora`)."""
    parts = base.lora_parts(text_encoders=config.lora.train_text_encoder)
    return {name: model for name, model in parts.items() if name == "unet" or hasattr(model, "peft_config")}


def trained_models(session: Session) -> dict[str, torch.nn.Module]:
    """The trained parts without accelerate's DDP and torch.compile wrappers, named as in session.models."""
    unwrap = session.accelerator.unwrap_model
    return {name: unwrap(model, keep_torch_compile=False) for name, model in session.models.items()}


def emit(session: Session, event) -> None:
    """Deliver an event; a failing callback is logged and never stops training."""
    if session.on_event is None:
        return
    try:
        session.on_event(event)
    except Exception:
        log.exception("the event callback failed on %s", type(event).__name__)


def on_main(session: Session, action, *args):
    """Run a file-writing action on the main process only; every process waits for it."""
    result = action(session, *args) if session.accelerator.is_main_process else None
    session.accelerator.wait_for_everyone()
    return result
