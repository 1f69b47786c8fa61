"""The training loop, in phases: prepare -> (resume) -> train, one `training_step` at a time.

It runs from one `TrainConfig`, reports through `on_event`, polls `Commands` between steps and
never knows about the UI. Every random draw of a step (captions, crops, flips, noise, timesteps,
dropout) comes from generators seeded by (seed, step), so a resumed run repeats exactly what an
uninterrupted run would have done: on the CPU the final LoRA weights are bit-identical.

Run folder (DESIGN.md): config.toml, metrics.jsonl, log.txt, samples/, checkpoints/, state/ and
the final <name>.safetensors. Every file is written to a temp file and renamed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast, broadcast_object_list
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from . import buckets as bucketing
from . import export
from .cache import LatentCache, LatentEntry, TextCache, cache_folder, plan_latent_entries, text_cache_refusal
from .config import TrainConfig, load_config, save_config
from .data import Item, ScanReport, build_caption, make_step_sample, scan
from .errors import ConfigError, LoraStudioError
from .events import CheckpointEvent, Commands, DoneEvent, ErrorEvent, ProgressEvent, SampleEvent
from .lora import inject_lora, trainable_parameters
from .models import BaseModel, load_base, pick_device
from .sample import PreviewSettings, infotext, render, save_png, use_sampler
from .state import load_state, restore_rng_state, rng_state, save_state

log = logging.getLogger(__name__)
PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STATE_FILE = "trainer.safetensors"  # in the run's state/ folder: everything a resume needs


class TrainingError(LoraStudioError):
    """Training cannot start or had to stop; the message says why and what to do."""


@dataclass
class Session:
    config: TrainConfig
    run_dir: Path
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
    on_event: Callable | None
    commands: Commands
    step: int = 0
    position: bucketing.Position = field(default_factory=bucketing.Position)  # of the next batch to train on
    smoothed_loss: float | None = None
    tensorboard: object | None = None  # a SummaryWriter when the tensorboard package is installed
    started_at: float = field(default_factory=time.time)  # wall clock, for the file's ss_training_started_at

    @property
    def items(self) -> list[Item]:
        return self.report.items

    @property
    def device(self) -> torch.device:
        # The accelerator's, not `unet.device`: diffusers computes that by walking every module (slow per step).
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        return PRECISION[self.config.mixed_precision]


def trained_parts(config: TrainConfig, base: BaseModel) -> dict[str, torch.nn.Module]:
    """The model parts that carry trained LoRA, named as diffusers' LoRA files name them."""
    return base.lora_parts(text_encoders=config.lora.train_text_encoder)


# --- prepare --------------------------------------------------------------------------------------------


def new_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.output_dir) / f"{config.name}-{stamp}"
    suffix = 1
    while run_dir.exists():  # two runs started in the same second
        run_dir = Path(config.output_dir) / f"{config.name}-{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    return run_dir


# Settings that give the saved state its shape: a resume with other values cannot load it.
RESUME_FIXED = ("lora.rank", "lora.conv_rank", "lora.unet_targets", "lora.train_text_encoder",
                "lora.text_encoder_targets", "lora.use_dora", "optimizer.optimizer")  # fmt: skip


def check_resumable(config: TrainConfig, run_dir: Path) -> None:
    """Refuse, before anything is written, a resume whose settings change the saved state's shape."""
    started = load_config(run_dir / "config.toml")
    changed = [
        f"`{key}` from {setting(started, key)!r} to {setting(config, key)!r}"
        for key in RESUME_FIXED
        if setting(started, key) != setting(config, key)
    ]
    if changed:
        raise TrainingError(
            f"{run_dir} cannot resume with {', '.join(changed)}: its saved LoRA and optimizer state have the "
            "run's own; resume without changing them, or start a new run with the new settings"
        )


def setting(config: TrainConfig, key: str):
    """The value at a dotted config path, e.g. "lora.rank"."""
    return functools.reduce(getattr, key.split("."), config)


