"""The trainer on a tiny seeded model: loss goes down, only LoRA changes, exact resume, run folder, failures."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_studio import buckets as bucketing
from lora_studio import resume as resume_module
from lora_studio import step as step_module
from lora_studio import train as train_module
from lora_studio.config import TrainConfig, validate_config
from lora_studio.events import CheckpointEvent, Commands, DoneEvent, ErrorEvent, ProgressEvent
from lora_studio.runs import compile_cache_folder
from lora_studio.state import load_state, save_state
from lora_studio.train import TrainingError, keep_compiled_kernels, prepare, run_training


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for i in range(4):
        image = Image.new("RGB", (48, 32) if i % 2 else (32, 48), (60 * i, 100, 200))
        image.paste((250, 250, 250), (0, 0, 10, 10))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a thing number {i}")
    return folder


def tiny_config(tmp_path, tiny_folders, images, **sections) -> TrainConfig:
    settings = {
        "name": "tiny",
        "base_model": str(tiny_folders["sd1"]),
        "output_dir": str(tmp_path / "runs"),
        "mixed_precision": "no",
        "seed": 7,
        "dataset": {
            "path": str(images),
            "resolution": 32,
            "min_bucket_reso": 32,
            "max_bucket_reso": 64,
            "bucket_reso_steps": 16,
            "batch_size": 2,
            "trigger_word": "zkz",
            "cache_dir": str(tmp_path / "c"),
        },
        "lora": {"rank": 4, "alpha": 4.0},
        "optimizer": {
            "max_train_steps": 8,
            "learning_rate": 1e-3,
            "text_encoder_lr": 1e-3,
            "lr_scheduler": "constant",
        },
        "save": {"every_n_steps": 4, "every_n_epochs": 0, "precision": "fp32"},
        "sample": {"every_n_steps": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            settings[section] = {**settings.get(section, {}), **values}
        else:
            settings[section] = values
    return TrainConfig.model_validate(settings)


def stopper(step: int):
    """Commands plus an event handler that asks for a stop once `step` is done, as the Stop button does."""
    commands = Commands()

    def on_event(event):
        if isinstance(event, ProgressEvent) and event.step == step:
            commands.request_stop()

    return commands, on_event


def straight_and_resumed(tmp_path, tiny_folders, images, **settings):
    """The final LoRA tensors of a run straight through, and of the same run stopped at step 5 and resumed."""
    straight = run_training(tiny_config(tmp_path / "straight", tiny_folders, images, **settings))
    commands, stop_at_5 = stopper(5)
    config = tiny_config(tmp_path / "resumed", tiny_folders, images, **settings)
    stopped = run_training(config, on_event=stop_at_5, commands=commands)
    resumed = run_training(config, resume_from=stopped.run_dir)
    return straight, resumed, lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)


def lora_tensors(path):
    return load_file(str(path))


def test_loss_goes_down_on_a_fixed_batch(tmp_path, tiny_folders, images):
    config = tiny_config(
        tmp_path,
        tiny_folders,
        images,
        dataset={"repeats": 1},
        optimizer={"max_train_steps": 30, "learning_rate": 3e-3, "min_snr_gamma": None},
    )
    session = prepare(config)
    batch = [0, 2]

    def fixed_loss():
        """The loss on the same batch with the same noise and timesteps (16 draws per image)."""
        with torch.no_grad():
            repeated = batch * 8
            draws = step_module.sample_draws(123, 0, 0, repeated)
            return step_module.batch_loss(session, repeated, draws).item()

    before = fixed_loss()
    for _ in range(30):
        step_module.training_step(session, batch)
        session.step += 1
    assert fixed_loss() < 0.8 * before


def test_run_folder_events_and_lora_file(tmp_path, tiny_folders, images):
    config = tiny_config(tmp_path, tiny_folders, images)
    events = []
    done = run_training(config, on_event=events.append)
    run = done.run_dir
    assert run.parent == tmp_path / "runs" and run.name.startswith("tiny-")
    for name in (
        "config.toml",
        "metrics.jsonl",
        "log.txt",
        "tiny.safetensors",
        "state/trainer.safetensors",
        "checkpoints/tiny-step000004.safetensors",
        "checkpoints/tiny-step000008.safetensors",
    ):
        assert (run / name).is_file(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 9))
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert [e.step for e in progress] == list(range(1, 9)) and progress[-1].total_steps == 8
    assert isinstance(events[-1], DoneEvent) and not events[-1].stopped_early
    assert sum(isinstance(e, CheckpointEvent) for e in events) >= 2
    log = (run / "log.txt").read_text()  # the cold start, in two parts: preparing, then the first step
    assert re.search(r"prepared .* in \d+\.\d s: 4 images, 8 steps", log), log
    assert re.search(r"first step done \d+\.\d s after training began\n", log), log

    lora = lora_tensors(done.lora_path)
    assert lora and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora)  # kohya
    assert any(k.startswith("lora_unet_") for k in lora) and any(k.startswith("lora_te_") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_up" in k), "up moved away from its zero init"


def test_epoch_checkpoints_when_steps_straddle_epoch_boundaries(tmp_path, tiny_folders, images):
    """4 batches an epoch, 3 per step (accumulation): epochs end inside steps 2, 3 and 4, and each is saved."""
    config = tiny_config(
        tmp_path,
        tiny_folders,
        images,
        dataset={"batch_size": 1},
        optimizer={"max_train_steps": None, "max_train_epochs": 3, "gradient_accumulation_steps": 3},
        save={"every_n_steps": 0, "every_n_epochs": 1, "save_state": False},
    )
    events = []
    done = run_training(config, on_event=events.append)
    assert done.step == 4  # 3 epochs x 4 batches / 3 batches a step
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [2, 3, 4]
    saved = sorted(p.name for p in (done.run_dir / "checkpoints").iterdir())
    assert saved == [f"tiny-step00000{step}.safetensors" for step in (2, 3, 4)]


@pytest.mark.parametrize(
    "every, before, after, due",
    [(1, 0, 1, True), (2, 0, 1, False), (2, 1, 2, True), (2, 0, 3, True), (3, 0, 2, False), (0, 0, 1, False),
     (1, 2, 2, False)],
)  # fmt: skip
def test_an_epoch_checkpoint_is_due_when_a_finished_epoch_is_a_multiple(every, before, after, due):
    assert bucketing.epochs_due(every, before, after) is due


def test_only_lora_parameters_change(tmp_path, tiny_folders, images):
    session = prepare(tiny_config(tmp_path, tiny_folders, images, optimizer={"max_train_steps": 3}))
    modules = [session.base.unet, session.base.vae, *session.base.text_encoders]

    def snapshot():
        return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]

    before = snapshot()
    train_module.train(session)
    after = snapshot()
    changed = {k for b, a in zip(before, after, strict=True) for k in b if not torch.equal(b[k], a[k])}
    assert changed, "training changed nothing"
    assert all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]


@pytest.mark.parametrize("cached", [True, False], ids=["cached-latents", "random-crop-and-flip"])
def test_stop_then_resume_is_bit_identical(tmp_path, tiny_folders, images, cached):
    augment = (
        {}
        if cached
        else {
            "cache_latents": False,
            "random_crop": True,
            "flip_aug": True,
            "shuffle_caption": True,
            "caption_dropout_rate": 0.2,
        }
    )
    straight = run_training(tiny_config(tmp_path / "a", tiny_folders, images, dataset=augment))

    commands, stop_at_5 = stopper(5)

    config = tiny_config(tmp_path / "b", tiny_folders, images, dataset=augment)
    stopped = run_training(config, on_event=stop_at_5, commands=commands)
    assert stopped.stopped_early and stopped.step == 5
    resumed = run_training(config, resume_from=stopped.run_dir)
    assert resumed.step == 8 and resumed.run_dir == stopped.run_dir

    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_loss_scale_resumes(tmp_path, tiny_folders, images, monkeypatch):
    """A resumed fp16 run goes on with the loss scale it had, not a fresh 65536 (which would skip steps
    on overflow while it backs off again). accelerate makes the GradScaler of fp16 runs on GPUs only, so
    a real CPU GradScaler stands in, growing every step so that its state matters."""
    make_accelerator = train_module.make_accelerator

    def with_cpu_scaler(config):
        accelerator = make_accelerator(config)
        accelerator.scaler = torch.amp.GradScaler("cpu", growth_interval=1)
        return accelerator

    monkeypatch.setattr(train_module, "make_accelerator", with_cpu_scaler)
    straight = prepare(tiny_config(tmp_path / "a", tiny_folders, images, mixed_precision="fp16"))
    train_module.train(straight)
    commands, stop_at_5 = stopper(5)

    config = tiny_config(tmp_path / "b", tiny_folders, images, mixed_precision="fp16")
    stopped = prepare(config, stop_at_5, commands)
    train_module.train(stopped)
    resumed = prepare(config, run_dir=stopped.run_dir)
    resume_module.resume(resumed)
    train_module.train(resumed)

    assert stopped.step == 5 and resumed.step == straight.step == 8
    assert resumed.accelerator.scaler.get_scale() == straight.accelerator.scaler.get_scale() > 65536
    a, b = resume_module.lora_state_dicts(straight), resume_module.lora_state_dicts(resumed)
    assert all(torch.equal(a[part][k], b[part][k]) for part in a for k in a[part])


def test_a_full_disk_at_a_save_stops_clearly_and_keeps_the_last_whole_state(
    tmp_path, tiny_folders, images, small_disk
):
    """The run folder lies on a small disk that fills up after the step-4 checkpoint: the step-8 save fails
    for real (ENOSPC). The run stops with a sentence that says what to do, the state saved at step 4 stays
    whole (the LoRA, optimizer and position of one step, never a mix, no temp file left), the error reaches
    the event callback too, and resuming once there is room reaches the weights of a run that never failed."""
    from lora_studio.events import CheckpointEvent, ErrorEvent

    straight = run_training(tiny_config(tmp_path / "a", tiny_folders, images))
    config = tiny_config(tmp_path / "b", tiny_folders, images, output_dir=str(small_disk.folder))
    errors = []

    def fill_after_step_4(event):
        if isinstance(event, CheckpointEvent) and event.step == 4:
            small_disk.fill()
        if isinstance(event, ErrorEvent):
            errors.append(event.message)

    message = r"could not save .* at step 8: No space left on device; free disk space, then continue with "
    with pytest.raises(TrainingError, match=message + r"`lora-studio train --resume .*`"):
        run_training(config, on_event=fill_after_step_4)
    assert len(errors) == 1 and "No space left on device" in errors[0]
    small_disk.free()

    (run_dir,) = (p for p in small_disk.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert "could not save" in (run_dir / "log.txt").read_text()
    assert [p.name for p in (run_dir / "state").iterdir()] == ["trainer.safetensors"]  # no temp file left
    assert not [p for p in run_dir.rglob("*.tmp")]
    assert load_state(run_dir / "state" / "trainer.safetensors")["step"] == 4
    resumed = run_training(config, resume_from=run_dir)
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert resumed.step == 8 and all(torch.equal(a[k], b[k]) for k in a)


def test_states_of_earlier_runs_resume_and_unreadable_ones_are_refused(tmp_path, tiny_folders, images):
    """Runs saved before 2026-11-28 kept the LoRA in state/lora.safetensors beside trainer.safetensors."""
    straight = run_training(tiny_config(tmp_path / "a", tiny_folders, images))
    commands, stop_at_5 = stopper(5)
    config = tiny_config(tmp_path / "b", tiny_folders, images)
    stopped = run_training(config, on_event=stop_at_5, commands=commands)
    state_dir = stopped.run_dir / "state"
    trainer = load_state(state_dir / "trainer.safetensors")
    save_state({"lora": trainer.pop("lora")}, state_dir / "lora.safetensors")
    save_state(trainer, state_dir / "trainer.safetensors")

    resumed = run_training(config, resume_from=stopped.run_dir)
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert resumed.step == 8 and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in state_dir.iterdir()] == ["trainer.safetensors"]  # rewritten in one file

    (state_dir / "trainer.safetensors").write_bytes(b"not a state")
    with pytest.raises(TrainingError, match=r"the saved state .*trainer.safetensors cannot be read .*start a new run"):
        run_training(config, resume_from=stopped.run_dir)


def test_a_resume_that_changes_the_state_shape_is_refused_and_the_run_stays_resumable(tmp_path, tiny_folders, images):
    commands, stop_at_3 = stopper(3)
    config = tiny_config(tmp_path, tiny_folders, images)
    stopped = run_training(config, on_event=stop_at_3, commands=commands)
    recorded = (stopped.run_dir / "config.toml").read_text()

    bigger = tiny_config(tmp_path, tiny_folders, images, lora={"rank": 8, "loraplus_lr_ratio": 16},
                         optimizer={"optimizer": "adafactor"})  # fmt: skip
    refusal = (r"cannot resume with `lora.rank` from 4 to 8, `lora.loraplus_lr_ratio` from 0.0 to 16.0, "
               r"`optimizer.optimizer` from 'adamw' to 'adafactor'")  # fmt: skip
    with pytest.raises(TrainingError, match=refusal + ".*resume without changing them, or start a new run"):
        run_training(bigger, resume_from=stopped.run_dir)
    other_family = tiny_config(tmp_path, tiny_folders, images, base_model=str(tiny_folders["sd2"]), family="sd2")
    with pytest.raises(TrainingError, match=r"does not fit this run's model and settings \(.*size mismatch"):
        run_training(other_family, resume_from=stopped.run_dir)

    assert (stopped.run_dir / "config.toml").read_text() == recorded  # the refusals wrote nothing
    assert run_training(config, resume_from=stopped.run_dir).step == 8


def test_resume_after_sigkill_is_bit_identical(tmp_path, tiny_folders, images):
    """A process killed with SIGKILL after its last state save (step 4) resumes to the same weights."""
    straight = run_training(tiny_config(tmp_path / "a", tiny_folders, images))
    config = tiny_config(tmp_path / "b", tiny_folders, images)
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    script = textwrap.dedent(
        f"""
        import os, signal
        from lora_studio.config import TrainConfig
        from lora_studio.events import ProgressEvent
        from lora_studio.train import run_training
        config = TrainConfig.model_validate_json(open({str(config_file)!r}).read())
        def kill_at_6(event):
            if isinstance(event, ProgressEvent) and event.step == 6:
                os.kill(os.getpid(), signal.SIGKILL)
        run_training(config, on_event=kill_at_6)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    run_dir = next((tmp_path / "b" / "runs").iterdir())
    assert (run_dir / "checkpoints" / "tiny-step000004.safetensors").is_file()
    assert not (run_dir / "tiny.safetensors").exists()
    resumed = run_training(config, resume_from=run_dir)
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def loss_nan_at(monkeypatch, call: int) -> dict:
    """Make the losses of the `call`-th training step NaN; returns the count of steps taken."""
    real = train_module.training_step
    calls = {"n": 0}

    def nan_at(session, indices, micro=0):
        calls["n"] += 1
        loss = real(session, indices, micro)
        return torch.full_like(loss, float("nan")) if calls["n"] == call else loss

    monkeypatch.setattr(train_module, "training_step", nan_at)
    return calls


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, tiny_folders, images, monkeypatch):
    loss_nan_at(monkeypatch, 6)
    events = []
    with pytest.raises(TrainingError, match="loss became nan at step 6.*learning rate"):
        run_training(tiny_config(tmp_path, tiny_folders, images), on_event=events.append)
    assert isinstance(events[-1], ErrorEvent) and events[-1].step == 6
    run_dir = next((tmp_path / "runs").iterdir())
    assert (run_dir / "checkpoints" / "tiny-step000004.safetensors").is_file()
    assert not (run_dir / "tiny.safetensors").exists()


