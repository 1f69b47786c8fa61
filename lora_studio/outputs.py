"""What a run writes as it goes: LoRA files (final and checkpoints) and samples at several strengths."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from . import buckets as bucketing
from . import export
from .config import SampleConfig
from .data import first_caption
from .events import CheckpointEvent, SampleEvent
from .lora_file import lora_from_models
from .lora_metadata import TrainingFacts, training_metadata
from .models import dtype_of
from .resume import save_trainer_state
from .sample import PreviewSettings, infotext, render, save_png, use_sampler, vae_name
from .sample_prompts import SamplePrompt
from .session import Session, emit, frozen_parts_on_device, trained_models
from .validation import record_file

log = logging.getLogger(__name__)


def save_lora_file(session: Session, path: Path, dtype: torch.dtype | None = None) -> Path:
    """The LoRA in the configured format: kohya (loads everywhere, the default) or diffusers-native."""
    dtype = dtype or dtype_of(session.config.save.precision)
    parts = trained_models(session)
    metadata = training_metadata(session.config, training_facts(session))
    with session.averaged(session.config.lora.ema_for_files):
        if session.config.save.format == "diffusers":
            return export.save_diffusers(parts, type(session.base.pipeline), path, dtype, metadata)
        lora = lora_from_models(parts, session.base.family, session.base.unet.config)
        lora.metadata = metadata
        return export.save_kohya(lora, path, dtype)


def training_facts(session: Session) -> TrainingFacts:
    """What the LoRA file's kohya metadata reports about this run: images, folders, buckets, steps, times."""
    items, position, report = session.items, session.position, session.report
    folders: dict[str, dict[str, int]] = {}
    reg_folders: dict[str, dict[str, int]] = {}
    bucket_counts: Counter = Counter()
    for item, bucket in zip(items, session.buckets, strict=True):
        into = reg_folders if item.regularization else folders
        entry = into.setdefault(report.folder_name(item), {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
        bucket_counts[(bucket.width, bucket.height)] += item.repeats  # images per epoch, as kohya counts them
    return TrainingFacts(
        family=session.base.family,
        base_source=session.base.source,
        resolution=session.resolution,
        num_images=sum(i.repeats for i in items if not i.regularization),
        num_reg_images=sum(i.repeats for i in items if i.regularization),
        reg_dataset_dirs=reg_folders,
        max_train_steps=session.total_steps,
        session_id=int(session.started_at * 1000) % 2**31,  # kohya: a random int naming the run a file came from
        steps=session.step,
        epochs=position.epoch + (1 if position.batch else 0),
        tag_frequency=session.report.tag_frequency(),
        dataset_dirs=folders,
        buckets=[{"resolution": [w, h], "count": n} for (w, h), n in sorted(bucket_counts.items())],
        started_at=session.started_at,
        finished_at=time.time(),
        prediction_type=session.base.prediction_type,
    )


def save_checkpoint(session: Session) -> CheckpointEvent:
    """A LoRA file in checkpoints/ plus the exact state to resume from in state/."""
    config = session.config
    run = session.run
    path = save_lora_file(session, run.checkpoint(config.name, session.step))
    record_file(session, path)
    state_dir = None
    if config.save.save_state:
        state_dir = run.state_dir
        save_trainer_state(session, run.state_file)
        session.saved_step = session.step
        run.legacy_lora_state.unlink(missing_ok=True)  # where runs before 2026-11-28 kept the LoRA
    prune_checkpoints(session)
    event = CheckpointEvent(session.step, path, state_dir)
    emit(session, event)
    log.info("checkpoint at step %d: %s", session.step, path)
    return event


def prune_checkpoints(session: Session) -> None:
    """Keep the newest `save.keep_last` checkpoints and those of the last `save.keep_last_steps` steps (kohya's
    save_last_n_steps: a checkpoint of step s stays while s >= step - N), and the one with the lowest validation loss
    whatever its age."""
    save, run = session.config.save, session.run
    if not save.keep_last and not save.keep_last_steps:
        return
    files = run.checkpoint_files()
    old = set(files[:-save.keep_last]) if save.keep_last else set()
    if save.keep_last_steps:
        oldest_kept = session.step - save.keep_last_steps
        old |= {f for f in files if (step := run.checkpoint_step(f)) is not None and step < oldest_kept}
    best = run.best_lora()
    for path in sorted(old):
        if path != best:
            path.unlink()


def should_checkpoint(session: Session, epoch_before: int) -> bool:
    """After a step: every N steps, or when the step finished an epoch that is a multiple of N.

    `epoch_before` is the epoch the step started in. A step of several micro-batches or processes can
    end a few batches into the next epoch, so "finished an epoch" means the epoch number moved on."""
    save = session.config.save
    if save.every_n_steps and session.step % save.every_n_steps == 0:
        return True
    return bucketing.epochs_due(save.every_n_epochs, epoch_before, session.position.epoch)


def samples_due(sample: SampleConfig, step: int, epoch_before: int, epoch_after: int) -> bool:
    """After a step: every `sample.every_n_steps` steps, or when the step finished an epoch that is a multiple of
    `sample.every_n_epochs` (counted as checkpoints count them)."""
    if sample.every_n_steps and step % sample.every_n_steps == 0:
        return True
    return bucketing.epochs_due(sample.every_n_epochs, epoch_before, epoch_after)




def default_sample_prompt(session: Session) -> str:
    """The trigger word and the first image's caption: what the run is teaching."""
    first = session.items[0]
    caption = first_caption(first, session.config.dataset)
    trigger = session.config.dataset.trigger_word.strip()
    parts = [trigger] if trigger and trigger not in caption else []
    return ", ".join(parts + [caption or first.concept])


def render_samples(session: Session) -> SampleEvent:
    """Images at every configured strength and seed (or the prompt's own `--d` seed), into samples/step-NNNNNN/,
    with A1111 infotext; each prompt line's kohya flags override the [sample] settings for that prompt.

    Rendered in eval mode, under no_grad and inside a forked RNG, so a run with sampling trains exactly
    the weights a run without it does.
    """
    lines = session.config.sample.prompt_lines() or [SamplePrompt(default_sample_prompt(session))]
    pipeline = session.base.pipeline
    scheduler = pipeline.scheduler
    for model in session.models.values():
        model.eval()
    devices = [session.device] if session.device.type == "cuda" else []
    paths = []
    try:
        pipeline.set_progress_bar_config(disable=True)
        # Under the training autocast: the LoRA weights are fp32 beside bf16/fp16 base weights, and
        # without it their fp32 outputs reach the half-precision VAE, which refuses them.
        with (
            torch.random.fork_rng(devices=devices),
            session.accelerator.autocast(),
            frozen_parts_on_device(session),
            session.averaged(session.config.lora.ema_for_samples),
        ):
            for index, line in enumerate(lines):
                settings = prompt_settings(session, line)
                use_sampler(pipeline, settings.sampler, zero_terminal_snr=session.config.optimizer.zero_terminal_snr)
                seeds = list(session.config.sample.seeds) if line.seed is None else [line.seed]
                for r in render_prompt(session, settings, seeds):
                    path = session.run.sample_path(session.step, r.strength, r.seed, index if len(lines) > 1 else None)
                    paths.append(save_png(r.image, path, sample_infotext(session, settings, r)))
    finally:
        pipeline.scheduler = scheduler
        for model in session.models.values():
            model.train()
    event = SampleEvent(session.step, paths, list(session.config.sample.strengths))
    emit(session, event)
    return event


def prompt_settings(session: Session, line: SamplePrompt) -> PreviewSettings:
    """One prompt line's settings: its own flags, else the [sample] section's (the seed: the first of `seeds`)."""
    sample = session.config.sample
    size = (sample.width or session.resolution, sample.height or session.resolution)
    return PreviewSettings(
        prompt=line.prompt,
        negative_prompt=sample.negative_prompt if line.negative_prompt is None else line.negative_prompt,
        strengths={session.config.name: 1.0},
        sampler=line.sampler or sample.sampler,
        steps=line.num_inference_steps or sample.num_inference_steps,
        cfg=sample.guidance_scale if line.guidance_scale is None else line.guidance_scale,
        seed=sample.seeds[0] if line.seed is None else line.seed,
        width=line.width or size[0],
        height=line.height or size[1],
        clip_skip=session.config.clip_skip,
    )


def render_prompt(session: Session, settings: PreviewSettings, seeds: list[int]) -> list:
    """One prompt's images at every configured strength and each seed."""
    return render(session.base.pipeline, [settings.prompt], session.config.sample.strengths, seeds, settings.steps,
                  settings.cfg, (settings.width, settings.height), settings.negative_prompt,
                  settings.clip_skip)  # fmt: skip


def sample_infotext(session: Session, settings: PreviewSettings, rendered) -> str:
    preview = replace(settings, strengths={session.config.name: rendered.strength}, seed=rendered.seed)
    return infotext(preview, rendered.seed, {}, Path(str(session.base.source)).name,
                    vae_name(session.base)) + f", Step: {session.step}"
