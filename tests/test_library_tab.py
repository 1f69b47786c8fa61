"""The Library tab's handlers on a real (short) demo run: details, export, inspect, resize, merge, delete."""

import json
import shutil

import pytest
import torch

from lora_studio import train
from lora_studio.config import load_preset
from lora_studio.errors import LoraStudioError
from lora_studio.lora_read import load_lora
from lora_studio.models import load_base
from lora_studio.paths import DEMO_DATASET_DIR, DEMO_MODEL_DIR, Roots
from lora_studio.runs import RunFolder
from lora_studio.ui import library_tab
from lora_studio.ui.state import AppState


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    runs = home / "runs"
    sets = [f"output_dir='{runs}'", "optimizer.max_train_steps=6",
            "sample.every_n_steps=3", "sample.num_inference_steps=2", "save.every_n_steps=3",
            "validation.fraction=0.125", "validation.path=''"]  # fmt: skip
    return AppState(Roots(runs, home / "datasets", home / "models")), train.run_training(load_preset("demo-cpu", sets))


@pytest.fixture
def library(demo_run):
    return demo_run


def test_runs_and_details(library):
    app, done = library
    loss = RunFolder(done.run_dir).last_metrics()["loss"]
    run = RunFolder(done.run_dir)
    best = run.best_lora()
    best_loss = run.validation_losses()[best]["validation_loss"]
    assert best_loss == min(row["validation_loss"] for row in run.validation_metrics())
    step = "final" if best.parent == run.path else f"step {int(best.stem[-6:])}"
    assert library_tab.runs_table(app) == [[done.run_dir.name, 6, loss, "yes", f"{step} (val {best_loss:.4f})"]]
    config, metrics, samples, files = library_tab.run_details(app, done.run_dir.name)
    assert 'base_model = "demo"' in config and json.loads(metrics)["step"] == 6
    assert len(samples) == 6 and all("step-000006" in p for p, _ in samples)
    labels = dict((value, label) for label, value in files)
    assert files[0][1] == str(done.lora_path) and any("checkpoints" in f for f in labels)
    assert labels[str(best)].endswith(f"val {best_loss:.4f} (best)")  # the picker marks the best file
    assert sum("(best)" in label for label in labels.values()) == 1
    assert all("val " in label for label in labels.values())  # every file of the run was validated


def test_export_inspect_resize_merge(library):
    app, done = library
    name, file = done.run_dir.name, str(done.lora_path)
    kohya = library_tab.export_file(app, name, file, "kohya", "bf16")
    assert load_lora(kohya).modules and next(iter(load_lora(kohya).modules.values())).down.dtype == torch.bfloat16
    native = library_tab.export_file(app, name, file, "diffusers", "fp32")
    imported = load_lora(native)
    assert imported.format == "diffusers" and set(imported.modules) == set(load_lora(file).modules)
    assert json.loads(library_tab.inspect_file(app, name, file))["family"] == "sd1"
    out, summary = library_tab.resize_file(app, name, file, 2)
    assert load_lora(out).summary()["rank"] == 2 and "Frobenius error" in summary
    merged = library_tab.merge_file(app, name, file, 0.5)
    assert load_base(merged, device="cpu", config=DEMO_MODEL_DIR).family == "sd1"


def test_paths_outside_the_runs_folder_and_deletion(library, tmp_path):
    app, done = library
    with pytest.raises(LoraStudioError, match="No run named"):
        library_tab.run_details(app, "../" + done.run_dir.name + "/..")
    with pytest.raises(LoraStudioError, match="No run is selected; select one in the table first"):
        library_tab.export_file(app, None, str(done.run_dir / "demo.safetensors"), "kohya", "fp16")
    outside = tmp_path / "x.safetensors"
    outside.write_bytes(b"x")
    with pytest.raises(LoraStudioError, match="Pick one of this run's LoRA files"):
        library_tab.inspect_file(app, done.run_dir.name, str(outside))
    with pytest.raises(LoraStudioError, match="Tick 'Yes, delete it' first"):
        library_tab.delete_run(app, done.run_dir.name, False)
    assert done.run_dir.is_dir()
    copy = done.run_dir.with_name("copy-20260101-000000")
    shutil.copytree(done.run_dir, copy)
    held = RunFolder(copy).lock()  # as a training of it would
    assert {row[0]: row[3] for row in library_tab.runs_table(app)}[copy.name] == "training"
    with pytest.raises(LoraStudioError, match="is being trained right now .* will not delete it"):
        library_tab.delete_run(app, copy.name, True)
    held.release()
    table, message, chosen = library_tab.delete_run(app, copy.name, True)
    assert message == f"Deleted {copy.name}." and not copy.exists() and [r[0] for r in table] == [done.run_dir.name]
    assert chosen is None


def test_a_run_queued_to_resume_cannot_be_deleted(app_state, monkeypatch):
    """While the worker is busy, a resume waits in the queue; its run is refused for deletion. (The trainer is
    held by a stand-in here: this is the queue's rule, and a real run would only make it slower.)"""
    import threading

    release = threading.Event()

    def held_training(config, on_event=None, commands=None, resume_from=None):
        release.wait(60)
        raise LoraStudioError("stopped by the test")

    monkeypatch.setattr(train, "run_training", held_training)
    run = RunFolder.create(app_state.roots.runs, "queued")
    run.config.write_text('name = "queued"\n')
    try:
        app_state.jobs.submit(load_preset("demo-cpu"))  # takes the worker
        app_state.jobs.submit(load_preset("demo-cpu"), resume_from=run.path)
        with pytest.raises(LoraStudioError, match="is queued to resume"):
            library_tab.delete_run(app_state, run.name, True)
        assert run.path.is_dir()
    finally:
        release.set()
    app_state.jobs.wait(2, timeout=60)
    library_tab.delete_run(app_state, run.name, True)
    assert not run.path.exists()


def test_the_dataset_tab_lists_a_runs_per_image_losses_highest_first(library):
    from lora_studio.ui import dataset_tab

    app, done = library
    rows = dataset_tab.image_losses(app, done.run_dir.name)
    kinds = [row[2] for row in rows]
    assert kinds == ["validation"] * 3 + ["training"] * 21  # 3 of the demo's 24 images held out (0.125)
    for kind in ("validation", "training"):
        losses = [row[3] for row in rows if row[2] == kind]
        assert losses == sorted(losses, reverse=True) and all(loss > 0 for loss in losses)
    assert {row[0] for row in rows} == {p.name for p in DEMO_DATASET_DIR.glob("*.png")}
    assert dataset_tab.run_names(app).choices[0][1] == done.run_dir.name
    with pytest.raises(LoraStudioError, match="No run named"):
        dataset_tab.image_losses(app, "../../etc")