def test_gpu_out_of_memory_is_one_sentence_and_the_last_state_resumes(tmp_path, tiny_folders, images, monkeypatch):
    """Issue 17: what ran out, at which step, the settings that help, and what was kept; then Resume works.
    The CPU has no GPU to exhaust, so the 6th step raises torch's own OutOfMemoryError, as CUDA would."""
    real = train_module.training_step
    calls = {"n": 0}

    def out_of_memory_at_6(session, indices, micro=0):
        calls["n"] += 1
        if calls["n"] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(session, indices, micro)

    monkeypatch.setattr(train_module, "training_step", out_of_memory_at_6)
    events = []
    with pytest.raises(TrainingError) as raised:
        run_training(tiny_config(tmp_path, tiny_folders, images), on_event=events.append)
    message = str(raised.value)
    assert message.startswith("the GPU ran out of memory at step 6; lower the batch size (now 2), turn on gradient "
                              "checkpointing, or start from the sd15-low-vram preset; the state saved at step 4 is "
                              "kept")  # fmt: skip
    assert "\n" not in message and isinstance(events[-1], ErrorEvent) and events[-1].message == message
    run_dir = next((tmp_path / "runs").iterdir())
    assert "ran out of memory at step 6" in (run_dir / "log.txt").read_text()
    monkeypatch.setattr(train_module, "training_step", real)
    done = run_training(tiny_config(tmp_path, tiny_folders, images, dataset={"batch_size": 1}), resume_from=run_dir)
    assert done.step == 8 and done.lora_path.is_file()


