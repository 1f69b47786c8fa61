"""Validation loss and the best checkpoint on a tiny seeded model: a held-out split, fixed noise and timesteps, a
loss that changes with the weights alone, training untouched by it, exact resume, the best file kept and marked."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import stopper, tiny_config

from lora_studio import validation as validation_module
from lora_studio.config import SaveConfig, validate_config
from lora_studio.data import Item, split_validation, validation_caption
from lora_studio.errors import ConfigError
from lora_studio.events import ValidationEvent
from lora_studio.outputs import prune_checkpoints
from lora_studio.resume import lora_state_dicts
from lora_studio.runs import RunFolder
from lora_studio.session import trained_models
from lora_studio.train import TrainingError, prepare, run_training
from lora_studio.validation import fixed_timesteps, validation_pass


def make_images(folder: Path, count: int, shade: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (48, 32) if i % 2 else (32, 48), (40 * i % 256, 100 + shade, 200))
        image.paste((250, 250, 250), (0, 0, 8 + i, 10))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a thing number {i}")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("train"), 6)


@pytest.fixture(scope="module")
def held_images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("held"), 2, shade=50)


def fake_items(counts: dict[str, int]) -> list[Item]:
    return [Item(Path(f"/d/{c}/{i}.png"), "", c, 1, 8, 8, f"{c}{i}") for c, n in counts.items() for i in range(n)]


def test_the_split_is_stratified_seeded_and_keeps_every_folder_trained():
    items = fake_items({"10_a": 10, "5_b": 4, "1_c": 1})
    training, held = split_validation(items, 0.2, seed=3)
    concepts = [i.concept for i in held]
    assert concepts.count("10_a") == 2 and concepts.count("5_b") == 1 and "1_c" not in concepts
    assert {i.concept for i in training} == {"10_a", "5_b", "1_c"}  # no folder is held out whole
    assert set(training).isdisjoint(held) and len(training) + len(held) == len(items)
    assert split_validation(items, 0.2, seed=3) == (training, held)  # the same seed holds out the same images
    assert split_validation(list(reversed(items)), 0.2, seed=3)[1] == list(reversed(held))  # not by list order
    others = [split_validation(items, 0.2, seed=s)[1] for s in range(4, 12)]
    assert any(o != held for o in others)
    assert split_validation(items, 0.0, seed=3) == (items, [])


def test_fixed_timesteps_spread_over_the_schedule():
    assert fixed_timesteps(4, 1000).tolist() == [125, 375, 625, 875]
    assert fixed_timesteps(1, 1000).tolist() == [500]


def test_bad_validation_settings_are_refused_before_anything_loads(tmp_path, tiny_folders, images):
    with pytest.raises(ConfigError, match="`validation`: both fraction .0.1. and path .'x'. are set"):
        validate_config({"version": 1, "validation": {"fraction": 0.1, "path": "x"}})
    with pytest.raises(ConfigError, match="`validation.fraction` = 0.9: input should be less than or equal to 0.5"):
        validate_config({"version": 1, "validation": {"fraction": 0.9}})
    lonely = make_images(tmp_path / "one", 1)
    config = tiny_config(tmp_path, tiny_folders, lonely, validation={"fraction": 0.2})
    with pytest.raises(TrainingError, match="holds out no image"):
        prepare(config)
    config = tiny_config(tmp_path, tiny_folders, images, validation={"path": str(tmp_path / "missing")})
    missing = re.escape(str(tmp_path / "missing"))
    with pytest.raises(TrainingError, match=f"validation image: the folder {missing} does not exist; set "
                                            "validation.path to your images' folder"):  # fmt: skip
        prepare(config)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_validation_loss_changes_with_the_weights_alone(tmp_path, tiny_folders, images):
    config = tiny_config(tmp_path, tiny_folders, images, validation={"fraction": 0.34, "timesteps": 3},
                         optimizer={"learning_rate": 3e-3})  # fmt: skip
    session = prepare(config)
    held = [i.item.path for i in session.validation.images]
    assert len(held) == 2 and not set(held) & {i.path for i in session.items}
    assert session.validation.images[0].caption == validation_caption(session.validation.images[0].item,
                                                                        config.dataset)  # fmt: skip
    saved = {name: {k: v.clone() for k, v in sd.items()} for name, sd in lora_state_dicts(session).items()}

    rng = torch.get_rng_state()
    first = validation_pass(session)
    assert torch.equal(torch.get_rng_state(), rng), "a validation pass draws nothing from the training RNG"
    assert validation_pass(session) == first  # same weights, same loss, to the bit
    assert all(model.training for model in session.models.values())  # back in training mode

    from lora_studio.step import training_step

    for _ in range(3):
        training_step(session, [0, 1])
        session.step += 1
    trained = validation_pass(session)
    assert trained != first and all(trained[k] != first[k] for k in first)

    from peft.utils import set_peft_model_state_dict

    for name, model in trained_models(session).items():
        set_peft_model_state_dict(model, saved[name])
    assert validation_pass(session) == first  # the weights back, the loss back


def test_validation_leaves_training_unchanged_and_resume_exact(tmp_path, tiny_folders, images, held_images):
    plain = run_training(tiny_config(tmp_path / "plain", tiny_folders, images))
    watched = {"path": str(held_images), "every_n_steps": 3}
    events = []
    config = tiny_config(tmp_path / "b", tiny_folders, images, validation=watched)
    straight = run_training(config, on_event=events.append)
    a, b = load_file(str(plain.lora_path)), load_file(str(straight.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a), "validation changed the trained weights"

    passes = [e for e in events if isinstance(e, ValidationEvent)]
    assert [e.step for e in passes] == [3, 4, 6, 8]  # every 3 steps, at the checkpoints (4, 8) and at the end
    assert all(set(e.per_image) == {str(held_images / "0.png"), str(held_images / "1.png")} for e in passes)
    run = RunFolder(straight.run_dir)
    rows = run.validation_metrics()
    assert [(r["step"], r["validation_loss"]) for r in rows] == [(e.step, e.loss) for e in passes]
    assert run.last_metrics()["step"] == 8 and "loss" in run.last_metrics()
    losses = run.validation_losses()
    assert {p.name: e["step"] for p, e in losses.items()} == {
        "tiny-step000004.safetensors": 4, "tiny-step000008.safetensors": 8, "tiny.safetensors": 8}  # fmt: skip
    by_step = {e.step: e.loss for e in passes}
    assert all(e["validation_loss"] == by_step[e["step"]] for e in losses.values())
    best = run.best_lora()
    assert losses[best]["validation_loss"] == min(by_step[4], by_step[8])
    assert json.loads(run.validation_record.read_text())["best"] == best.relative_to(run.path).as_posix()
    image_losses = run.read_image_losses()
    assert image_losses["validation"]["step"] == 8 and set(image_losses["validation"]["images"]) == set(
        passes[-1].per_image)  # fmt: skip
    training = image_losses["training"]["images"]
    assert set(training) == {str(images / f"{i}.png") for i in range(6)}
    assert list(training.values()) == sorted(training.values(), reverse=True)  # highest first

    commands, stop_at_5 = stopper(5)
    config = tiny_config(tmp_path / "c", tiny_folders, images, validation=watched)
    stopped = run_training(config, on_event=stop_at_5, commands=commands)
    resumed_events = []
    resumed = run_training(config, on_event=resumed_events.append, resume_from=stopped.run_dir)
    c = load_file(str(resumed.lora_path))
    assert all(torch.equal(b[k], c[k]) for k in b), "resume with validation on is not bit-exact"
    after = [e for e in resumed_events if isinstance(e, ValidationEvent)]
    assert [(e.step, e.loss) for e in after] == [(e.step, e.loss) for e in passes if e.step > 5]


def test_validation_as_every_nth_epoch_ends(tmp_path, tiny_folders, images, held_images):
    """kohya's validate_every_n_epochs: 6 images at batch 2 make 3 steps an epoch; with no checkpoint before the
    end, epochs bring the passes at steps 3 and 6 (and the end's, 8), and without them only the end's comes."""
    quiet = {"every_n_steps": 0, "every_n_epochs": 0}
    for every, steps in ((1, [3, 6, 8]), (0, [8])):
        events = []
        run_training(tiny_config(tmp_path / str(every), tiny_folders, images, save=quiet, validation={
            "path": str(held_images), "every_n_epochs": every}), on_event=events.append)  # fmt: skip
        assert [e.step for e in events if isinstance(e, ValidationEvent)] == steps
    kohya = validate_config({"train_data_dir": "x", "validation_split": 0.1, "validate_every_n_epochs": 2})
    assert kohya.validation.every_n_epochs == 2


def test_validation_seed_and_max_images(tmp_path, tiny_folders, images, held_images):
    """kohya's validation_seed: the held-out draw and the fixed noise follow it, not the run's seed, so runs of other
    seeds are scored alike; validation.max_images (kohya's max_validation_steps x batch) scores the first N."""
    def held_out(run_seed: int, **validation) -> tuple[list, list]:
        session = prepare(tiny_config(tmp_path / f"{run_seed}-{len(validation)}", tiny_folders, images, seed=run_seed,
                                      validation={"fraction": 0.34, **validation}))  # fmt: skip
        return [i.item.path for i in session.validation.images], [i.noise for i in session.validation.images]

    draws = {seed: held_out(seed)[0] for seed in (1, 2, 3, 4)}
    assert len({tuple(d) for d in draws.values()}) > 1, "without it, the run's seed draws the held-out images"
    (one, noise_one), (two, noise_two) = held_out(1, seed=9), held_out(2, seed=9)
    assert one == two and all(torch.equal(a, b) for a, b in zip(noise_one, noise_two, strict=True))
    session = prepare(tiny_config(tmp_path / "capped", tiny_folders, images,
                                  validation={"path": str(held_images), "max_images": 1}))  # fmt: skip
    assert [i.item.path.name for i in session.validation.images] == ["0.png"]
    kohya = validate_config({"train_data_dir": "x", "validation_split": 0.1, "validation_seed": 5,
                             "max_validation_steps": 3, "train_batch_size": 2})  # fmt: skip
    assert (kohya.validation.seed, kohya.validation.max_images) == (5, 6)
    assert validate_config({"validation_split": 0.1, "max_validation_steps": 0}).validation.max_images == 0
    assert validate_config({"validation_split": 0.1, "validation_seed": 0}).validation.seed is None  # kohya_ss unset
    with pytest.raises(ConfigError, match="`max_validation_steps` = 'many' is not a whole number"):
        validate_config({"validation_split": 0.1, "max_validation_steps": "many"})


def test_pruning_keeps_the_best_checkpoint(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    files = [run.checkpoint("x", step) for step in (10, 20, 30, 40)]
    for path, loss in zip(files, (0.5, 0.2, 0.4, 0.3), strict=True):
        path.write_bytes(b"lora")
        run.record_validation(path, int(path.stem[-3:]), loss)
    assert run.best_lora() == files[1]
    session = SimpleNamespace(run=run, step=40, config=SimpleNamespace(save=SaveConfig(keep_last=1)))
    prune_checkpoints(session)
    assert run.checkpoint_files() == [files[1], files[3]]  # the newest and the best
    files[1].unlink()  # a best file deleted by hand: the next best that exists
    assert run.best_lora() == files[3]


def test_pruning_by_steps_keeps_kohyas_last_n_steps_and_the_best(tmp_path):
    """kohya's save_last_n_steps = 20 at step 50 keeps the checkpoints of steps 30-50; with keep_last too, a
    checkpoint stays only if both keep it; the best by validation loss stays whatever its age."""
    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    files = {step: run.checkpoint("x", step) for step in (10, 20, 30, 40, 50)}
    for path in files.values():
        path.write_bytes(b"lora")
    foreign = run.checkpoints / "x-step-by-step.safetensors"  # a file of someone's own, no step in its name
    foreign.write_bytes(b"lora")
    run.record_validation(files[10], 10, 0.1)

    def pruned(**save) -> list[int]:
        prune_checkpoints(SimpleNamespace(run=run, step=50, config=SimpleNamespace(save=SaveConfig(**save))))
        return [run.checkpoint_step(f) for f in run.checkpoint_files() if f != foreign]

    assert pruned() == [10, 20, 30, 40, 50]  # neither set: all stay
    assert pruned(keep_last_steps=20) == [10, 30, 40, 50] and foreign.exists()
    assert pruned(keep_last_steps=20, keep_last=2) == [10, 40, 50]
    assert validate_config({"train_data_dir": "x", "save_last_n_steps": 300}).save.keep_last_steps == 300
    assert RunFolder.checkpoint_step(run.final_lora("x")) is None


def test_a_damaged_record_never_stops_anything(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.validation_record.write_text("{not json")
    run.image_losses.write_text('["a list"]')
    assert run.best_lora() is None and run.validation_losses() == {} and run.read_image_losses() == {}
    (run.path / "x.safetensors").write_bytes(b"lora")
    run.validation_record.write_text(json.dumps({"files": {"../../etc/passwd": {"step": 1, "validation_loss": 0.0},
                                                           "x.safetensors": {"step": 2, "validation_loss": 0.3}}}))
    assert run.best_lora() == run.path / "x.safetensors"  # a name leading out of the run is not a file of it
    (run.path / "y.safetensors").write_bytes(b"lora")
    for foreign in (float("nan"), "0.1", True, None):  # never picked over a real loss, whatever its step says
        entries = {"x.safetensors": {"step": 2, "validation_loss": 0.3},
                   "y.safetensors": {"step": "3", "validation_loss": foreign}}
        run.validation_record.write_text(json.dumps({"files": entries}))
        assert run.best_lora() == run.path / "x.safetensors", foreign
        assert list(run.validation_losses()) == [run.path / "x.safetensors"]  # what lists and labels read
    run.validation_record.write_text(json.dumps({"files": {"x.safetensors": {"step": "a", "validation_loss": 0.3},
                                                           "y.safetensors": {"step": 1, "validation_loss": 0.3}}}))
    assert run.best_lora() == run.path / "x.safetensors"  # a tie with a foreign step: no TypeError, step 0 first
    run.image_losses.write_text(json.dumps({"training": {"step": 4, "images": {"a.png": 0.2, "b.png": "high",
                                                                               "c.png": float("nan")}}}))  # fmt: skip
    assert run.read_image_losses()["training"]["images"] == {"a.png": 0.2}


def test_validation_runs_with_a_trained_text_encoder_and_sdxl(tmp_path, tiny_folders, images, monkeypatch):
    calls = []
    real = validation_module.conditioning
    monkeypatch.setattr(validation_module, "conditioning", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = tiny_config(tmp_path, tiny_folders, images, validation={"fraction": 0.2},
                         base_model=str(tiny_folders["sdxl"]))  # fmt: skip
    session = prepare(config)
    before = len(calls)
    first = validation_pass(session)
    assert len(calls) - before == len(first) == 1  # the trained encoders are run at every pass
    assert all(torch.isfinite(torch.tensor(v)) for v in first.values())


def test_the_checkpoints_command_lists_validation_losses_and_the_best(tmp_path, capsys):
    from lora_studio.cli import main

    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    run.config.write_text('name = "x"\n')
    files = [run.checkpoint("x", 10), run.checkpoint("x", 20), run.final_lora("x")]
    for path, loss in zip(files, (0.3, 0.1, 0.2), strict=True):
        path.write_bytes(b"lora")
        run.record_validation(path, 10 if "10" in path.name else 20, loss)
    assert main(["checkpoints", str(run.path), "--best"]) == 0
    assert capsys.readouterr().out.strip() == str(files[1])
    assert main(["checkpoints", str(run.path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["best"] == str(files[1]) and [f["best"] for f in listed["files"]] == [False, False, True]
    assert main(["checkpoints", str(run.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("*   0.100000") and "x-step000020" in lines[2]  # the final file first, as lora_files
    run.validation_record.unlink()
    assert main(["checkpoints", str(run.path), "--best"]) == 1
    assert "has no validated LoRA file" in capsys.readouterr().err
