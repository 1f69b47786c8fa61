"""The Train tab's handlers: the form (one field per setting) becomes a config, the estimate, the base-model
picker, and a job that runs in the background while the page polls it."""

import re
import shutil
import time
from pathlib import Path

import gradio as gr
import pytest
import torch
from safetensors.torch import save_file

from lora_studio.config import TrainConfig, list_presets, load_preset
from lora_studio.errors import ConfigError, LoraStudioError
from lora_studio.jobs import JobStatus
from lora_studio.ui import train_tab
from lora_studio.ui.config_form import KEYS, config_from_form, form_values


def form(preset: str = "demo-cpu", **changes) -> list:
    """The form's values for a preset, with some fields changed (keys with __ for dots)."""
    values = dict(zip(KEYS, form_values(load_preset(preset)), strict=True))
    for key, value in changes.items():
        key = key.replace("__", ".")
        assert key in values, key
        values[key] = value
    return list(values.values())


def test_every_setting_is_a_form_field_and_every_preset_round_trips():
    expected = {n for n, f in TrainConfig.model_fields.items() if n != "version" and "." not in n}
    top_level = {k for k in KEYS if "." not in k}
    sections = {k.split(".")[0] for k in KEYS if "." in k}
    assert top_level | sections == expected
    assert len(KEYS) == sum(
        len(f.annotation.model_fields) if hasattr(f.annotation, "model_fields") else 1
        for n, f in TrainConfig.model_fields.items() if n != "version"
    )  # fmt: skip
    for preset in list_presets():
        assert config_from_form(form(preset)) == load_preset(preset), preset


def test_form_values_become_the_config_and_every_bad_field_is_reported():
    changes = {"optimizer__max_train_steps": 12.0, "optimizer__learning_rate": 2e-3, "lora__rank": 4,
               "sample__strengths": "[0, 0.25, 1]", "lora__text_encoder_targets": "q_proj\nv_proj\n"}  # fmt: skip
    config = config_from_form(form(**changes))
    assert (config.optimizer.max_train_steps, config.optimizer.learning_rate, config.lora.rank) == (12, 2e-3, 4)
    assert config.sample.strengths == [0, 0.25, 1] and config.lora.text_encoder_targets == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError) as caught:
        config_from_form(form(optimizer__max_train_steps=-1, lora__rank=0, sample__strengths="[0, oops"))
    problems = "\n".join(caught.value.problems)
    assert "max_train_steps" in problems and "lora.rank" in problems and "sample.strengths" in problems


def test_an_empty_number_box_drawn_as_0_is_read_as_empty():
    """Gradio draws an unset number box (unet_lr: "empty uses learning_rate") as 0 once its section is opened, and
    sends that 0 back: the form reads it as empty where the setting refuses 0, and keeps a 0 that means something
    (min_snr_gamma = 0 turns the weighting off; an unset one would come back from the TOML as 5)."""
    drawn = {"optimizer__unet_lr": 0, "optimizer__max_train_epochs": 0, "lora__conv_rank": 0, "sample__width": 0,
             "optimizer__min_snr_gamma": 0, "validation__seed": 0}  # fmt: skip
    config = config_from_form(form(**drawn))
    assert config.validation.seed is None  # the run's seed, not seed 0
    assert (config.optimizer.unet_lr, config.optimizer.max_train_epochs, config.lora.conv_rank) == (None, None, None)
    assert config.sample.width is None and config.optimizer.min_snr_gamma == 0
    assert config_from_form(form(optimizer__unet_lr=2e-4)).optimizer.unet_lr == 2e-4
    with pytest.raises(ConfigError, match="learning_rate"):
        config_from_form(form(optimizer__learning_rate=0))  # not optional: 0 is a value, and a wrong one