def test_cached_runs_keep_the_vae_and_frozen_encoders_off_the_device_and_train_the_same(
    tmp_path, tiny_folders, images
):
    """Issue 17's low-VRAM mode: with latents and embeddings cached, no step touches the VAE or the frozen
    text encoders. Moved to the meta device (any use would raise), the run trains exactly the same weights."""
    from lora_studio.session import frozen_parts_on_device, offload_frozen_parts, offloadable_parts

    cached = {"cache_latents": True, "cache_text_embeddings": True}
    frozen = {"train_text_encoder": False}
    plain = run_training(tiny_config(tmp_path / "a", tiny_folders, images, dataset=cached, lora=frozen))
    session = prepare(tiny_config(tmp_path / "b", tiny_folders, images, dataset=cached, lora=frozen))
    assert set(offloadable_parts(session.config, session.base)) == {"vae", "text_encoder"}
    offload_frozen_parts(session, to="meta")
    parts = [session.base.vae, *session.base.text_encoders]
    offloaded = train_module.train(session)
    assert all(p.device.type == "meta" for m in parts for p in m.parameters())
    a, b = lora_tensors(plain.lora_path), lora_tensors(offloaded.lora_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Samples bring them to the training device for the rendering and send them back after.
    moves = []
    real_to = torch.nn.Module.to
    session.offloaded = {"vae": session.base.vae}

    def recording_to(module, *args, **kwargs):
        if module is session.base.vae:
            moves.append(str(args[0]))
        return module if module is session.base.vae else real_to(module, *args, **kwargs)

    torch.nn.Module.to = recording_to
    try:
        with frozen_parts_on_device(session):
            assert moves == ["cpu"]
    finally:
        torch.nn.Module.to = real_to
    assert moves == ["cpu", "meta"]
    training_encoder = session.config.model_copy(deep=True)
    training_encoder.lora.train_text_encoder = True  # a trained encoder stays: steps run it
    assert set(offloadable_parts(training_encoder, session.base)) == {"vae"}


def test_low_vram_parks_the_unet_while_the_caches_fill(tmp_path, tiny_folders, images, monkeypatch):
    """With low_vram the UNet leaves the training device before any cache is filled and is back before the
    first step; the caches are filled by the VAE and the text encoder on their own device. The CPU has one
    device, so the UNet's moves are recorded rather than made."""
    from lora_studio.cache import LatentCache, TextCache

    events = []
    monkeypatch.setattr(train_module, "unet_parked", recording_park(events))
    for cache in (LatentCache, TextCache):
        real_fill = cache.fill

        def fill(self, *args, _real=real_fill, **kwargs):
            events.append("fill")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cache, "fill", fill)
    cached = {"cache_latents": True, "cache_text_embeddings": True}
    config = tiny_config(tmp_path, tiny_folders, images, dataset=cached, lora={"train_text_encoder": False})
    run_training(config.model_copy(update={"low_vram": True}))
    assert events == ["parked", "fill", "fill", "back"]
    events.clear()
    run_training(config)
    assert events == ["fill", "fill"]