def record_config(config: TrainConfig, run_dir: Path) -> None:
    save_config(config, run_dir / "config.toml", header=f"resolved config of run {run_dir.name}")


def shared_run_dir(config: TrainConfig, accelerator: Accelerator, run_dir: Path | None) -> Path:
    """The main process names the run folder; with several processes the others receive its name."""
    name = [str(run_dir or new_run_dir(config)) if accelerator.is_main_process or run_dir else None]
    if accelerator.num_processes > 1 and run_dir is None:
        broadcast_object_list(name)
    return Path(name[0])


def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("lora_studio").addHandler(handler)
    logging.getLogger("lora_studio").setLevel(logging.INFO)
    return handler


def check_settings(config: TrainConfig) -> None:
    """Combinations that are valid fields but cannot train together; all reported at once."""
    problems = []
    if not config.base_model.strip():
        problems.append("`base_model` is empty: choose a checkpoint, a diffusers folder or 'demo'")
    if config.dataset.cache_latents and config.dataset.random_crop:
        problems.append(
            "`dataset.random_crop` changes every step, so latents cannot be cached; "
            "turn cache_latents or random_crop off"
        )
    reason = text_cache_refusal(config) if config.dataset.cache_text_embeddings else None
    if reason:
        problems.append(f"`dataset.cache_text_embeddings` cannot be used: {reason}")
    if problems:
        raise ConfigError("config", problems)


def check_dataset(config: TrainConfig) -> ScanReport:
    report = scan(config.dataset)
    for problem in report.warnings:
        log.warning("%s: %s", problem.path, problem.message)
    if report.errors:
        shown = "; ".join(f"{Path(p.path).name}: {p.message}" for p in report.errors[:3])
        more = f" (and {len(report.errors) - 3} more)" if len(report.errors) > 3 else ""
        raise TrainingError(f"the dataset has {len(report.errors)} error(s): {shown}{more}")
    return report


def load_model(config: TrainConfig, accelerator: Accelerator) -> BaseModel:
    prediction = None if config.prediction_type == "auto" else config.prediction_type
    base = load_base(
        config.base_model, PRECISION[config.mixed_precision], accelerator.device, prediction_type=prediction
    )
    if config.family != "auto" and config.family != base.family:
        raise TrainingError(
            f"the preset is for {config.family} but {config.base_model} is {base.family}; "
            "pick a preset of that family or set family = 'auto'"
        )
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    return base