def test_estimate_shows_steps_and_memory_or_the_bad_fields(app_state):
    shown = train_tab.estimate(app_state, *form())
    steps = load_preset("demo-cpu").optimizer.max_train_steps
    assert f"**Steps:** {steps} in all (3 per epoch; 24 images per epoch, batch 8)" in shown and "demo model" in shown
    base = str(app_state.roots.models / "x.safetensors")
    sdxl = form("sdxl-character", dataset__path="demo", family="sdxl", base_model=base)
    shown = train_tab.estimate(app_state, *sdxl)
    config = config_from_form(sdxl)
    assert re.search(r"about \d+\.\d GiB of GPU memory", shown), shown
    per_epoch = 24 * config.dataset.repeats // config.dataset.batch_size
    assert f"{config.optimizer.max_train_epochs * per_epoch:,} in all ({per_epoch} per epoch" in shown
    bad = train_tab.estimate(app_state, *form(lora__rank=0, dataset__batch_size=0))
    assert bad.startswith("**Fix these settings first:**") and "lora.rank" in bad and "batch_size" in bad
    # What Start would refuse, Check settings says: combinations, and paths outside the app's folders.
    assert "random_crop" in train_tab.estimate(app_state, *form(dataset__random_crop=True))
    assert "`fp8_base` needs gradient_checkpointing" in train_tab.estimate(app_state, *form(fp8_base=True))
    narrow = train_tab.estimate(app_state, *form("sdxl-low-vram", dataset__path="demo", base_model=base,
                                                 fp8_base=True))  # fmt: skip
    wide = train_tab.estimate(app_state, *form("sdxl-low-vram", dataset__path="demo", base_model=base))
    gib = lambda text: float(re.search(r"about (\d+\.\d) GiB", text).group(1))  # noqa: E731
    assert gib(wide) - gib(narrow) > 2  # the UNet in 8 bits: SDXL's 4.8 GiB become 2.4 (and 0.2 of wide copies)
    refused = train_tab.estimate(app_state, *form(output_dir="/tmp", base_model=""))
    assert "`output_dir` '/tmp' lies outside" in refused and "`base_model` is empty" in refused
    assert refused.count("empty") == 1  # said once, in the config's words (not again as a path outside the folders)
    # Start says the same before it queues anything (a preset ships without a base model).
    with pytest.raises(ConfigError, match="`base_model` is empty: choose a checkpoint"):
        train_tab.start(app_state, *form("sd15-character", dataset__path="demo"))
    assert app_state.jobs.current() is None and not app_state.jobs.queued()


def test_check_settings_reads_the_vae_from_its_header(app_state, tiny_folders):
    models = app_state.roots.models
    models.mkdir()
    weights = {f"first_stage_model.encoder.conv_in.{kind}": torch.zeros(4) for kind in ("weight", "bias")}
    save_file(weights, str(models / "my-vae.safetensors"))
    shown = train_tab.estimate(app_state, *form(vae=str(models / "my-vae.safetensors")))
    assert "**VAE:** `my-vae.safetensors`, a VAE file of 2 tensors" in shown
    shown = train_tab.estimate(app_state, *form(vae=str(tiny_folders["sd1"] / "vae")))
    assert "lies outside" in shown and "`vae`" in shown  # read only inside the app's folders
    shutil.copytree(tiny_folders["sd1"], models / "whole")
    assert "**VAE:** `vae`, a diffusers VAE folder" in train_tab.estimate(app_state, *form(vae=str(models / "whole")))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(models / "a-lora.safetensors"))
    shown = train_tab.estimate(app_state, *form(vae=str(models / "a-lora.safetensors")))
    assert "**VAE:** cannot use:" in shown and "holds no VAE weights" in shown
    assert "**VAE:**" not in train_tab.estimate(app_state, *form())