def test_a_parked_unet_goes_to_the_park_and_comes_back_to_its_device(tiny_folders):
    from lora_studio.models import load_base

    base = load_base(str(tiny_folders["sd1"]), torch.float32, "cpu")
    moves = []
    base.unet.to = lambda where: moves.append(str(where)) or base.unet  # one real device here: record the moves
    with train_module.unet_parked(base, park="meta"):
        assert moves == ["meta"]
    assert moves == ["meta", "cpu"]
    with train_module.unet_parked(base, park="cpu"):  # already there: nothing moves
        pass
    assert moves == ["meta", "cpu"]


def recording_park(events):
    from contextlib import contextmanager

    @contextmanager
    def park(base, to="cpu"):
        assert base.unet.device.type == "cpu"
        events.append("parked")
        yield
        events.append("back")

    return park


def test_a_failing_callback_never_stops_training(tmp_path, tiny_folders, images):
    def broken(event):
        raise RuntimeError("the UI went away")

    done = run_training(tiny_config(tmp_path, tiny_folders, images, optimizer={"max_train_steps": 2}), on_event=broken)
    assert done.step == 2 and done.lora_path.is_file()


def test_save_now_command(tmp_path, tiny_folders, images):
    commands = Commands()
    commands.request_save()
    events = []
    run_training(
        tiny_config(tmp_path, tiny_folders, images, save={"every_n_steps": 0}, optimizer={"max_train_steps": 3}),
        on_event=events.append,
        commands=commands,
    )
    checkpoints = [e.step for e in events if isinstance(e, CheckpointEvent)]
    assert checkpoints[0] == 1, "the save request was honoured after the first step"