def prepare_caches(config: TrainConfig, base: BaseModel, report: ScanReport, buckets: list) -> tuple:
    latent_cache = text_cache = None
    if config.dataset.cache_latents:
        latent_cache = LatentCache(cache_folder(config), base.vae, config.dataset.alpha_background)
        entries = plan_latent_entries(report.items, buckets, config.dataset)
        stats = latent_cache.fill(report.items, entries)
        log.info("latent cache: %d hits, %d built", stats["hits"], stats["built"])
    if config.dataset.cache_text_embeddings:
        text_cache = TextCache(cache_folder(config), base.text_encoders, config.clip_skip)
        captions = [build_caption(i, config.dataset, random.Random(0)) for i in report.items]
        stats = text_cache.fill(captions, lambda c: encode_text(base, c, config.clip_skip))
        log.info("text cache: %d hits, %d built", stats["hits"], stats["built"])
    return latent_cache, text_cache


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


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator, also when an earlier run in this process used another precision.

    accelerate keeps the mixed-precision setting in a per-process singleton and refuses a second
    Accelerator with another one ("restart your runtime"). The app runs many trainings in one process
    (a demo in fp32, then a bf16 run), so a change of precision resets that state first, as accelerate's
    own tests do between configurations. Under `accelerate launch` a process runs one training, so
    the reset never happens there; the process group (PartialState) is never reset."""
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != config.mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.optimizer.gradient_accumulation_steps,
        # Without a GPU, say so: under torchrun/accelerate launch that selects multi-process CPU (gloo).
        cpu=pick_device().type == "cpu",
    )


def prepare(
    config: TrainConfig, on_event=None, commands: Commands | None = None, run_dir: Path | None = None
) -> Session:
    """Everything before the first step: run folder, dataset, model, caches, LoRA, optimizer."""
    check_settings(config)
    resuming = run_dir is not None
    if resuming:
        check_resumable(config, run_dir)
    report = check_dataset(config)  # before any model loads: a bad dataset fails in a second
    accelerator = make_accelerator(config)
    run_dir = shared_run_dir(config, accelerator, run_dir)
    if accelerator.is_main_process:
        attach_log_file(run_dir)
        if not resuming:  # a resumed run records its settings once its state has loaded (resume())
            record_config(config, run_dir)
    base = load_model(config, accelerator)
    resolution = config.dataset.resolution or base.native_resolution
    buckets = bucketing.assign_buckets([(i.width, i.height) for i in report.items], config.dataset, resolution)
    with accelerator.main_process_first():  # the main process builds the caches, the others then hit them
        latent_cache, text_cache = prepare_caches(config, base, report, buckets)
    torch.manual_seed(config.seed)  # LoRA init (gaussian) is drawn here
    inject_lora(base, config.lora)
    per_epoch = bucketing.batches_per_epoch(buckets, [i.repeats for i in report.items], config.dataset.batch_size)
    total = bucketing.count_total_steps(config.optimizer, per_epoch, accelerator.num_processes)
    optimizer = make_optimizer(config, base, accelerator.device)
    parts = trained_parts(config, base)
    lr_scheduler = make_lr_scheduler(config, optimizer, total, accelerator.num_processes)
    prepared = accelerator.prepare(*parts.values(), optimizer, lr_scheduler)
    models = dict(zip(parts, prepared[: len(parts)], strict=True))
    if config.torch_compile:
        # Compiled here rather than through Accelerator(dynamo_backend=...): accelerate keeps that setting
        # in a per-process singleton, so a second run in the same app process would silently ignore it.
        # trained_models() strips the compile wrapper again for saving and loading.
        models = {name: torch.compile(model) for name, model in models.items()}
    for model in models.values():
        model.train()  # LoRA dropout is active only in training mode
    session = Session(
        config=config,
        run_dir=run_dir,
        accelerator=accelerator,
        base=base,
        report=report,
        buckets=buckets,
        latent_cache=latent_cache,
        text_cache=text_cache,
        noise_scheduler=DDPMScheduler.from_config(base.scheduler.config),
        optimizer=prepared[-2],
        lr_scheduler=prepared[-1],
        total_steps=total,
        resolution=resolution,
        models=models,
        on_event=on_event,
        commands=commands or Commands(),
    )
    log.info(
        "prepared %s: %d images, %d steps, %s on %s",
        run_dir,
        len(report.items),
        total,
        base.family,
        accelerator.device,
    )
    return session


# --- one step -----------------------------------------------------------------------------------------------


def encode_text(
    base: BaseModel,
    captions: list[str],
    clip_skip: int,
    encoders: list[torch.nn.Module] | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Conditioning for a batch of captions: hidden states (and SDXL's pooled embedding).

    clip_skip follows kohya/A1111: 1 is the last layer, 2 the penultimate, re-normalised by the
    final layer norm as the original models do. SDXL always conditions on the penultimate layers.
    """
    device = device or base.unet.device
    hidden, pooled = [], None
    for tokenizer, encoder in zip(base.tokenizers, encoders or base.text_encoders, strict=True):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        if base.family == "sdxl":
            hidden.append(out.hidden_states[-(clip_skip + 1)])
            pooled = out[0]  # text_embeds of the second encoder (the last one in the loop)
        elif clip_skip == 1:
            hidden.append(out.last_hidden_state)
        else:
            inner = getattr(encoder, "module", encoder)  # past a DistributedDataParallel wrapper
            final_norm = getattr(inner, "text_model", inner).final_layer_norm
            hidden.append(final_norm(out.hidden_states[-clip_skip]))
    result = {"hidden": torch.cat(hidden, dim=-1)}
    if pooled is not None:
        result["pooled"] = pooled
    return result


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
        mean, std = encode_pixels(base, torch.stack([s.pixels for s in samples]))  # one VAE batch
        captions, crops = [s.caption for s in samples], [s.crop for s in samples]
    latents = mean + std * torch.stack([torch.randn(mean.shape[1:], generator=d.gen) for d in draws])
    vae_config = base.vae.config
    latents = (latents - (getattr(vae_config, "shift_factor", None) or 0.0)) * vae_config.scaling_factor
    return latents.to(session.device), captions, crops