def test_base_picker_lists_the_models_folder_with_family_and_prediction(app_state, tiny_folders):
    models = app_state.roots.models
    models.mkdir()
    shutil.copytree(tiny_folders["sdxl"], models / "my-sdxl")
    save_file({"x": torch.zeros(1)}, str(models / "not-a-model.safetensors"))
    (models / "old.ckpt").write_bytes(b"pickle")
    (models / "notes.txt").write_text("ignored")
    choices = dict((value.split("/")[-1], label) for label, value in train_tab.base_choices())
    assert list(choices) == ["demo", "my-sdxl", "not-a-model.safetensors", "old.ckpt"]
    assert choices["my-sdxl"] == "my-sdxl · SDXL, epsilon"
    assert choices["demo"].startswith("demo · SD 1.x")
    assert "cannot use" in choices["old.ckpt"] and "pickle" in choices["old.ckpt"]
    assert "cannot use" in choices["not-a-model.safetensors"]
    rows = {row[0]: row for row in train_tab.models_folder_table()}
    assert rows["my-sdxl"][1:4] == ["diffusers folder", "SDXL", "epsilon"]
    assert train_tab.base_info(app_state, str(models / "my-sdxl")) == "**my-sdxl**: SDXL, epsilon"
    assert train_tab.base_info(app_state, "/etc").startswith("cannot use: The base model '/etc' lies outside")


def test_progress_bar_carries_its_figures():
    bar = train_tab.progress_html(30, 120, 4.5, 75, "running")
    assert 'aria-valuenow="30"' in bar and 'aria-valuemax="120"' in bar and "width:25.0%" in bar
    assert "4.50 it/s" in bar and "ETA 1 min 15 s" in bar


def test_while_regularization_images_render_the_bar_counts_them_and_then_the_steps(app_state, monkeypatch):
    status = JobStatus(id=4, name="demo", state="running", total_steps=0,
                       preparing=("rendering regularization images", 6, 24))  # fmt: skip
    monkeypatch.setattr(app_state.jobs, "current", lambda: status)
    monkeypatch.setattr(app_state.jobs, "queued", lambda: [])
    bar = train_tab.poll(app_state, None, now=1.0)[0]
    assert 'id="train-preparingbar"' in bar and 'aria-valuenow="6"' in bar and 'aria-valuemax="24"' in bar
    assert "rendering regularization images 6/24 (25%)" in bar and "train-progressbar" not in bar
    status.preparing, status.step, status.total_steps = None, 1, 350  # the first step clears it
    assert 'id="train-progressbar"' in train_tab.poll(app_state, None, now=2.0)[0]


def test_regularization_images_render_in_the_queue_to_be_looked_at_and_stop_between_images(app_state):
    tab, manager = train_tab, app_state.jobs
    settings = {"regularization__class_word": "drawing", "regularization__steps": 2, "dataset__resolution": 64}
    message = tab.render_regularization(app_state, *form(regularization__images=2, **settings))
    assert message.startswith("Job 1 renders the regularization images")
    done = manager.wait(1)
    folder = app_state.roots.runs / ".cache" / "regularization"
    assert done.state == "done" and f"2 regularization images in `{folder}`" in done.message
    assert done.preparing == ("rendering regularization images", 2, 2) and len(list(folder.glob("*.png"))) == 2
    from lora_studio.ui import dataset_tab  # the folder the message names opens in the Dataset tab, to look at them

    _state, _shown, gallery, *_rest = dataset_tab.open_dataset(app_state, str(folder))
    assert sorted(label for _path, label in gallery) == sorted(p.read_text().strip() for p in folder.glob("*.txt"))
    tab.render_regularization(app_state, *form(regularization__images=400, **settings))
    while (status := manager.current()) is None or status.id != 2 or status.preparing is None:
        time.sleep(0.05)
    assert tab.stop(app_state).startswith("Stopping")
    stopped = manager.wait(2)
    assert stopped.state == "stopped" and stopped.message.startswith("Stopped while rendering regularization images")
    assert stopped.preparing[1] < 400  # stopped between images, the rendered ones kept for the next start
    with pytest.raises(LoraStudioError, match="`regularization.path` is set"):
        tab.render_regularization(app_state, *form(regularization__path="datasets", **settings))


