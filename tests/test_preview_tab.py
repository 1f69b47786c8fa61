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

    def image(files, strength):
        picture, text = preview_tab.generate(base, files, strength, *common, 3, 32, 32)
        return np.asarray(picture, dtype=np.int16), text

    plain, _ = image([], 1.0)
    zero, text = image(lora, 0.0)
    one, _ = image(lora, 1.0)
    assert np.array_equal(zero, plain) and np.abs(one - zero).max() > 10
    assert "<lora:" in text and "Seed: 3" in text
    picture, _ = preview_tab.generate_grid(base, lora, "0, 1", "1, 2", *common, 32, 32)
    assert picture.size[0] > 2 * 32 and picture.size[1] > 2 * 32
    with pytest.raises(LoraStudioError, match="numbers separated by commas"):
        preview_tab.generate_grid(base, lora, "0, strong", "1", *common, 32, 32)
    with pytest.raises(LoraStudioError, match="Pick a LoRA"):
        preview_tab.generate_grid(base, [], "0, 1", "1", *common, 32, 32)
