"""The training loop, in phases: prepare -> (resume) -> train, one `step.training_step` at a time.

It runs from one `TrainConfig`, reports through `on_event`, polls `Commands` between steps and
never knows about the UI. The run folder's layout belongs to `runs.RunFolder`; the resumable state
to `resume.py`; one step's maths to `step.py`; LoRA files, checkpoints and samples to `outputs.py`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast, broadcast_object_list
from diffusers import DDPMScheduler

from . import buckets as bucketing
from . import fp8
from .cache import LatentCache, TextCache, cache_folder, plan_latent_entries
from .conditioning import overlong_captions
from .config import TrainConfig, shortened
from .cpu_attention import use_small_head_attention
from .cpu_threads import CpuPolicy
from .data import (
    Item,
    ScanReport,
    balance_regularization,
    build_caption,
    regularization_items,
    scan,
    validation_caption,
    validation_items,
)
from .ema import make_ema
from .errors import LoraStudioError
from .events import Commands, DoneEvent, ErrorEvent, PreparingEvent, ProgressEvent
from .fsutil import WriteError
from .lora import inject_lora, skip_input_casts
from .lora_file import LoraFile
from .loss_reads import PendingLosses, QueuedStep, ReadStep, check_finite, reads_deferred
from .models import BaseModel, dtype_of, load_base, pick_device
from .optimizers import current_rate, make_lr_scheduler, make_optimizer
from .outputs import render_samples, samples_due, save_checkpoint, save_lora_file, should_checkpoint
from .reg_images import RENDERING, generate_regularization
from .resume import check_resumable, record_config, resume, write_failure
from .runs import RunFolder, RunLock, compile_cache_folder, output_root
from .session import Session, TrainingError, emit, modules_on, offload_frozen_parts, on_main, trained_parts
from .start_weights import apply_start_file, read_start_file, with_file_ranks
from .step import encode_text, training_step
from .validation import build_validation_set, record_file, validate, validation_due

log = logging.getLogger(__name__)


def claim_run(config: TrainConfig, accelerator: Accelerator, run_dir: Path | None) -> tuple[RunFolder, RunLock | None]:
    """The run folder, locked by the main process before anything is written to it.

    Resuming: the given run, refused while another trainer holds it or when the new settings change the
    saved state's shape. Otherwise a new folder in output_dir, named by the main process and shared
    with the others when there are several."""
    main = accelerator.is_main_process
    if run_dir is not None:
        run = RunFolder.open(run_dir)
        lock = run.lock() if main else None
        try:
            check_resumable(config, run)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return run, lock
    name = [str(RunFolder.create(output_root(config.output_dir), config.name).path) if main else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    run = RunFolder(Path(name[0]))
    return run, run.lock() if main else None


def attach_log_file(run: RunFolder) -> logging.Handler:
    handler = logging.FileHandler(run.log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("lora_studio").addHandler(handler)
    logging.getLogger("lora_studio").setLevel(logging.INFO)
    return handler


def check_dataset(config: TrainConfig) -> tuple[ScanReport, list[Item]]:
    """The training images and the held-out validation images; every problem logged, errors refused at once."""
    report, held_out, problems = validation_items(config, scan(config.dataset))
    regularization, reg_problems = regularization_items(config)
    problems = report.problems + problems + reg_problems
    for problem in problems:
        if problem.severity == "warning":
            log.warning("%s: %s", problem.path, problem.message)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        shown = "; ".join(f"{Path(p.path).name}: {p.message}" for p in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise TrainingError(f"the dataset has {len(errors)} error(s): {shown}{more}")
    return with_regularization(report, regularization), held_out


def with_regularization(report: ScanReport, regularization: list[Item]) -> ScanReport:
    """The training report with the regularization images after the training images, balanced as kohya does."""
    if not regularization:
        return report
    training = [i for i in report.items if not i.regularization]
    balanced = balance_regularization(training, regularization)
    log.info("regularization: %d images, %d per epoch beside %d training images", len(balanced),
             sum(i.repeats for i in balanced), sum(i.repeats for i in training))  # fmt: skip
    return ScanReport(report.root, training + balanced, report.problems, report.layout)


def load_model(config: TrainConfig, accelerator: Accelerator) -> BaseModel:
    prediction = None if config.prediction_type == "auto" else config.prediction_type
    if config.fp8_base:
        check_fp8_device(accelerator)
    base = load_base(config.base_model, dtype_of(config.mixed_precision), accelerator.device,
                     prediction_type=prediction, vae=config.vae, fp8_unet=config.fp8_base,
                     fp8_text_encoders=config.fp8_text_encoders())  # fmt: skip
    if config.family != "auto" and config.family != base.family:
        raise TrainingError(
            f"the preset is for {config.family} but {config.base_model} is {base.family}; "
            "pick a preset of that family or set family = 'auto'"
        )
    if config.optimizer.zero_terminal_snr and base.prediction_type != "v_prediction":
        raise TrainingError(
            f"optimizer.zero_terminal_snr needs v-prediction, but {config.base_model} predicts "
            f"{base.prediction_type}; set prediction_type = 'v_prediction' to train it towards v, or turn it off"
        )
    if config.optimizer.scale_v_pred_loss_like_noise_pred and base.prediction_type != "v_prediction":
        raise TrainingError(
            f"optimizer.scale_v_pred_loss_like_noise_pred scales a v-prediction loss, but {config.base_model} "
            f"predicts {base.prediction_type}; turn it off (or set prediction_type = 'v_prediction' to train it "
            "towards v)"
        )
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    return base


def check_fp8_device(accelerator: Accelerator) -> None:
    """fp8_base's refusals, before the model loads: a device without float8 tensors, and several processes (DDP
    would broadcast the 8-bit weights at its start, which has not been checked)."""
    if accelerator.num_processes > 1:
        raise TrainingError(f"fp8_base has not been checked on several GPUs ({accelerator.num_processes} processes "
                            "here); train on one GPU, or set fp8_base = false")  # fmt: skip
    if not fp8.storable_on(accelerator.device):
        raise TrainingError(f"fp8_base: this device ({accelerator.device.type}) cannot hold 8-bit floats; set "
                            "fp8_base = false (or train on a CUDA GPU)")  # fmt: skip


def prepare_caches(config: TrainConfig, base: BaseModel, report: ScanReport, buckets: list) -> tuple:
    latent_cache = text_cache = None
    if config.dataset.cache_latents:
        on_disk = cache_folder(config) if config.dataset.cache_latents_to_disk else None
        latent_cache = LatentCache(on_disk, base.vae, config.dataset.alpha_background)
        entries = plan_latent_entries(report.items, buckets, config.dataset)
        stats = latent_cache.fill(report.items, entries)
        log.info("latent cache: %d hits, %d built", stats["hits"], stats["built"])
    if config.dataset.cache_text_embeddings:
        text_cache = TextCache(cache_folder(config), base.text_encoders, config.clip_skip, config.max_token_length,
                               config.weighted_captions)  # fmt: skip
        captions = [build_caption(i, config.dataset, random.Random(0)) for i in report.items]
        stats = text_cache.fill(captions, lambda c: encode_text(
            base, c, config.clip_skip, max_tokens=config.max_token_length, emphasis=config.weighted_captions))
        log.info("text cache: %d hits, %d built", stats["hits"], stats["built"])
    return latent_cache, text_cache


def unet_parked(base: BaseModel, park: torch.device | str = "cpu"):
    """The UNet on `park` while the block runs, back on its device after. With `low_vram` the caches fill
    this way: on an 8 GiB card, SDXL's UNet (4.8 GiB in bf16) beside both text encoders and a 1024 px VAE
    encode would not fit. Once the caches are full, the VAE and frozen encoders leave the card instead
    (session.offload_frozen_parts)."""
    return modules_on([base.unet], park)


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
    """Everything before the first step: run folder (locked), dataset, model, caches, LoRA, optimizer."""
    began = time.perf_counter()
    config.check_trainable()
    accelerator = make_accelerator(config)
    report, held_out = check_dataset(config)  # before any model loads or folder is made: fails in a second
    # A new run's starting LoRA is read now, so a wrong file fails before the model loads; a resume's state
    # holds the weights already.
    starting = config.lora.network_weights.strip()
    start = read_start_file(starting) if starting and run_dir is None else None
    if start is not None and config.lora.rank_from_weights:
        config = with_file_ranks(config, start)  # recorded with the run: its resume trains at that rank too
    run, lock = claim_run(config, accelerator, run_dir)
    try:
        if accelerator.is_main_process:
            attach_log_file(run)
            if run_dir is None:  # a resumed run records its settings once its state has loaded (resume())
                record_config(config, run)
        session = build_session(config, accelerator, report, run, held_out, on_event, commands, start)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    session.lock, session.on_event, session.commands = lock, on_event, commands or Commands()
    log.info("prepared %s in %.1f s: %d images, %d steps, %s on %s", run.path, time.perf_counter() - began,
             len(session.items), session.total_steps, session.base.family, accelerator.device)  # fmt: skip
    return session


def training_scheduler(config: TrainConfig, base: BaseModel) -> DDPMScheduler:
    """The DDPM schedule noise is added with: the base model's, rescaled to zero terminal SNR when asked."""
    zero_snr = {"rescale_betas_zero_snr": True} if config.optimizer.zero_terminal_snr else {}
    return DDPMScheduler.from_config(base.scheduler.config, **zero_snr)