def test_start_poll_stop_resume(app_state):
    tab, app = train_tab, app_state
    assert tab.stop(app) == "Nothing is running."
    assert tab.poll(app)[1].startswith("No training yet")
    values = form(sample__every_n_steps=5, sample__num_inference_steps=2, save__every_n_steps=0,
                  optimizer__max_train_steps=400)  # fmt: skip
    assert tab.start(app, *values).startswith("Job 1 (demo) started")
    manager = app.jobs
    while (status := manager.current()) is None or status.step < 6:
        time.sleep(0.05)  # a busy loop would hold the GIL and starve the training thread
    assert tab.stop(app).startswith("Stopping")
    stopped = manager.wait(1)
    assert stopped.state == "stopped"
    bar, line, losses, samples, log, _timer, shown_now = tab.poll(app)
    assert f'aria-valuenow="{stopped.step}"' in bar and 'aria-valuemax="400"' in bar
    training = losses[losses["series"] == tab.TRAINING_SERIES]
    assert "**stopped**" in line and len(training) == stopped.step and samples and "prepared" in log
    # The same page polling again is sent nothing: its browser has nothing to redraw.
    assert tab.poll(app, shown_now)[:6] == (gr.skip(),) * 6
    assert stopped.run_dir.parent == app.roots.runs  # the runs root, whatever the working directory
    assert tab.resume(app, *values).startswith(f"Job 2 resumes {stopped.run_dir.name} from step {stopped.step}")
    while (status := manager.current()) is None or status.id != 2 or status.step < stopped.step + 2:
        time.sleep(0.05)
    tab.stop(app)
    assert manager.wait(2).state == "stopped"


def test_a_poll_sends_only_what_changed_and_the_loss_curve_at_most_every_few_seconds(app_state, monkeypatch):
    manager = app_state.jobs
    status = JobStatus(id=7, name="demo", state="running", step=3, total_steps=100, losses=[(1, 0.5), (2, 0.4)],
                       samples=[Path("/x/s1.png")])  # fmt: skip
    monkeypatch.setattr(manager, "current", lambda: status)  # the page's view of a job, without running one
    monkeypatch.setattr(manager, "queued", lambda: [])
    first = train_tab.poll(app_state, None, now=100.0)
    assert len(first[2]) == 2 and first[3] == [("/x/s1.png", "s1")]
    status.step, status.losses = 4, [*status.losses, (3, 0.3)]
    soon = train_tab.poll(app_state, first[-1], now=101.0)
    assert soon[0] != gr.skip() and soon[1] == gr.skip()  # the bar moved, the status line did not
    assert soon[2] == gr.skip() and soon[3] == gr.skip()  # the curve waits; the samples are the same
    later = train_tab.poll(app_state, soon[-1], now=100.0 + train_tab.LOSS_PLOT_SECONDS)
    assert len(later[2]) == 3
    status.state, status.losses = "done", [*status.losses, (4, 0.2)]
    assert len(train_tab.poll(app_state, later[-1], now=later[-1].loss_sent_at + 0.1)[2]) == 4  # the end, at once
    status2 = JobStatus(id=8, name="next", state="running", step=0, total_steps=10)
    monkeypatch.setattr(manager, "current", lambda: status2)
    fresh = train_tab.poll(app_state, later[-1], now=200.0)
    assert fresh[3] == [] and len(fresh[2]) == 0  # another job: the old samples and curve are cleared