def test_dataset_errors_stop_before_any_model_loads(tmp_path, tiny_folders, images, monkeypatch):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not an image")
    monkeypatch.setattr(train_module, "load_base", lambda *a, **k: pytest.fail("the model must not load"))
    config = tiny_config(tmp_path, tiny_folders, images, dataset={"path": str(tmp_path / "bad")})
    with pytest.raises(TrainingError, match="the dataset has 1 error.*x.png: not a readable image"):
        run_training(config)


def test_optimizer_errors_name_the_alternative(tmp_path, tiny_folders, images):
    with pytest.raises(TrainingError, match="needs a CUDA GPU.*optimizer = 'adamw'"):
        run_training(tiny_config(tmp_path, tiny_folders, images, optimizer={"optimizer": "adamw8bit"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "prodigyopt", None)  # what `import prodigyopt` meets when it is not installed
        with pytest.raises(TrainingError, match="pip install prodigyopt"):
            run_training(tiny_config(tmp_path / "p", tiny_folders, images, optimizer={"optimizer": "prodigy"}))


@pytest.mark.parametrize("name, kind", [("prodigy", "prodigyopt.Prodigy"), ("dadapt_adam", "dadaptation.DAdaptAdam")])
def test_prodigy_trains_and_resumes_bit_identically(tmp_path, tiny_folders, images, name, kind):
    """Prodigy (and D-Adaptation, its forerunner) keeps its step-size estimate in the optimizer's param groups; the
    saved state must carry it."""
    import importlib

    module, cls = kind.split(".")
    optimizer = {"optimizer": name, "learning_rate": 1.0, "text_encoder_lr": 1.0}
    config = tiny_config(tmp_path / "b", tiny_folders, images, optimizer=optimizer)
    assert isinstance(prepare(config).optimizer.optimizer, getattr(importlib.import_module(module), cls))
    straight = run_training(tiny_config(tmp_path / "a", tiny_folders, images, optimizer=optimizer))
    commands, stop_at_5 = stopper(5)

    stopped = run_training(config, on_event=stop_at_5, commands=commands)
    resumed = run_training(config, resume_from=stopped.run_dir)
    assert stopped.step == 5 and resumed.step == 8
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)
    # The logged rate is the step it takes, d x lr (kohya's d*lr): it starts at d0 = 1e-6 and grows.
    lines = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [line["lr"] for line in lines if "lr" in line]
    assert len(rates) == 8 and rates[0] < 1e-3 and rates[-1] > rates[0]


def test_tensorboard_gets_every_step_when_installed(tmp_path, tiny_folders, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = run_training(tiny_config(tmp_path / "a", tiny_folders, images, optimizer={"max_train_steps": 3}))
    logged = [json.loads(line) for line in (done.run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(done.run_dir / "tensorboard"))
    events.Reload()
    for name in ("loss", "smoothed_loss", "lr"):
        scalars = events.Scalars(f"train/{name}")
        assert [e.step for e in scalars] == [1, 2, 3]
        assert [e.value for e in scalars] == pytest.approx([m[name] for m in logged], rel=1e-6)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorboard", None)  # not installed: metrics.jsonl only
        done = run_training(tiny_config(tmp_path / "b", tiny_folders, images, optimizer={"max_train_steps": 1}))
    assert (done.run_dir / "metrics.jsonl").is_file() and not (done.run_dir / "tensorboard").exists()


def test_adafactor_and_schedulers_run(tmp_path, tiny_folders, images):
    done = run_training(
        tiny_config(
            tmp_path,
            tiny_folders,
            images,
            optimizer={
                "optimizer": "adafactor",
                "lr_scheduler": "cosine_with_restarts",
                "lr_warmup_steps": 2,
                "lr_scheduler_num_cycles": 2,
                "max_train_steps": 4,
                "gradient_accumulation_steps": 2,
            },
        )
    )
    lrs = [json.loads(line)["lr"] for line in (done.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 4 and lrs[0] < lrs[1], "warm-up raises the rate"


def test_family_mismatch_is_refused(tmp_path, tiny_folders, images):
    with pytest.raises(TrainingError, match="the preset is for sdxl"):
        run_training(tiny_config(tmp_path, tiny_folders, images, family="sdxl"))


def test_samples_as_every_nth_epoch_ends(tmp_path, tiny_folders, images):
    """kohya's sample_every_n_epochs: 4 images in two buckets at batch 2 make 2 steps an epoch, so epoch 3 ends at
    step 6; with every_n_steps 0 and at_start, the base model's samples come first."""
    sample = {"every_n_steps": 0, "every_n_epochs": 3, "at_start": True, "strengths": [1.0], "seeds": [3],
              "num_inference_steps": 2, "sampler": "ddim", "width": 32, "height": 32}  # fmt: skip
    events = []
    run_training(tiny_config(tmp_path, tiny_folders, images, sample=sample), on_event=events.append)
    assert [e.step for e in events if type(e).__name__ == "SampleEvent"] == [0, 6]
    kohya = validate_config({"train_data_dir": "x", "sample_every_n_epochs": 2, "sample_every_n_steps": 0})
    assert (kohya.sample.every_n_epochs, kohya.sample.every_n_steps, kohya.sample.on) == (2, 0, True)


def test_samples_at_several_strengths_and_strength_zero_is_the_base_model(tmp_path, tiny_folders, images):
    from lora_studio.models import load_base
    from lora_studio.sample import render

    sample = {
        "every_n_steps": 4,
        "strengths": [0.0, 1.0],
        "seeds": [3],
        "num_inference_steps": 2,
        "sampler": "ddim",
        "width": 32,
        "height": 32,
    }
    events = []
    done = run_training(
        tiny_config(
            tmp_path, tiny_folders, images, sample=sample, optimizer={"learning_rate": 5e-2, "text_encoder_lr": 5e-2}
        ),
        on_event=events.append,
    )
    folder = done.run_dir / "samples" / "step-000008"
    assert sorted(p.name for p in folder.iterdir()) == ["s0.00-seed3.png", "s1.00-seed3.png"]
    assert sum(type(e).__name__ == "SampleEvent" for e in events) == 2  # steps 4 and 8

    base = load_base(tiny_folders["sd1"], device="cpu").pipeline
    base.set_progress_bar_config(disable=True)
    from lora_studio.sample import use_sampler

    use_sampler(base, "ddim")
    prompt = "zkz, a thing number 0"
    plain = render(base, [prompt], [1.0], [3], steps=2, guidance=7.0, size=(32, 32))[0].image
    base.load_lora_weights(str(done.lora_path))
    at_zero, at_one = (r.image for r in render(base, [prompt], [0.0, 1.0], [3], steps=2, guidance=7.0, size=(32, 32)))
    assert at_zero.tobytes() == plain.tobytes(), "strength 0 is exactly the base model"
    assert at_one.tobytes() != plain.tobytes()
    saved = Image.open(folder / "s0.00-seed3.png")
    assert saved.size == (32, 32)


def test_conflicting_settings_are_all_reported_before_loading(tmp_path, tiny_folders, images):
    from lora_studio.errors import ConfigError

    config = tiny_config(
        tmp_path,
        tiny_folders,
        images,
        base_model=" ",
        dataset={"random_crop": True, "cache_text_embeddings": True, "shuffle_caption": True},
    )
    with pytest.raises(ConfigError) as info:
        run_training(config)
    text = str(info.value)
    assert "3 problem(s)" in text and "`base_model` is empty" in text
    assert "random_crop" in text and "text encoder is being trained" in text


@pytest.mark.parametrize("family", ["sdxl", "sd2-v"])
def test_sdxl_conditioning_and_v_prediction_train(tmp_path, tiny_folders, images, family):
    """SDXL: two encoders, pooled embeddings and micro-conditioning time ids; SD2-768: v-prediction targets."""
    config = tiny_config(
        tmp_path,
        tiny_folders,
        images,
        base_model=str(tiny_folders[family]),
        optimizer={"max_train_steps": 3, "learning_rate": 1e-2, "text_encoder_lr": 1e-2},
        save={"every_n_steps": 1, "keep_last": 1},
        clip_skip=2,
    )
    session = prepare(config)
    assert session.noise_scheduler.config.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    done = train_module.train(session)
    lora = lora_tensors(done.lora_path)
    prefixes = {k.split("_", 2)[1] for k in lora}  # kohya: lora_unet_, lora_te_ (SD1/2), lora_te1_/lora_te2_ (SDXL)
    # SDXL with clip skip 2 reads the tiny 2-layer first encoder's embeddings only: no layer of it gets an adapter
    assert prefixes == ({"unet", "te2"} if family == "sdxl" else {"unet", "te"})
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_up" in k)
    assert len(list((done.run_dir / "checkpoints").iterdir())) == 1, "keep_last = 1 prunes older checkpoints"


def test_sample_now_command(tmp_path, tiny_folders, images):
    commands = Commands()
    commands.request_sample()
    sample = {
        "every_n_steps": 0,
        "strengths": [0.5],
        "seeds": [1],
        "num_inference_steps": 1,
        "width": 32,
        "height": 32,
    }
    events = []
    run_training(
        tiny_config(tmp_path, tiny_folders, images, sample=sample, optimizer={"max_train_steps": 2}),
        on_event=events.append,
        commands=commands,
    )
    samples = [e for e in events if type(e).__name__ == "SampleEvent"]
    assert len(samples) == 1 and samples[0].step == 1 and samples[0].images[0].name == "s0.50-seed1.png"


def test_runs_of_different_precision_follow_each_other_in_one_process(tmp_path, tiny_folders, images):
    """The app trains many runs in one process: accelerate's per-process state must not pin the first
    run's precision (it raised "AcceleratorState has already been initialized" on the second)."""
    precisions = []
    for i, precision in enumerate(["no", "bf16", "no"]):
        config = tiny_config(
            tmp_path / str(i), tiny_folders, images, mixed_precision=precision, optimizer={"max_train_steps": 1}
        )
        session = prepare(config)
        precisions.append(session.accelerator.mixed_precision)
        with session.accelerator.autocast():
            autocast = torch.is_autocast_enabled("cpu")
        assert autocast == (precision == "bf16")
        assert train_module.train(session).lora_path.is_file()
    assert precisions == ["no", "bf16", "no"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_samples_render_during_bf16_training(tmp_path, tiny_folders, images, family):
    """bf16 base weights beside fp32 LoRA weights: samples render under the training autocast.

    Without it the fp32 LoRA outputs reached the bf16 VAE, and the first sample stopped the run."""
    sample = {"every_n_steps": 1, "strengths": [0.0, 1.0], "seeds": [1], "num_inference_steps": 1}
    events = []
    done = run_training(
        tiny_config(
            tmp_path,
            tiny_folders,
            images,
            base_model=str(tiny_folders[family]),
            mixed_precision="bf16",
            sample={**sample, "width": 32, "height": 32},
            optimizer={"max_train_steps": 1},
        ),
        on_event=events.append,
    )
    assert [type(e).__name__ for e in events if type(e).__name__ in ("SampleEvent", "ErrorEvent")] == ["SampleEvent"]
    folder = done.run_dir / "samples" / "step-000001"
    assert sorted(p.name for p in folder.iterdir()) == ["s0.00-seed1.png", "s1.00-seed1.png"]
    assert Image.open(folder / "s1.00-seed1.png").size == (32, 32)


def copies_in_one_step(session) -> int:
    """How many dtype copies (aten::_to_copy) one batch's forward and backward make."""
    from torch.profiler import profile

    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
        step_module.batch_loss(session, [0, 1], step_module.sample_draws(5, 0, 0, [0, 1])).backward()
    return sum(event.count for event in profiled.key_averages() if event.key == "aten::_to_copy")


def cast_flags(session) -> list[bool]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m.cast_input_dtype_enabled for model in session.models.values() for m in model.modules()
            if isinstance(m, BaseTunerLayer)]  # fmt: skip


@pytest.mark.parametrize("lora", [{}, {"network": "lokr", "unet_targets": "full"}], ids=["lora", "lokr-full"])
def test_a_bf16_run_s_adapters_take_their_input_as_it_comes_and_train_the_same(tmp_path, tiny_folders, images,
                                                                               monkeypatch, lora):  # fmt: skip
    """Issue 17 (fewer kernels a step): under the bf16 autocast, peft no longer copies each adapted layer's input to
    fp32 for autocast to copy back (`lora.skip_input_casts`). The same run with peft's casts trains the same weights,
    losses and samples, bit for bit, in the UNet and the trained text encoder; a step makes 2+ fewer copies a layer."""
    settings = dict(mixed_precision="bf16", lora=lora, sample={"every_n_steps": 4, "strengths": [1.0], "seeds": [1],
                    "num_inference_steps": 1, "width": 32, "height": 32})  # fmt: skip

    def trained(folder):
        session = prepare(tiny_config(folder, tiny_folders, images, **settings))
        train_module.train(session)
        return session

    skipping = trained(tmp_path / "a")
    monkeypatch.setattr(train_module, "skip_input_casts", lambda models: 0)
    casting = trained(tmp_path / "b")

    assert set(skipping.models) == {"unet", "text_encoder"}
    skipped = cast_flags(skipping)
    assert len(skipped) > 20 and not any(skipped) and all(cast_flags(casting))
    a, b = resume_module.lora_state_dicts(skipping), resume_module.lora_state_dicts(casting)
    assert a.keys() == b.keys() and all(torch.equal(a[part][k], b[part][k]) for part in a for k in a[part])
    losses = [[json.loads(line)["loss"] for line in (s.run_dir / "metrics.jsonl").read_text().splitlines()]
              for s in (skipping, casting)]  # fmt: skip
    assert len(losses[0]) == 8 and losses[0] == losses[1]
    samples = [sorted((s.run_dir / "samples").rglob("*.png")) for s in (skipping, casting)]
    assert len(samples[0]) == 2 and [p.read_bytes() for p in samples[0]] == [p.read_bytes() for p in samples[1]]
    assert copies_in_one_step(skipping) <= copies_in_one_step(casting) - 2 * len(skipped)


def test_adapters_whose_input_meets_other_arithmetic_keep_peft_s_cast(tmp_path, tiny_folders, images):
    """DoRA's norm terms and LoRA dropout's draws see the input in its own dtype, so skipping the cast could round
    differently: those layers keep it. A run without autocast keeps every cast (needed there)."""
    dora = prepare(tiny_config(tmp_path / "a", tiny_folders, images, mixed_precision="bf16", lora={"use_dora": True}))
    dropout = prepare(tiny_config(tmp_path / "b", tiny_folders, images, mixed_precision="bf16", lora={"dropout": 0.1}))
    plain = prepare(tiny_config(tmp_path / "c", tiny_folders, images))
    for session in (dora, dropout, plain):
        flags = cast_flags(session)
        assert len(flags) > 20 and all(flags)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_trains_the_same_weights(tmp_path, tiny_folders, images, mode):
    """torch_compile (inductor, about a minute to compile here) changes speed, not the result. On the CPU
    'reduce-overhead' records no CUDA graphs, but runs its own step marking; the GPU check is
    bench/compile_equality.py (bench/device_check.sh equal)."""
    config = tiny_config(tmp_path / "a", tiny_folders, images, optimizer={"max_train_steps": 3})
    plain = lora_tensors(run_training(config).lora_path)
    update = {"torch_compile": True, "compile_mode": mode, "output_dir": str(tmp_path / "b")}
    compiled_config = config.model_copy(update=update)
    compiled = lora_tensors(run_training(compiled_config).lora_path)
    assert plain.keys() == compiled.keys()
    assert all(torch.allclose(plain[k], compiled[k], atol=1e-4) for k in plain)
    assert any(v.abs().sum() > 0 for k, v in compiled.items() if "lora_up" in k)
    kept = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # what inductor compiled is kept in the runs folder
    assert kept == compile_cache_folder() and any(kept.rglob("*.py"))


def test_compiled_kernels_are_kept_in_the_runs_folder_unless_the_person_chose_a_place(tmp_path, tiny_folders, images,
                                                                                      monkeypatch):  # fmt: skip
    """Inductor's default cache, /tmp/torchinductor_USER, is emptied at each boot on most desktops, so a compiled
    run would compile from scratch (minutes) after every restart of the machine. A run with torch_compile points
    inductor at runs/.cache/torch-compile in the home; a TORCHINDUCTOR_CACHE_DIR the person set is left alone."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # inductor writes its default there once used
    prepare(tiny_config(tmp_path, tiny_folders, images, torch_compile=True))  # compiles lazily: at its first step
    assert Path(cache_dir()) == tmp_path / "home" / "runs" / ".cache" / "torch-compile"
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "other"))  # the app's --home, or the next test's
    assert keep_compiled_kernels() == tmp_path / "other" / "runs" / ".cache" / "torch-compile" == Path(cache_dir())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert keep_compiled_kernels() == tmp_path / "mine" == Path(cache_dir())


def test_bench_timing_helper_times_real_training_steps(tmp_path, tiny_folders, images, monkeypatch):
    """bench/stepping.py, which bench/train_step.py and bench/gpu_step.py time our trainer with."""
    monkeypatch.syspath_prepend(str(os.path.join(os.path.dirname(__file__), "..", "bench")))
    from stepping import time_run_steps, time_training_steps

    session = prepare(tiny_config(tmp_path, tiny_folders, images, save={"every_n_steps": 0}))
    params = [p for group in session.optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    warmup_s, times = time_training_steps(session, steps=3, warmup_steps=1)
    assert session.step == 3 and len(times) == 3 and min(times) > 0 and warmup_s > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))  # the steps trained
    assert time_run_steps(session, 2) > 0 and session.step == 5  # the trainer's own loop, as a run steps
    assert [row["step"] for row in session.run.read_metrics()] == [4, 5]


def test_compile_mode_needs_a_compiled_model_and_no_accumulation():
    assert not TrainConfig(torch_compile=True, compile_mode="reduce-overhead").combination_problems()
    problems = TrainConfig(compile_mode="reduce-overhead").combination_problems()
    assert problems == ["`compile_mode` = 'reduce-overhead' acts only on a compiled model; set torch_compile = true, "
                        "or compile_mode = 'default'"]  # fmt: skip
    accumulating = {"torch_compile": True, "compile_mode": "reduce-overhead",
                    "optimizer": {"gradient_accumulation_steps": 2}}  # fmt: skip
    assert any("cannot accumulate gradients yet" in p for p in TrainConfig(**accumulating).combination_problems())
    assert not TrainConfig(torch_compile=True, optimizer={"gradient_accumulation_steps": 2}).combination_problems()
