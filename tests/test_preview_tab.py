"""The Preview tab's handlers, called directly on a tiny model and a LoRA trained in the test."""

import numpy as np
import pytest
from test_export import trained_session
from tiny_models import caption_images

from lora_studio import train as train_module
from lora_studio.errors import LoraStudioError
from lora_studio.ui import preview_tab


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_folders):
    """runs/<run>/tiny.safetensors plus one checkpoint, as a training run leaves them."""
    runs = tmp_path_factory.mktemp("runs")
    images = caption_images(tmp_path_factory.mktemp("data"))
    session = trained_session(runs / "work", tiny_folders, images, "sd1")
    run = runs / "tiny-20260101-000000"
    train_module.save_lora_file(session, run / "checkpoints" / "tiny-step000002.safetensors")
    train_module.save_lora_file(session, run / "tiny.safetensors")
    return runs, run


def test_lora_choices_lists_finals_then_checkpoints(run_folder):
    runs, run = run_folder
    assert preview_tab.lora_choices(runs) == [
        str(run / "tiny.safetensors"),
        str(run / "checkpoints" / "tiny-step000002.safetensors"),
    ]


def test_generate_at_strengths_and_a_grid(run_folder, tiny_folders):
    _runs, run = run_folder
    base, lora = str(tiny_folders["sd1"]), [str(run / "tiny.safetensors")]
    assert preview_tab.suggest_prompt(lora) == "zkz, "
    common = ("zkz, a thing", "", "ddim", 3, 5.0)

    def image(files, *strengths):
        picture, text = preview_tab.generate(base, files, *common, 3, 32, 32, *strengths)
        return np.asarray(picture, dtype=np.int16), text

    plain, _ = image([], 1.0)
    zero, text = image(lora, 0.0)
    one, _ = image(lora, 1.0)
    assert np.array_equal(zero, plain) and np.abs(one - zero).max() > 10
    assert "<lora:" in text and "Seed: 3" in text
    picture, _ = preview_tab.generate_grid(base, lora, "strength x seed", "0, 1", "1, 2", *common, 32, 32, 1.0)
    assert picture.size[0] > 2 * 32 and picture.size[1] > 2 * 32
    with pytest.raises(LoraStudioError, match="numbers separated by commas"):
        preview_tab.generate_grid(base, lora, "strength x seed", "0, strong", "1", *common, 32, 32, 1.0)
    with pytest.raises(LoraStudioError, match="Pick a LoRA"):
        preview_tab.generate_grid(base, [], "strength x seed", "0, 1", "1", *common, 32, 32, 1.0)


def test_each_stacked_lora_has_its_own_strength(run_folder, tiny_folders):
    _runs, run = run_folder
    final, checkpoint = str(run / "tiny.safetensors"), str(run / "checkpoints" / "tiny-step000002.safetensors")
    common = ("zkz, a thing", "", "ddim", 3, 5.0, 3, 32, 32)
    _image, text = preview_tab.generate(str(tiny_folders["sd1"]), [final, checkpoint], *common, 0.25, 0.75, 1, 1)
    assert ":0.25>" in text and ":0.75>" in text
    with pytest.raises(LoraStudioError, match="stacks at most 4"):
        preview_tab.chosen_strengths([final] * 5, [1] * 4)
    shown = preview_tab.strength_sliders([final, checkpoint])
    assert [u.get("visible") for u in shown] == [True, True, False, False]
    assert shown[1]["label"] == "Strength: checkpoints/tiny-step000002.safetensors"


def test_checkpoint_grid_turns_on_one_checkpoint_per_column(run_folder, tiny_folders):
    _runs, run = run_folder
    final = str(run / "tiny.safetensors")
    assert preview_tab.run_checkpoints(final) == [str(run / "checkpoints" / "tiny-step000002.safetensors"), final]
    common = ("zkz, a thing", "", "ddim", 3, 5.0, 32, 32)
    picture, text = preview_tab.generate_grid(str(tiny_folders["sd1"]), [final], "checkpoint x strength", "0, 1",
                                              "4", *common, 1.0)  # fmt: skip
    assert picture.size[0] > 2 * 32 and picture.size[1] > 2 * 32
    assert "Seed: 4" in text and ":0>" in text  # the first cell: first checkpoint at strength 0
    checkpoint = str(run / "checkpoints" / "tiny-step000002.safetensors")  # chosen too: it is just a column
    again, _ = preview_tab.generate_grid(str(tiny_folders["sd1"]), [final, checkpoint], "checkpoint x strength",
                                         "0, 1", "4", *common, 1.0, 0.5)  # fmt: skip
    assert again.size == picture.size  # still two checkpoint columns, not three


def test_uploaded_lora_is_checked_and_kept_inside_the_runs_folder(run_folder, tmp_path, monkeypatch):
    runs, run = run_folder
    monkeypatch.setattr(preview_tab, "RUNS_DIR", tmp_path / "runs")
    upload = tmp_path / "incoming" / "..My LoRA!.safetensors"  # a hidden-file dot prefix is dropped too
    upload.parent.mkdir(parents=True)
    upload.write_bytes((run / "tiny.safetensors").read_bytes())
    dropdown, message = preview_tab.upload_lora(str(upload), [])
    target = tmp_path / "runs" / "uploads" / "My_LoRA_.safetensors"
    assert target.is_file() and message == "Added My_LoRA_.safetensors." and dropdown.value == [str(target)]
    bad = tmp_path / "incoming" / "bad.safetensors"
    bad.write_bytes(b"not a lora")
    with pytest.raises(LoraStudioError):
        preview_tab.upload_lora(str(bad), [])
    assert sorted(p.name for p in (tmp_path / "runs" / "uploads").iterdir()) == ["My_LoRA_.safetensors"]