def test_a_cpu_training_is_polled_every_few_seconds_a_gpu_one_every_second_and_an_idle_page_seldom(
    app_state, monkeypatch
):
    """Each poll costs the browser CPU that a CPU training on the same machine loses (bench/app_training.py), and a
    page at rest on a laptop its battery."""
    manager = app_state.jobs
    monkeypatch.setattr(manager, "queued", lambda: [])
    nothing = train_tab.poll(app_state, None, now=0.5)
    assert nothing[5] == gr.skip() and nothing[-1].every == train_tab.IDLE_POLL_SECONDS  # the page's first interval
    status = JobStatus(id=9, name="demo", state="running", step=3, total_steps=100)
    monkeypatch.setattr(manager, "current", lambda: status)
    assert train_tab.training_on_cpu()  # no GPU here
    running = train_tab.poll(app_state, nothing[-1], now=1.0)
    assert isinstance(running[5], gr.Timer) and running[5].value == train_tab.CPU_TRAINING_POLL_SECONDS
    status.step = 4
    again = train_tab.poll(app_state, running[-1], now=5.0)
    assert again[5] == gr.skip() and again[-1].every == train_tab.CPU_TRAINING_POLL_SECONDS  # told once
    status.state = "done"
    done = train_tab.poll(app_state, again[-1], now=9.0)
    assert done[5].value == train_tab.IDLE_POLL_SECONDS > train_tab.CPU_TRAINING_POLL_SECONDS
    # a job just queued behind nothing (the worker has not taken it yet) already counts as busy
    monkeypatch.setattr(manager, "queued", lambda: [JobStatus(id=10, name="next", state="queued")])
    assert train_tab.poll(app_state, done[-1], now=9.5)[5].value == train_tab.CPU_TRAINING_POLL_SECONDS
    monkeypatch.setattr(manager, "queued", lambda: [])
    monkeypatch.setattr(train_tab, "training_on_cpu", lambda: False)  # a GPU does the work: every second
    status.state = "stopping"
    assert train_tab.poll(app_state, done[-1], now=10.0)[5].value == train_tab.RUNNING_POLL_SECONDS


def test_the_curve_draws_validation_passes_beside_the_training_loss(app_state, monkeypatch):
    status = JobStatus(id=3, name="demo", state="running", step=4, total_steps=10,
                       losses=[(1, 0.5), (2, 0.4), (3, 0.3), (4, 0.2)], validation=[(2, 0.45), (4, 0.35)])  # fmt: skip
    monkeypatch.setattr(app_state.jobs, "current", lambda: status)
    monkeypatch.setattr(app_state.jobs, "queued", lambda: [])
    frame = train_tab.poll(app_state, None, now=10.0)[2]
    validation = frame[frame["series"] == train_tab.VALIDATION_SERIES]
    assert list(zip(validation["step"], validation["loss"], strict=True)) == [(2, 0.45), (4, 0.35)]
    assert (frame["series"] == train_tab.TRAINING_SERIES).sum() == 4
    status.validation = [*status.validation, (6, 0.3)]  # a new pass alone is a change to draw
    assert len(train_tab.poll(app_state, None, now=10.0)[2]) == 7


def test_a_long_loss_curve_is_thinned_to_its_shape():
    points = [(i, 1.0 / i) for i in range(1, 2001)]
    kept = train_tab.thinned(points)
    assert len(kept) <= train_tab.LOSS_PLOT_POINTS + 1 and kept[0] == points[0] and kept[-1] == points[-1]
    assert train_tab.thinned(points[:10]) == points[:10]


def test_resume_without_a_stopped_run_is_a_sentence(app_state):
    with pytest.raises(LoraStudioError, match="no stopped run to resume"):
        train_tab.resume(app_state, *form())


def test_model_descriptions_are_read_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    reads = []
    real = train_tab.describe_source
    monkeypatch.setattr(train_tab, "describe_source", lambda source: reads.append(source) or real(source))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a checkpoint at all")
    assert "is not a safetensors file" in train_tab.describe_base(str(path))
    assert "is not a safetensors file" in train_tab.describe_base(str(path))
    assert len(reads) == 1  # the second look used the kept description
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    assert "LoRA adapter" in train_tab.describe_base(str(path))  # another size and time: read again
    assert len(reads) == 2
