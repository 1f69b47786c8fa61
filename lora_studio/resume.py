"""The resumable state: everything a resume needs in one safetensors file, and loading it back exactly.

The state is written whole or not at all (one file, temp name, rename), so a failed save leaves the
last complete state. A resume with settings that change the state's shape is refused before anything
is written, and a state saved by N processes resumes on M with its rate schedule rescaled.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from . import buckets as bucketing
from .config import TrainConfig, load_config, save_config
from .ema import load_ema
from .fsutil import WriteError
from .runs import RunFolder
from .session import Session, TrainingError, trained_models
from .state import load_state, restore_rng_state, rng_state, save_state

log = logging.getLogger(__name__)


# Settings that give the saved state its shape: a resume with other values cannot load it.
RESUME_FIXED = ("lora.rank", "lora.conv_rank", "lora.unet_targets", "lora.train_text_encoder",
                "lora.text_encoder_targets", "lora.use_dora", "lora.network", "lora.lokr_factor",
                "lora.include_modules", "lora.exclude_modules", "lora.block_ranks", "lora.loraplus_lr_ratio",
                "lora.loraplus_unet_lr_ratio", "lora.loraplus_text_encoder_lr_ratio",
                "optimizer.optimizer", "clip_skip")  # fmt: skip


def check_resumable(config: TrainConfig, run: RunFolder) -> None:
    """Refuse, before anything is written, a resume whose settings change the saved state's shape."""
    started = load_config(run.config)
    changed = [
        f"`{key}` from {setting(started, key)!r} to {setting(config, key)!r}"
        for key in RESUME_FIXED
        if setting(started, key) != setting(config, key)
    ]
    if changed:
        raise TrainingError(
            f"{run.path} cannot resume with {', '.join(changed)}: its saved LoRA and optimizer state have the "
            "run's own; resume without changing them, or start a new run with the new settings"
        )


def setting(config: TrainConfig, key: str):
    """The value at a dotted config path, e.g. "lora.rank"."""
    return functools.reduce(getattr, key.split("."), config)


def record_config(config: TrainConfig, run: RunFolder) -> None:
    save_config(config, run.config, header=f"resolved config of run {run.name}")


def lora_state_dicts(session: Session) -> dict[str, dict[str, torch.Tensor]]:
    return {name: get_peft_model_state_dict(model) for name, model in trained_models(session).items()}


def save_trainer_state(session: Session, path: Path) -> None:
    """Everything a resume needs, in one file written under a temp name and renamed into place.

    One file, so a failed write (a full disk, a kill) leaves the previous complete state: never the
    LoRA of one step beside the optimizer and position of another, which would resume wrongly without a
    word. The state is fp32 LoRA weights, optimizer, scheduler, RNG, data position and fp16 loss scale."""
    scaler = session.accelerator.scaler  # fp16 on a GPU: the loss scale and its growth count
    state = {
        "lora": {f"{part}/{k}": v for part, sd in lora_state_dicts(session).items() for k, v in sd.items()},
        **({"grad_scaler": scaler.state_dict()} if scaler is not None else {}),
        **({"ema": session.ema.state_dict()} if session.ema is not None else {}),
        "step": session.step,
        "epoch": session.position.epoch,
        "batch": session.position.batch,
        "smoothed_loss": session.smoothed_loss,
        "optimizer": session.optimizer.state_dict(),
        "lr_scheduler": session.lr_scheduler.state_dict(),
        "processes": session.accelerator.num_processes,
        "rng": rng_state(),
    }
    save_state(state, path)


def write_failure(session: Session, exc: WriteError) -> TrainingError:
    """A failed save during training (full disk, read-only folder) as the one sentence that says how to go on."""
    hint = "free disk space" if exc.full_disk else "make the folder writable"
    return TrainingError(
        f"could not save {exc.target} at step {session.step}: {exc.strerror}; {hint}, then continue with "
        f"`lora-studio train --resume {session.run_dir}` (it goes on from the last state that was saved whole)"
    )


def resume(session: Session) -> None:
    """Load the LoRA weights, optimizer, scheduler, RNG and data position saved in state/."""
    run = session.run
    if not run.state_file.is_file():
        raise TrainingError(f"{run.path} has no saved state to resume from; start a new run instead")
    trainer = read_trainer_state(run.state_file)
    # Runs before 2026-11-28 kept the LoRA in a second file.
    lora = trainer["lora"] if "lora" in trainer else read_trainer_state(run.legacy_lora_state)["lora"]
    try:
        load_trained_state(session, lora, trainer)
    except (RuntimeError, ValueError, KeyError) as exc:  # what torch and peft raise for a state of another shape
        lines = str(exc).strip().splitlines()  # torch: a heading line, then the first mismatch
        reason = " ".join(line.strip() for line in lines[:2])[:300]
        raise TrainingError(
            f"the saved state of {session.run_dir} does not fit this run's model and settings ({reason}); resume "
            "with the base model and settings the run started with (its config.toml), or start a new run"
        ) from exc
    restore_rng_state(trainer["rng"])
    session.step = session.saved_step = trainer["step"]
    session.position = bucketing.Position(trainer["epoch"], trainer["batch"])
    session.smoothed_loss = trainer["smoothed_loss"]
    if session.accelerator.is_main_process:
        record_config(session.config, session.run)  # with this segment's --set changes, now that they fit
    log.info("resumed %s at step %d", session.run_dir, session.step)


def load_trained_state(session: Session, lora: dict, trainer: dict) -> None:
    for name, model in trained_models(session).items():
        part = {k.split("/", 1)[1]: v for k, v in lora.items() if k.startswith(name + "/")}
        incompatible = set_peft_model_state_dict(model, part)
        if incompatible.unexpected_keys:  # saved weights this model has no place for (another family)
            raise ValueError(f"{len(incompatible.unexpected_keys)} saved {name} LoRA weights have no place here")
    session.optimizer.load_state_dict(trainer["optimizer"])
    session.lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    rescale_schedule(session, trainer.get("processes", 1))  # states from before it was saved: one process
    if session.accelerator.scaler is not None and "grad_scaler" in trainer:
        session.accelerator.scaler.load_state_dict(trainer["grad_scaler"])
    if session.ema is not None and "ema" in trainer:  # a state without one (EMA newly on) starts from these weights
        load_ema(session.ema, trainer["ema"], session.config.lora, session.device)


def read_trainer_state(path: Path) -> dict:
    try:
        return load_state(path)
    except Exception as exc:  # safetensors and the structure decoder raise several kinds
        raise TrainingError(
            f"the saved state {path} cannot be read ({type(exc).__name__}: {exc}); the run cannot continue "
            "from it: start a new run, or train from one of its checkpoints/ LoRA files"
        ) from exc


def rescale_schedule(session: Session, saved_processes: int) -> None:
    """Put a resumed schedule at the same point of its curve when the number of processes changed.

    The schedule counts one step per process per optimizer step (see make_lr_scheduler), so a state
    saved by 2 processes sits at twice the count a single process would use for the same step."""
    processes = session.accelerator.num_processes
    if saved_processes != processes:
        scheduler = getattr(session.lr_scheduler, "scheduler", session.lr_scheduler)  # inside accelerate's wrapper
        scheduler.last_epoch = scheduler.last_epoch * processes // saved_processes
        log.info("resumed a run of %d processes on %d: rescaled its rate schedule", saved_processes, processes)
