"""Regularization (prior preservation) on a tiny seeded model: kohya's balance and folder layout, no trigger word on
class images, the prior loss weight, interleaved batches, and generated images that are cached and reused."""

import random
from pathlib import Path

import pytest
import torch
from test_train import tiny_config
from test_validation import make_images

from lora_studio import reg_images
from lora_studio.buckets import epoch_batches
from lora_studio.config import validate_config
from lora_studio.data import Item, balance_regularization, build_caption, dataset_report
from lora_studio.errors import ConfigError
from lora_studio.events import PreparingEvent
from lora_studio.outputs import training_facts
from lora_studio.step import batch_losses, sample_draws
from lora_studio.train import prepare


def items(count: int, repeats: int = 1, reg: bool = False) -> list[Item]:
    return [Item(Path(f"/r/{reg}{i}.png"), "", "c", repeats, 8, 8, f"{reg}{i}", "", reg) for i in range(count)]


def test_kohyas_balance_gives_an_epoch_as_many_class_images_as_training_images():
    balanced = balance_regularization(items(10, repeats=2), items(3, reg=True))
    assert [i.repeats for i in balanced] == [7, 7, 6]  # 20 training images an epoch, 20 class images
    fewer = balance_regularization(items(5), items(30, reg=True))
    assert sum(i.repeats for i in fewer) == 5 and len(fewer) == 5  # the later class images sit out
    assert balance_regularization(items(4), []) == []


def test_class_images_get_no_trigger_word_and_generated_prompts_lose_it():
    from lora_studio.config import DatasetConfig

    dataset = DatasetConfig(trigger_word="zkz")
    reg = Item(Path("/r/a.png"), "a dog, grass", "dog", 1, 8, 8, "h", "", True)
    assert build_caption(reg, dataset, random.Random(0)) == "a dog, grass"
    train = Item(Path("/t/a.png"), "a dog, grass", "dog", 1, 8, 8, "h")
    assert build_caption(train, dataset, random.Random(0)) == "zkz, a dog, grass"
    assert reg_images.class_prompt("zkz, a red circle, zkz style", "zkz", "") == "a red circle, style"
    assert reg_images.class_prompt("zkz, a red circle", "zkz", "shape") == "shape, a red circle"


def test_a_class_folder_interleaves_with_training_and_is_weighted(tmp_path, tiny_folders):
    train = make_images(tmp_path / "train", 4)
    reg_root = tmp_path / "reg"
    make_images(reg_root / "2_thing", 2, shade=80)  # kohya's N_class layout
    config = tiny_config(tmp_path, tiny_folders, train, regularization={"path": str(reg_root)})
    report = dataset_report(config, 32)
    assert report["regularization_images_per_epoch"] == 4 and report["images_per_epoch"] == 4
    session = prepare(config)
    flags = [i.regularization for i in session.items]
    assert flags == [False] * 4 + [True] * 2 and [i.repeats for i in session.items[4:]] == [2, 2]
    epoch = [index for batch in epoch_batches(session.buckets, [i.repeats for i in session.items], 2, 7, 0)
             for index in batch]  # fmt: skip
    assert sum(flags[i] for i in epoch) == sum(not flags[i] for i in epoch) == 4  # one class image per training one
    facts = training_facts(session)  # the LoRA file's metadata counts them apart, as kohya's does
    assert (facts.num_images, facts.num_reg_images) == (4, 4)
    assert facts.reg_dataset_dirs == {"2_thing": {"n_repeats": 2, "img_count": 2}}
    assert "2_thing" not in facts.dataset_dirs
    reg_batch = [4, 5]
    with torch.no_grad():  # fresh draws each call: the same noise and timesteps
        full = batch_losses(session, reg_batch, sample_draws(1, 0, 0, reg_batch))
        session.config.regularization.prior_loss_weight = 0.25
        weighted = batch_losses(session, reg_batch, sample_draws(1, 0, 0, reg_batch))
        mixed = batch_losses(session, [0, 4], sample_draws(1, 0, 0, [0, 4]))
        session.config.regularization.prior_loss_weight = 1.0
        plain_mixed = batch_losses(session, [0, 4], sample_draws(1, 0, 0, [0, 4]))
    assert torch.allclose(weighted, 0.25 * full) and mixed[0] == plain_mixed[0]
    assert torch.allclose(mixed[1], 0.25 * plain_mixed[1])


def test_generated_class_images_are_cached_and_reused(tmp_path, tiny_folders, monkeypatch):
    train = make_images(tmp_path / "train", 4)
    rendered = []
    real = reg_images.render_one
    monkeypatch.setattr(reg_images, "render_one", lambda *a: rendered.append(a[1]) or real(*a))
    settings = {"generate": True, "class_word": "shape", "steps": 2, "images": 4}
    config = tiny_config(tmp_path, tiny_folders, train, regularization=settings)
    events = []
    session = prepare(config, on_event=events.append)
    rendering = [e for e in events if isinstance(e, PreparingEvent)]  # what the app's and the CLI's bar show
    assert [(e.stage, e.done, e.total) for e in rendering] == [("rendering regularization images", n, 4)
                                                               for n in (1, 2, 3, 4)]  # fmt: skip
    generated = [i for i in session.items if i.regularization]
    assert len(rendered) == 4 and len(generated) == 4 and all(i.path.is_file() for i in generated)
    assert all(p.startswith("shape, a thing number") and "zkz" not in p for p in rendered)
    assert all(i.path.with_suffix(".txt").read_text().strip() == i.caption for i in generated)
    session.lock.release()
    again = prepare(tiny_config(tmp_path, tiny_folders, train, regularization=settings))
    assert len(rendered) == 4  # the second run renders nothing
    assert [i.path for i in again.items if i.regularization] == [i.path for i in generated]
    again.lock.release()
    prepare(tiny_config(tmp_path, tiny_folders, train, seed=8, regularization=settings)).lock.release()
    assert len(rendered) == 8  # another seed: other images


def test_both_sources_at_once_are_refused():
    with pytest.raises(ConfigError, match="both path .* and generate are set"):
        validate_config({"version": 1, "regularization": {"path": "x", "generate": True}})
    kohya = validate_config({"reg_data_dir": "reg", "prior_loss_weight": 0.5, "train_data_dir": "x"})
    assert kohya.regularization.path == "reg" and kohya.regularization.prior_loss_weight == 0.5


def test_the_reg_images_command_renders_them_before_training(tmp_path, tiny_folders, capsys):
    from lora_studio.cli import main

    train = make_images(tmp_path / "train", 2)
    config = tiny_config(tmp_path, tiny_folders, train)
    from lora_studio.config import save_config

    save_config(config, tmp_path / "c.toml")
    assert main(["reg-images", str(tmp_path / "c.toml"), "--set", "regularization.steps=2"]) == 0
    out, err = capsys.readouterr()
    assert "rendering: 100%" in err and "2/2" in err  # the bar
    folder = tmp_path / "c" / "regularization"
    assert f"2 regularization images in {folder}" in out and len(list(folder.glob("*.png"))) == 2
    assert "a thing number 0" in out and "zkz" not in out.split("\n", 1)[1]