@torch.no_grad()
def encode_pixels(base: BaseModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vae = base.vae
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


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
        names = ["text_encoder", "text_encoder_2"]
        encoders = [session.models.get(name, e) for name, e in zip(names, base.text_encoders, strict=False)]
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


# --- checkpoints and resume -------------------------------------------------------------------------------


def lora_state_dicts(session: Session) -> dict[str, dict[str, torch.Tensor]]:
    return {name: get_peft_model_state_dict(model) for name, model in trained_models(session).items()}


def trained_models(session: Session) -> dict[str, torch.nn.Module]:
    """The trained parts without accelerate's DDP and torch.compile wrappers, named as in session.models."""
    unwrap = session.accelerator.unwrap_model
    return {name: unwrap(model, keep_torch_compile=False) for name, model in session.models.items()}


def save_lora_file(session: Session, path: Path, dtype: torch.dtype | None = None) -> Path:
    """The LoRA in the configured format: kohya (loads everywhere, the default) or diffusers-native."""
    dtype = dtype or SAVE_DTYPE[session.config.save.precision]
    parts = trained_models(session)
    metadata = export.training_metadata(session.config, training_facts(session))
    if session.config.save.format == "diffusers":
        return export.save_diffusers(parts, type(session.base.pipeline), path, dtype, metadata)
    lora = export.lora_from_models(parts, session.base.family, session.base.unet.config)
    lora.metadata = metadata
    return export.save_kohya(lora, path, dtype)


def training_facts(session: Session) -> export.TrainingFacts:
    """What the LoRA file's kohya metadata reports about this run: images, folders, buckets, steps, times."""
    items, position = session.items, session.position
    folders: dict[str, dict[str, int]] = {}
    bucket_counts: Counter = Counter()
    for item, bucket in zip(items, session.buckets, strict=True):
        entry = folders.setdefault(item.concept, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
        bucket_counts[(bucket.width, bucket.height)] += item.repeats  # images per epoch, as kohya counts them
    return export.TrainingFacts(
        family=session.base.family,
        base_source=session.base.source,
        resolution=session.resolution,
        num_images=session.report.images_per_epoch,
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
    path = save_lora_file(
        session, session.run_dir / "checkpoints" / f"{config.name}-step{session.step:06d}.safetensors"
    )
    state_dir = None
    if config.save.save_state:
        state_dir = session.run_dir / "state"
        save_trainer_state(session, state_dir / STATE_FILE)
        (state_dir / "lora.safetensors").unlink(missing_ok=True)  # where runs before 2026-11-28 kept the LoRA
    prune_checkpoints(session)
    event = CheckpointEvent(session.step, path, state_dir)
    emit(session, event)
    log.info("checkpoint at step %d: %s", session.step, path)
    return event


def save_trainer_state(session: Session, path: Path) -> None:
    """Everything a resume needs, in one file written under a temp name and renamed into place.

    One file, so a failed write (a full disk, a kill) leaves the previous complete state: never the
    LoRA of one step beside the optimizer and position of another, which would resume wrongly without a
    word. The state is fp32 LoRA weights, optimizer, scheduler, RNG, data position and fp16 loss scale."""
    scaler = session.accelerator.scaler  # fp16 on a GPU: the loss scale and its growth count
    state = {
        "lora": {f"{part}/{k}": v for part, sd in lora_state_dicts(session).items() for k, v in sd.items()},
        **({"grad_scaler": scaler.state_dict()} if scaler is not None else {}),
        "step": session.step,
        "epoch": session.position.epoch,
        "batch": session.position.batch,
        "smoothed_loss": session.smoothed_loss,
        "optimizer": session.optimizer.state_dict(),
        "lr_scheduler": session.lr_scheduler.state_dict(),
        "processes": session.accelerator.num_processes,
        "rng": rng_state(),
    }
    try:
        save_state(state, path)
    except OSError as exc:
        raise TrainingError(
            f"could not save the resumable state at step {session.step} to {path}: {exc.strerror or exc}; free "
            f"disk space, then continue with `lora-studio train --resume {session.run_dir}` (it goes on from "
            "the last state that was saved whole)"
        ) from exc


def prune_checkpoints(session: Session) -> None:
    keep = session.config.save.keep_last
    if keep:
        files = sorted((session.run_dir / "checkpoints").glob("*-step*.safetensors"))
        for old in files[:-keep]:
            old.unlink()


def resume(session: Session) -> None:
    """Load the LoRA weights, optimizer, scheduler, RNG and data position saved in state/."""
    state_dir = session.run_dir / "state"
    if not (state_dir / STATE_FILE).is_file():
        raise TrainingError(f"{session.run_dir} has no saved state to resume from; start a new run instead")
    trainer = read_trainer_state(state_dir / STATE_FILE)
    # Runs before 2026-11-28 kept the LoRA in a second file.
    lora = trainer["lora"] if "lora" in trainer else read_trainer_state(state_dir / "lora.safetensors")["lora"]
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
    session.step = trainer["step"]
    session.position = bucketing.Position(trainer["epoch"], trainer["batch"])
    session.smoothed_loss = trainer["smoothed_loss"]
    if session.accelerator.is_main_process:
        record_config(session.config, session.run_dir)  # with this segment's --set changes, now that they fit
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


# --- samples -------------------------------------------------------------------------------------------------


def default_sample_prompt(session: Session) -> str:
    """The trigger word and the first image's caption: what the run is teaching."""
    first = session.items[0]
    trigger = session.config.dataset.trigger_word.strip()
    parts = [trigger] if trigger and trigger not in first.caption else []
    return ", ".join(parts + [first.caption or first.concept])


def render_samples(session: Session) -> SampleEvent:
    """Images at every configured strength and seed, into samples/step-NNNNNN/, with A1111 infotext.

    Rendered in eval mode, under no_grad and inside a forked RNG, so a run with sampling trains exactly
    the weights a run without it does.
    """
    settings = session.config.sample
    pipeline = session.base.pipeline
    prompts = settings.prompts or [default_sample_prompt(session)]
    size = (settings.width or session.resolution, settings.height or session.resolution)
    scheduler = pipeline.scheduler
    use_sampler(pipeline, settings.sampler)
    for model in session.models.values():
        model.eval()
    devices = [session.device] if session.device.type == "cuda" else []
    try:
        pipeline.set_progress_bar_config(disable=True)
        # Under the training autocast: the LoRA weights are fp32 beside bf16/fp16 base weights, and
        # without it their fp32 outputs reach the half-precision VAE, which refuses them.
        with torch.random.fork_rng(devices=devices), session.accelerator.autocast():
            rendered = render(
                pipeline,
                prompts,
                settings.strengths,
                settings.seeds,
                settings.num_inference_steps,
                settings.guidance_scale,
                size,
                settings.negative_prompt,
            )
    finally:
        pipeline.scheduler = scheduler
        for model in session.models.values():
            model.train()
    folder = session.run_dir / "samples" / f"step-{session.step:06d}"
    paths = []
    for r in rendered:
        prefix = f"p{prompts.index(r.prompt)}-" if len(prompts) > 1 else ""
        path = folder / f"{prefix}s{r.strength:.2f}-seed{r.seed}.png"
        paths.append(save_png(r.image, path, sample_infotext(session, r, size)))
    event = SampleEvent(session.step, paths, list(settings.strengths))
    emit(session, event)
    return event


def sample_infotext(session: Session, rendered, size: tuple[int, int]) -> str:
    settings = session.config.sample
    preview = PreviewSettings(
        prompt=rendered.prompt,
        negative_prompt=settings.negative_prompt,
        strengths={session.config.name: rendered.strength},
        sampler=settings.sampler,
        steps=settings.num_inference_steps,
        cfg=settings.guidance_scale,
        seed=rendered.seed,
        width=size[0],
        height=size[1],
        clip_skip=session.config.clip_skip,
    )
    return infotext(preview, rendered.seed, {}, Path(str(session.base.source)).name) + f", Step: {session.step}"


# --- the loop -------------------------------------------------------------------------------------------------


def emit(session: Session, event) -> None:
    """Deliver an event; a failing callback is logged and never stops training."""
    if session.on_event is None:
        return
    try:
        session.on_event(event)
    except Exception:
        log.exception("the event callback failed on %s", type(event).__name__)


def record_metrics(session: Session, loss: float, lr: float, started: float, first_step: int) -> None:
    session.smoothed_loss = loss if session.smoothed_loss is None else 0.9 * session.smoothed_loss + 0.1 * loss
    elapsed = time.perf_counter() - started
    rate = (session.step - first_step) / elapsed if elapsed > 0 else 0.0
    eta = (session.total_steps - session.step) / rate if rate else 0.0
    line = {
        "step": session.step,
        "epoch": session.position.epoch,
        "loss": loss,
        "smoothed_loss": session.smoothed_loss,
        "lr": lr,
        "time": round(time.time(), 3),
    }
    with open(session.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:  # append-only log, one line a step
        f.write(json.dumps(line) + "\n")
    if session.tensorboard is not None:
        for name in ("loss", "smoothed_loss", "lr"):
            session.tensorboard.add_scalar(f"train/{name}", line[name], session.step)
    emit(
        session,
        ProgressEvent(
            session.step,
            session.total_steps,
            session.position.epoch,
            loss,
            session.smoothed_loss,
            lr,
            rate,
            eta,
            session.run_dir,
        ),
    )


def should_checkpoint(session: Session, epoch_before: int) -> bool:
    """After a step: every N steps, or when the step finished an epoch that is a multiple of N.

    `epoch_before` is the epoch the step started in. A step of several micro-batches or processes can
    end a few batches into the next epoch, so "finished an epoch" means the epoch number moved on."""
    save = session.config.save
    if save.every_n_steps and session.step % save.every_n_steps == 0:
        return True
    return epoch_checkpoint_due(save.every_n_epochs, epoch_before, session.position.epoch)


def epoch_checkpoint_due(every_n_epochs: int, epoch_before: int, epoch_after: int) -> bool:
    """Whether epochs epoch_before+1 .. epoch_after (the ones just completed, counted from 1) hold a multiple."""
    finished = range(epoch_before + 1, epoch_after + 1)
    return bool(every_n_epochs) and any(epoch % every_n_epochs == 0 for epoch in finished)


def open_tensorboard(run_dir: Path):
    """A SummaryWriter in run_dir/tensorboard if tensorboard is installed (an optional extra), else None."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def next_micro_batch(session: Session, batches, upcoming):
    """This process's share of the next micro-step: one batch out of every `num_processes` in the global order."""
    world, rank = session.accelerator.num_processes, session.accelerator.process_index
    group = [upcoming] + [next(batches) for _ in range(world - 1)]
    return group[rank][1], next(batches)


def agreed_commands(session: Session) -> tuple[bool, bool, bool]:
    """Stop/save/sample as the main process received them, so every process acts alike."""
    flags = torch.tensor(
        [session.commands.take_stop(), session.commands.take_save(), session.commands.take_sample()],
        device=session.accelerator.device,
    )
    if session.accelerator.num_processes > 1:
        flags = broadcast(flags)
    return tuple(bool(f) for f in flags.tolist())


def step_loss(session: Session, losses: list[float]) -> float:
    """The step's loss averaged over micro-batches and processes; stops the run on NaN or inf."""
    loss = torch.tensor(sum(losses) / len(losses), device=session.accelerator.device)
    loss = session.accelerator.reduce(loss, reduction="mean").item()
    if not math.isfinite(loss):
        message = (
            f"the loss became {loss} at step {session.step + 1}; likely causes: a learning rate too high, "
            "alpha much larger than rank, or fp16 overflow (try bf16 or fp32); the last checkpoint is kept"
        )
        emit(session, ErrorEvent(session.step + 1, message))
        raise TrainingError(message)
    return loss


def on_main(session: Session, action, *args):
    """Run a file-writing action on the main process only; every process waits for it."""
    result = action(session, *args) if session.accelerator.is_main_process else None
    session.accelerator.wait_for_everyone()
    return result


def train(session: Session) -> DoneEvent:
    """Run steps until the total is reached or a stop is requested; save the final LoRA."""
    config = session.config
    if session.accelerator.is_main_process:
        session.tensorboard = open_tensorboard(session.run_dir)
    repeats = [i.repeats for i in session.items]
    batches = bucketing.iterate_batches(
        session.buckets, repeats, config.dataset.batch_size, config.seed, session.position
    )
    started, first_step = time.perf_counter(), session.step
    stopped = False
    if config.sample.at_start and session.step == 0 and config.sample.every_n_steps:
        on_main(session, render_samples)
    upcoming = next(batches)
    while session.step < session.total_steps:
        losses, epoch_before = [], session.position.epoch
        for micro in range(config.optimizer.gradient_accumulation_steps):
            indices, upcoming = next_micro_batch(session, batches, upcoming)
            losses.append(training_step(session, indices, micro))
            session.position = upcoming[0]  # saved state resumes from the next batch
        loss = step_loss(session, losses)
        session.step += 1
        on_main(session, record_metrics, loss, session.lr_scheduler.get_last_lr()[0], started, first_step)
        stop, save, sample = agreed_commands(session)
        if stop:
            stopped = True
            break
        if should_checkpoint(session, epoch_before) or save:
            on_main(session, save_checkpoint)
        every = config.sample.every_n_steps
        if (every and session.step % every == 0) or sample:
            on_main(session, render_samples)
    if stopped or config.save.save_state:
        on_main(session, save_checkpoint)
    final = session.run_dir / f"{config.name}.safetensors"
    on_main(session, save_lora_file, final)
    if session.tensorboard is not None:
        session.tensorboard.close()
    done = DoneEvent(session.step, session.run_dir, final, stopped)
    emit(session, done)
    return done


def run_training(
    config: TrainConfig, on_event=None, commands: Commands | None = None, resume_from: Path | None = None
) -> DoneEvent:
    """The whole run: prepare, resume if asked, train. Errors reach the caller as TrainingError/ConfigError."""
    handlers_before = set(logging.getLogger("lora_studio").handlers)
    try:
        session = prepare(config, on_event, commands, run_dir=resume_from)
        if resume_from is not None:
            resume(session)
        return train(session)
    except LoraStudioError as exc:
        # The sentence the caller shows, kept in the run's log.txt too; info, so a console that shows
        # warnings (the CLI's) does not print it twice.
        log.info("the run stopped: %s", exc)
        raise
    except Exception:
        log.exception("training failed")  # the traceback goes to log.txt, never to the page
        raise
    finally:
        for handler in set(logging.getLogger("lora_studio").handlers) - handlers_before:
            logging.getLogger("lora_studio").removeHandler(handler)
            handler.close()