def rendering_progress(on_event, accelerator: Accelerator) -> Callable[[int, int], None]:
    """Regularization rendering's progress: a `PreparingEvent` per image (the app's and the CLI's bar) and a log
    line every tenth (the log file keeps it)."""

    def report(done: int, total: int) -> None:
        if not accelerator.is_main_process:
            return
        if done == total or done % max(1, total // 10) == 0:
            log.info("%s: %d/%d", RENDERING, done, total)
        if on_event is not None:
            on_event(PreparingEvent(RENDERING, done, total))

    return report


def warn_of_cut_captions(config: TrainConfig, base: BaseModel, items: list) -> None:
    """A warning in the run's log when captions (as training builds them, before shuffle and dropout) run past
    the tokens the text encoder reads: their last tags never reach the model."""
    captions = [validation_caption(item, config.dataset) for item in items]
    cut = overlong_captions(base.tokenizers[0], captions, config.max_token_length, config.weighted_captions)
    if not cut:
        return
    longest, count = max(cut, key=lambda pair: pair[1])
    longer = [n for n in (150, 225) if n > config.max_token_length]
    fix = f"set max_token_length = {longer[-1] if count > 150 else longer[0]}" if longer else "shorten them"
    log.warning("%d of %d captions are longer than the %d tokens the text encoder reads, so their ends are cut off "
                "(the longest, %d tokens: %r); %s", len(cut), len(captions), config.max_token_length, count,
                shortened(longest, 120), fix)  # fmt: skip


def held_out_set(config: TrainConfig, base: BaseModel, items: list, resolution: int, accelerator: Accelerator):
    """The validation set, encoded on the main process (the only one that validates); None without validation."""
    if not items or not accelerator.is_main_process:
        return None
    return build_validation_set(config, base, items, resolution, accelerator.device)


def build_session(
    config: TrainConfig, accelerator: Accelerator, report: ScanReport, run: RunFolder, validation: list | None = None,
    on_event=None, commands: Commands | None = None, start: LoraFile | None = None,
) -> Session:
    """Load the model, fill the caches, add the LoRA (with `start`'s weights when given), and make the optimizer
    and rate schedule."""
    base = load_model(config, accelerator)
    resolution = config.dataset.resolution or base.native_resolution
    if config.regularization.generate:
        with accelerator.main_process_first():  # the main process renders, the others find them cached
            generated = generate_regularization(config, base, report.items, resolution,
                                                rendering_progress(on_event, accelerator),
                                                commands.take_stop if commands is not None else None)  # fmt: skip
        report = with_regularization(report, generated)
    buckets = bucketing.assign_buckets([(i.width, i.height) for i in report.items], config.dataset, resolution)
    if accelerator.is_main_process:
        warn_of_cut_captions(config, base, report.items)
    with accelerator.main_process_first(), unet_parked(base) if config.low_vram else nullcontext():
        latent_cache, text_cache = prepare_caches(config, base, report, buckets)  # main first, the others hit
        held_out = held_out_set(config, base, validation, resolution, accelerator)
    torch.manual_seed(config.seed)  # LoRA init (gaussian) is drawn here
    inject_lora(base, config.lora, config.clip_skip)
    if start is not None:  # before the optimizer and any average see the weights
        apply_start_file(start, base, trained_parts(config, base))
    per_epoch = bucketing.batches_per_epoch(buckets, [i.repeats for i in report.items], config.dataset.batch_size)
    total = bucketing.count_total_steps(config.optimizer, per_epoch, accelerator.num_processes)
    models, optimizer, lr_scheduler = prepare_trained_parts(config, accelerator, base, total)
    session = Session(
        config=config,
        run=run,
        accelerator=accelerator,
        base=base,
        report=report,
        buckets=buckets,
        latent_cache=latent_cache,
        text_cache=text_cache,
        noise_scheduler=training_scheduler(config, base),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        total_steps=total,
        resolution=resolution,
        models=models,
        validation=held_out,
        ema=make_ema(config.lora, optimizer),
    )
    offload_frozen_parts(session)
    return session


def prepare_trained_parts(config: TrainConfig, accelerator: Accelerator, base: BaseModel, total: int) -> tuple:
    """The trained parts, optimizer and schedule as accelerate prepared them (DDP on several GPUs), compiled
    when asked; on the CPU uncompiled, the UNet's small-head attention (`cpu_attention`)."""
    optimizer = make_optimizer(config, base, accelerator.device)
    parts = trained_parts(config, base)
    lr_scheduler = make_lr_scheduler(config, optimizer, total, accelerator.num_processes)
    if accelerator.device.type == "cpu" and not config.torch_compile:  # compiled: inductor's own attention kernels
        use_small_head_attention(base.unet)
    if autocasts(accelerator):  # every pass of the trained parts does: steps, validation, samples
        log.debug("%d adapted layers take their input as it comes", skip_input_casts(parts.values()))
    prepared = accelerator.prepare(*parts.values(), optimizer, lr_scheduler)
    models = dict(zip(parts, prepared[: len(parts)], strict=True))
    if config.torch_compile:
        # Compiled here rather than through Accelerator(dynamo_backend=...): accelerate keeps that setting
        # in a per-process singleton, so a second run in the same app process would silently ignore it.
        # trained_models() strips the compile wrapper again for saving and loading.
        log.info("compiled kernels are kept in %s", keep_compiled_kernels())
        models = {name: torch.compile(model, mode=config.compile_mode) for name, model in models.items()}
    for model in models.values():
        model.train()  # LoRA dropout is active only in training mode
    return models, prepared[-2], prepared[-1]


def autocasts(accelerator: Accelerator) -> bool:
    """Whether the run's mixed precision turns autocast on (accelerate wraps the prepared models' forward in it)."""
    with accelerator.autocast():
        return torch.is_autocast_enabled(accelerator.device.type)


_compile_cache_we_set: str | None = None  # the TORCHINDUCTOR_CACHE_DIR this process chose (None: not chosen yet)


def keep_compiled_kernels() -> Path:
    """Inductor's cache (kernels, FX and AOT graphs) in the runs folder, unless the person set TORCHINDUCTOR_CACHE_DIR:
    its default, /tmp/torchinductor_USER, is emptied at each boot on most desktops, and a compile that finds its
    cache takes seconds where a first one takes minutes. Inductor reads the variable at each lookup, and writes its
    default there at its first; a value this function set earlier follows the home (tests and `--home` change it)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    global _compile_cache_we_set
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current in (None, _compile_cache_we_set, os.path.abspath(default_cache_dir())):
        current = _compile_cache_we_set = str(compile_cache_folder())
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = current
    return Path(current)


def record_metrics(session: Session, read: ReadStep, started: float, first_step: int) -> None:
    """One step's line in metrics.jsonl and TensorBoard, and its ProgressEvent."""
    loss = read.loss
    session.smoothed_loss = loss if session.smoothed_loss is None else 0.9 * session.smoothed_loss + 0.1 * loss
    elapsed = time.perf_counter() - started
    rate = (read.step - first_step) / elapsed if elapsed > 0 else 0.0
    eta = (session.total_steps - read.step) / rate if rate else 0.0
    line = {
        "step": read.step,
        "epoch": read.epoch,
        "loss": loss,
        "smoothed_loss": session.smoothed_loss,
        "lr": read.lr,
        "time": round(time.time(), 3),
    }
    session.run.append_metrics(line)
    if read.step == first_step + 1:  # the cold start's second part, beside the "prepared in" line
        compiled = " (torch.compile compiles during it)" if session.config.torch_compile else ""
        log.info("first step done %.1f s after training began%s", elapsed, compiled)
    if session.tensorboard is not None:
        for name in ("loss", "smoothed_loss", "lr"):
            session.tensorboard.add_scalar(f"train/{name}", line[name], read.step)
    emit(session, ProgressEvent(read.step, session.total_steps, read.epoch, loss, session.smoothed_loss, read.lr,
                                rate, eta, session.run_dir))  # fmt: skip


def open_tensorboard(run: RunFolder):
    """A SummaryWriter in the run's tensorboard/ if tensorboard is installed (an optional extra), else None."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run.tensorboard))


def next_micro_batch(session: Session, batches, upcoming):
    """This process's share of the next micro-step: one batch out of every `num_processes` in the global order."""
    world, rank = session.accelerator.num_processes, session.accelerator.process_index
    group = [upcoming] + [next(batches) for _ in range(world - 1)]
    return group[rank][1], next(batches)


def agreed_commands(session: Session) -> tuple[bool, bool, bool]:
    """Stop/save/sample as the main process received them, so every process acts alike."""
    taken = (session.commands.take_stop(), session.commands.take_save(), session.commands.take_sample())
    if session.accelerator.num_processes == 1:
        return taken  # no round trip through the device, which would wait for the step's kernels
    flags = broadcast(torch.tensor(taken, device=session.accelerator.device))
    return tuple(bool(f) for f in flags.tolist())


def queued_step(session: Session, micro_losses: list[tuple[list[int], torch.Tensor]]) -> QueuedStep:
    """The step just finished, its losses left on the device: their mean over micro-batches and processes."""
    loss = torch.stack([losses.mean() for _, losses in micro_losses]).mean()
    loss = session.accelerator.reduce(loss, reduction="mean")  # a collective on several GPUs; no host wait
    lr = current_rate(session.optimizer, session.lr_scheduler)
    return QueuedStep(session.step, session.position.epoch, lr, loss, micro_losses)


def read_losses(session: Session, pending: PendingLosses, started: float, first_step: int) -> None:
    """Read the pending steps' losses: metrics and per-image losses for each, up to a NaN or inf, which stops
    the run."""
    for read in pending.read():
        check_finite(read)
        for indices, losses in read.samples:
            session.image_losses.add(indices, losses)
        on_main(session, record_metrics, read, started, first_step)


def run_steps(session: Session, batches, upcoming, started: float, first_step: int, cpu_policy: CpuPolicy) -> bool:
    """Steps until the total is reached (False) or a stop is requested (True), with checkpoints and samples.

    Losses are read in batches on a GPU (`loss_reads`), always before whatever must see them."""
    config = session.config
    pending = PendingLosses(reads_deferred(session.device))

    def read_pending() -> None:
        read_losses(session, pending, started, first_step)

    while session.step < session.total_steps:
        micro_losses, epoch_before = [], session.position.epoch
        for micro in range(config.optimizer.gradient_accumulation_steps):
            indices, upcoming = next_micro_batch(session, batches, upcoming)
            cpu_policy.step_started()
            micro_losses.append((indices, training_step(session, indices, micro)))
            cpu_policy.step_finished()
            session.position = upcoming[0]  # saved state resumes from the next batch
        session.step += 1
        pending.add(queued_step(session, micro_losses))
        if pending.due():
            read_pending()  # before the commands: a Stop pressed on seeing this step's progress stops here
        stop, save, sample = agreed_commands(session)
        epoch_ended = session.position.epoch != epoch_before
        if stop or epoch_ended or session.step == session.total_steps:
            read_pending()
        if epoch_ended:
            on_main(session, record_training_image_losses)
        if stop:
            return True
        checkpoint = should_checkpoint(session, epoch_before) or save
        if validation_due(session, checkpoint, epoch_before):
            read_pending()
            validate_now(session)
        if checkpoint:
            read_pending()  # a NaN stops the run here, before its weights reach a file
            on_main(session, save_checkpoint)
        if samples_due(config.sample, session.step, epoch_before, session.position.epoch) or sample:
            read_pending()
            on_main(session, render_samples)
    return False


def train(session: Session) -> DoneEvent:
    """Run steps until the total is reached or a stop is requested; save the final LoRA."""
    config = session.config
    if session.accelerator.is_main_process:
        session.tensorboard = open_tensorboard(session.run)
    repeats = [i.repeats for i in session.items]
    batches = bucketing.iterate_batches(
        session.buckets, repeats, config.dataset.batch_size, config.seed, session.position
    )
    started, first_step = time.perf_counter(), session.step
    if config.sample.at_start and session.step == 0 and config.sample.on:
        on_main(session, render_samples)
    upcoming = next(batches)
    cpu_policy = CpuPolicy(session.accelerator.device.type, session.accelerator.num_processes)
    try:
        stopped = run_steps(session, batches, upcoming, started, first_step, cpu_policy)
    finally:
        cpu_policy.restore()
    if validation_due(session, True) and session.validated_step != session.step:
        validate_now(session)  # the final file's score (a stop's or the last step's)
    if stopped or config.save.save_state:
        on_main(session, save_checkpoint)
    final = session.run.final_lora(config.name)
    on_main(session, save_lora_file, final)
    on_main(session, record_file, final)
    if session.tensorboard is not None:
        session.tensorboard.close()
    if session.lock is not None:
        session.lock.release()  # the run is whole on disk: a resume or a delete may have it now
    done = DoneEvent(session.step, session.run_dir, final, stopped)
    emit(session, done)
    return done


def validate_now(session: Session) -> None:
    """A validation pass on the main process; every process notes the step, so all agree on the next one."""
    on_main(session, validate)
    session.validated_step = session.step


def record_training_image_losses(session: Session) -> None:
    """The finished epoch's loss per training image (this process's share), highest first, in image_losses.json."""
    losses = session.image_losses.take()
    by_path = {str(session.items[index].path): loss for index, loss in losses.items()}
    session.run.record_image_losses("training", session.step, by_path, epoch=session.position.epoch)


def run_training(
    config: TrainConfig, on_event=None, commands: Commands | None = None, resume_from: Path | None = None
) -> DoneEvent:
    """The whole run: prepare, resume if asked, train. Errors reach the caller as TrainingError/ConfigError,
    and `on_event` as an ErrorEvent with the same sentence; the run's lock is released however it ends."""
    handlers_before = set(logging.getLogger("lora_studio").handlers)
    session = None
    try:
        session = prepare(config, on_event, commands, run_dir=resume_from)
        if resume_from is not None:
            resume(session)
        return train(session)
    except LoraStudioError as exc:
        error = write_failure(session, exc) if isinstance(exc, WriteError) and session is not None else exc
        # The sentence the caller shows, kept in the run's log.txt too; info, so a console that shows
        # warnings (the CLI's) does not print it twice.
        log.info("the run stopped: %s", error)
        report_failure(on_event, session, str(error), getattr(error, "step", None))
        if error is exc:
            raise
        raise error from exc
    except Exception as exc:
        if is_out_of_memory(exc):
            error = out_of_memory(config, session)
            log.info("the run stopped: %s (%s)", error, str(exc).splitlines()[0][:300])
            report_failure(on_event, session, str(error))
            raise error from exc
        log.exception("training failed")  # the traceback goes to log.txt, never to the page
        where = session.run.log if session is not None else "the log"
        report_failure(on_event, session, f"unexpected failure ({type(exc).__name__}: {exc}); details are in {where}")
        raise
    finally:
        if session is not None and session.lock is not None:
            session.lock.release()
        for handler in set(logging.getLogger("lora_studio").handlers) - handlers_before:
            logging.getLogger("lora_studio").removeHandler(handler)
            handler.close()


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA (and XPU) out-of-memory error, or the MPS backend's RuntimeError saying the same."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def out_of_memory(config: TrainConfig, session: Session | None) -> TrainingError:
    """The one sentence for a GPU that ran out of memory: where, the three settings that help, and what was kept."""
    where = f"at step {session.step + 1}" if session is not None else "while loading the model and filling the caches"
    device = session.device if session is not None else pick_device()
    card = ""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card = f" ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    sdxl = (session.base.family if session is not None else config.family) == "sdxl"
    low_vram = "sdxl-low-vram" if sdxl else "sd15-low-vram"
    helps = (
        f"lower the batch size (now {config.dataset.batch_size})"
        + ("" if config.gradient_checkpointing else ", turn on gradient checkpointing")
        + f", or start from the {low_vram} preset"
    )
    if session is not None and session.saved_step is not None:
        resume_with = f"Resume (or --resume {session.run_dir})"
        kept = f"the state saved at step {session.saved_step} is kept, so {resume_with} goes on from there"
    else:
        kept = "no state had been saved yet, so start the run again"
    return TrainingError(f"the GPU{card} ran out of memory {where}; {helps}; {kept}")


def report_failure(on_event, session: Session | None, message: str, step: int | None = None) -> None:
    """Tell the caller's callback (the app's job, the CLI) why the run stopped, at `step` (by default the step
    under way); a failing callback is logged."""
    if on_event is None:
        return
    if step is None:
        step = session.step + 1 if session is not None else 0
    try:
        on_event(ErrorEvent(step, message))
    except Exception:
        log.exception("the event callback failed on ErrorEvent")
