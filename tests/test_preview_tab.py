"""The Preview tab's handlers, called directly on a tiny model and a LoRA trained in the test."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_export import trained_session
from tiny_models import caption_images

from lora_studio import outputs
from lora_studio.errors import LoraStudioError
from lora_studio.lora_read import load_lora
from lora_studio.paths import Roots
from lora_studio.runs import RunFolder
from lora_studio.ui import preview_tab
from lora_studio.ui.state import AppState
from lora_studio.workflows import run_lora_files


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_folders):
    """runs/<run>/tiny.safetensors plus one checkpoint, as a training run leaves them, in an app whose roots
    take the tiny base models in as an --allow-dir folder."""
    home = tmp_path_factory.mktemp("home")
    images = caption_images(tmp_path_factory.mktemp("data"))
    session = trained_session(home / "work", tiny_folders, images, "sd1")
    run = home / "runs" / "tiny-20260101-000000"
    run.mkdir(parents=True)
    (run / "config.toml").write_text('name = "tiny"\n')
    outputs.save_lora_file(session, run / "checkpoints" / "tiny-step000002.safetensors")
    outputs.save_lora_file(session, run / "tiny.safetensors")
    roots = Roots(home / "runs", home / "datasets", home / "models", extra=(tiny_folders["sd1"].parent.resolve(),))
    return AppState(roots), run


def test_lora_choices_lists_finals_then_checkpoints(run_folder):
    app, run = run_folder
    assert preview_tab.lora_choices(app) == [
        str(run / "tiny.safetensors"),
        str(run / "checkpoints" / "tiny-step000002.safetensors"),
    ]


def test_generate_at_strengths_and_a_grid(run_folder, tiny_folders):
    app, run = run_folder
    base, lora = str(tiny_folders["sd1"]), [str(run / "tiny.safetensors")]
    assert preview_tab.suggest_prompt(app, lora) == "zkz, "
    common = ("zkz, a thing", "", "ddim", 3, 5.0, 1)

    def image(files, *strengths):
        picture, text = preview_tab.generate(app, base, "", files, *common, 3, 32, 32, *strengths)
        return np.asarray(picture, dtype=np.int16), text

    plain, _ = image([], 1.0)
    zero, text = image(lora, 0.0)
    one, _ = image(lora, 1.0)
    assert np.array_equal(zero, plain) and np.abs(one - zero).max() > 10
    assert "<lora:" in text and "Seed: 3" in text
    picture, _ = preview_tab.generate_grid(app, base, "", lora, "strength x seed", "0, 1", "1, 2", *common, 32, 32,
                                           1.0)  # fmt: skip
    assert picture.size[0] > 2 * 32 and picture.size[1] > 2 * 32
    with pytest.raises(LoraStudioError, match="numbers separated by commas"):
        preview_tab.generate_grid(app, base, "", lora, "strength x seed", "0, strong", "1", *common, 32, 32, 1.0)
    with pytest.raises(LoraStudioError, match="Pick a LoRA"):
        preview_tab.generate_grid(app, base, "", [], "strength x seed", "0, 1", "1", *common, 32, 32, 1.0)


def test_each_stacked_lora_has_its_own_strength(run_folder, tiny_folders):
    app, run = run_folder
    final, checkpoint = str(run / "tiny.safetensors"), str(run / "checkpoints" / "tiny-step000002.safetensors")
    common = ("zkz, a thing", "", "ddim", 3, 5.0, 1, 3, 32, 32)
    _image, text = preview_tab.generate(app, str(tiny_folders["sd1"]), "", [final, checkpoint], *common, 0.25, 0.75,
                                        1, 1)  # fmt: skip
    assert ":0.25>" in text and ":0.75>" in text
    with pytest.raises(LoraStudioError, match="stacks at most 4"):
        preview_tab.chosen_strengths(app, [final] * 5, [1] * 4)
    shown = preview_tab.strength_sliders([final, checkpoint])
    assert [u.get("visible") for u in shown] == [True, True, False, False]
    assert shown[1]["label"] == "Strength: checkpoints/tiny-step000002.safetensors"


def test_checkpoint_grid_turns_on_one_checkpoint_per_column(run_folder, tiny_folders):
    app, run = run_folder
    final = str(run / "tiny.safetensors")
    checkpoint = run / "checkpoints" / "tiny-step000002.safetensors"
    assert run_lora_files(Path(final)) == [checkpoint, run / "tiny.safetensors"]
    common = ("zkz, a thing", "", "ddim", 3, 5.0, 1, 32, 32)
    picture, text = preview_tab.generate_grid(app, str(tiny_folders["sd1"]), "", [final], "checkpoint x strength",
                                              "0, 1", "4", *common, 1.0)  # fmt: skip
    assert picture.size[0] > 2 * 32 and picture.size[1] > 2 * 32
    assert "Seed: 4" in text and ":0>" in text  # the first cell: first checkpoint at strength 0
    checkpoint = str(run / "checkpoints" / "tiny-step000002.safetensors")  # chosen too: it is just a column
    again, _ = preview_tab.generate_grid(app, str(tiny_folders["sd1"]), "", [final, checkpoint],
                                         "checkpoint x strength", "0, 1", "4", *common, 1.0, 0.5)  # fmt: skip
    assert again.size == picture.size  # still two checkpoint columns, not three


def test_uploaded_lora_is_checked_and_kept_inside_the_runs_folder(app_state, run_folder, tmp_path):
    _app, run = run_folder
    upload = tmp_path / "gradio-uploads" / "..My LoRA!.safetensors"  # a hidden-file dot prefix is dropped too
    upload.write_bytes((run / "tiny.safetensors").read_bytes())
    dropdown, message = preview_tab.upload_lora(app_state, str(upload), [])
    target = app_state.roots.runs / "uploads" / "My_LoRA_.safetensors"
    assert target.is_file() and message == "Added My_LoRA_.safetensors." and dropdown.value == [str(target)]
    assert preview_tab.lora_choices(app_state) == [str(target)]
    bad = tmp_path / "gradio-uploads" / "bad.safetensors"
    bad.write_bytes(b"not a lora")
    with pytest.raises(LoraStudioError):
        preview_tab.upload_lora(app_state, str(bad), [])
    assert sorted(p.name for p in (app_state.roots.runs / "uploads").iterdir()) == ["My_LoRA_.safetensors"]


def test_lora_files_and_base_models_outside_the_roots_are_refused(run_folder, tmp_path):
    app, run = run_folder
    outside = tmp_path / "stolen.safetensors"
    outside.write_bytes((run / "tiny.safetensors").read_bytes())
    link = run / "link.safetensors"
    link.symlink_to(outside)
    common = ("zkz", "", "ddim", 2, 5.0, 1, 1, 32, 32)
    try:
        for files in ([str(outside)], [str(link)], [str(run / ".." / ".." / ".." / outside.name)]):
            with pytest.raises(LoraStudioError, match="lies outside"):
                preview_tab.generate(app, "demo", "", files, *common, 1.0)
        with pytest.raises(LoraStudioError, match="The base model '/etc' lies outside"):
            preview_tab.generate(app, "/etc", "", [], *common, 1.0)
    finally:
        link.unlink()


def test_preview_size_and_grid_cells_are_capped(run_folder, tiny_folders):
    app, run = run_folder
    base, lora = str(tiny_folders["sd1"]), [str(run / "tiny.safetensors")]
    with pytest.raises(LoraStudioError, match="size 100000x64 is outside 8-2048 pixels a side"):
        preview_tab.generate(app, base, "", lora, "zkz", "", "ddim", 2, 5.0, 1, 1, 100000, 64, 1.0)
    strengths = ", ".join(str(i / 100) for i in range(65))
    with pytest.raises(LoraStudioError, match="65 x 1 = 65 images is over the 64"):
        preview_tab.generate_grid(app, base, "", lora, "strength x seed", strengths, "1", "zkz", "", "ddim", 2, 5.0, 1,
                                  32, 32, 1.0)  # fmt: skip
    # Said before any base loads (an SDXL checkpoint takes half a minute): here the base does not even exist.
    missing = str(app.roots.models / "no-such-checkpoint.safetensors")
    with pytest.raises(LoraStudioError, match="steps = 0; use 1 to"):
        preview_tab.generate(app, missing, "", lora, "zkz", "", "ddim", 0, 5.0, 1, 1, 64, 64, 1.0)
    with pytest.raises(LoraStudioError, match="seed = -1; use 0 to"):
        preview_tab.generate_grid(app, missing, "", lora, "strength x seed", "0, 1", "-1", "zkz", "", "ddim", 2, 5.0,
                                  1, 32, 32, 1.0)  # fmt: skip


def test_the_pick_the_best_checkpoint_view_labels_frames_and_exports_the_best(run_folder, tiny_folders, tmp_path):
    app, run = run_folder
    home = tmp_path / "home"
    shutil.copytree(run, home / "runs" / run.name)
    app = AppState(Roots(home / "runs", home / "datasets", home / "models", extra=app.roots.extra))
    copy = RunFolder(home / "runs" / run.name)
    checkpoint, final = copy.checkpoint("tiny", 2), copy.final_lora("tiny")
    copy.record_validation(checkpoint, 2, 0.125)
    copy.record_validation(final, 3, 0.25)
    labels = dict((value, label) for label, value in preview_tab.labelled_lora_choices(app))
    assert labels[str(checkpoint)] == f"{run.name}/tiny-step000002.safetensors · val 0.1250 (best)"
    assert labels[str(final)] == f"{run.name}/tiny.safetensors · val 0.2500"

    common = ("zkz, a thing", "", "ddim", 3, 5.0, 1, 32, 32)
    picture, _ = preview_tab.generate_grid(app, str(tiny_folders["sd1"]), "", [str(final)], "checkpoint x strength",
                                           "0, 1", "4", *common, 1.0)  # fmt: skip
    pixels = np.asarray(picture)
    column = [x for x in range(pixels.shape[1]) if (pixels[:, x] == (234, 88, 12)).all(axis=1).sum() > 40]
    assert column and max(column) < picture.size[0] - 32  # the frame is around the first column (the best)
    pick = preview_tab.grid_checkpoints(app, [str(final)], "checkpoint x strength")
    assert pick.value == str(checkpoint) and len(pick.choices) == 2
    exported = Path(preview_tab.export_checkpoint(app, pick.value))
    assert exported.parent == copy.exports and exported.name == "tiny-step000002-kohya-fp16.safetensors"
    original, written = load_lora(checkpoint), load_lora(exported)
    assert set(written.modules) == set(original.modules)
    with pytest.raises(LoraStudioError, match="inside|outside|not a LoRA"):
        preview_tab.export_checkpoint(app, str(tmp_path / "elsewhere.safetensors"))


def test_bake_the_stack_compare_it_and_save_it(run_folder, tiny_folders):
    app, run = run_folder
    base = str(tiny_folders["sd1"])
    files = [str(run / "tiny.safetensors"), str(run / "checkpoints" / "tiny-step000002.safetensors")]
    common = ("zkz, a thing", "", "ddim", 3, 5.0, 1, 3, 32, 32)
    with pytest.raises(LoraStudioError, match="Bake the stack first"):
        preview_tab.save_baked(app, None, "x")
    picture, note, baked = preview_tab.bake_stack_preview(app, base, "", files, *common, 0, 0.7, -0.4)
    assert picture.width > 64 and "Baked tiny.safetensors x 0.7 + tiny-step000002.safetensors x -0.4" in note
    difference = int(note.rsplit("largest pixel difference ", 1)[1].rstrip("."))
    assert difference <= 2  # the baked LoRA at strength 1 renders as the stack does
    path, message, _choices = preview_tab.save_baked(app, baked, "../../my stack.safetensors")
    saved = Path(path)
    assert saved == app.roots.runs / "uploads" / "my_stack.safetensors" and "Saved my_stack.safetensors" in message
    assert str(saved) in preview_tab.lora_choices(app)
    written = load_lora(saved)
    assert set(written.modules) == set(baked.modules) and written.metadata["modelspec.title"] == "my_stack"
    with pytest.raises(LoraStudioError, match="exists already"):
        preview_tab.save_baked(app, baked, "my stack")
    _, svd_note, small = preview_tab.bake_stack_preview(app, base, "", files, *common, 2, 0.7, -0.4)
    assert "SVD to rank 2" in svd_note and max(m.rank for m in small.modules.values()) <= 2
    with pytest.raises(LoraStudioError, match="rank must be 0"):
        preview_tab.bake_stack_preview(app, base, "", files, *common, 5000, 1.0, 1.0)
    saved.unlink()


def lora_with_size(source: Path, target: Path, resolution: dict[str, str]) -> Path:
    """A copy of `source` whose metadata says it trained at another size (ours write modelspec.resolution, kohya's
    ss_resolution)."""
    from safetensors.torch import load_file, save_file

    from lora_studio.safetensors_io import read_header

    metadata = {k: v for k, v in read_header(source).metadata.items() if "resolution" not in k}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(source)), str(target), metadata={**metadata, **resolution})
    return target


def test_picking_a_lora_sets_what_its_run_trained_and_sampled_with(run_folder, tiny_folders, tmp_path):
    """The Preview form follows the first chosen LoRA: the base and clip skip its run trained with, its samples'
    sampler, steps, CFG and negative prompt, the size its metadata gives; once per first LoRA (stacking a second
    keeps what the person set since); a base picked by hand brings its own native size."""
    import json

    from lora_studio.config import load_preset, save_config
    from lora_studio.workflows import load_preview_base

    trained, run = run_folder
    app = AppState(Roots(tmp_path / "runs", tmp_path / "datasets", tmp_path / "models", extra=trained.roots.extra))
    run = Path(shutil.copytree(run, app.roots.runs / run.name))  # runs of this test's own, beside a copy of it
    sd1 = str(tiny_folders["sd1"])
    other = app.roots.runs / "other-20260102-000000"
    sampled = [f"base_model={json.dumps(sd1)}", "clip_skip=2", "sample.sampler='ddim'", "sample.num_inference_steps=9",
               "sample.guidance_scale=0", "sample.negative_prompt='blurry'"]  # fmt: skip
    save_config(load_preset("demo-cpu", sampled), other / "config.toml")
    picked = str(lora_with_size(run / "tiny.safetensors", other / "other.safetensors",
                                {"modelspec.resolution": "48x40"}))  # fmt: skip
    final = str(run / "tiny.safetensors")
    same = {"__type__": "update"}
    assert preview_tab.FOLLOWED == ("base_model", "vae", "width", "height", "negative_prompt", "sampler", "steps",
                                    "cfg", "clip_skip")  # fmt: skip

    def values(updates) -> tuple:
        return tuple(u.get("value", "-") for u in updates)

    *updates, followed = preview_tab.follow_lora(app, [picked], None)
    assert values(updates) == (sd1, "", 48, 40, "blurry", "ddim", 9, 0.0, 2) and followed == picked  # CFG 0: a value
    # A second LoRA stacked under the first: nothing changes (the person may have set the size by now).
    assert preview_tab.follow_lora(app, [picked, final], followed) == (*[same] * 9, picked)
    # Another first LoRA: the tiny run's config leaves everything at the config's defaults, its file says the size.
    trained_at = int(load_lora(final).metadata["modelspec.resolution"].split("x")[0])
    *updates, followed = preview_tab.follow_lora(app, [final, picked], picked)
    assert values(updates) == ("demo", "", trained_at, trained_at, "", "euler_a", 20, 7.0, 1) and followed == final
    assert preview_tab.follow_lora(app, [], final) == (*[same] * 9, None)

    # kohya's way of saying the size; a run whose base lies outside the app's folders leaves the base as it is, and
    # one whose config is damaged leaves all of the run's settings.
    outside = app.roots.runs / "outside-20260103-000000"
    save_config(load_preset("demo-cpu", [f"base_model={json.dumps(str(tmp_path.parent))}"]), outside / "config.toml")
    kohya = str(lora_with_size(run / "tiny.safetensors", outside / "outside.safetensors",
                               {"ss_resolution": "(768, 512)"}))  # fmt: skip
    *updates, _ = preview_tab.follow_lora(app, [kohya], None)
    assert values(updates)[:4] == ("-", "", 768, 512)
    (outside / "config.toml").write_text("base_model = [")
    *updates, _ = preview_tab.follow_lora(app, [kohya], None)
    assert values(updates) == ("-", "-", 768, 512, "-", "-", "-", "-", "-")
    no_size = str(lora_with_size(run / "tiny.safetensors", outside / "plain.safetensors", {}))
    assert values(preview_tab.follow_lora(app, [no_size], None)[:4]) == ("-", "-", "-", "-")

    # The clip skip reaches the render: another image, and the infotext says it as A1111 does.
    common = ("zkz, a thing", "", "ddim", 2, 5.0)
    at_one, text_one = preview_tab.generate(app, sd1, "", [], *common, 1, 3, 32, 32, 1.0)
    at_two, text_two = preview_tab.generate(app, sd1, "", [], *common, 2, 3, 32, 32, 1.0)
    assert np.asarray(at_one).tobytes() != np.asarray(at_two).tobytes()
    assert "Clip skip: 2" in text_two and "Clip skip" not in text_one

    # A base picked by hand: its own side, read from its configs without loading it.
    assert preview_tab.base_size(app, "demo") == (64, 64)
    native = load_preview_base(str(tiny_folders["sdxl"])).native_resolution
    assert preview_tab.base_size(app, str(tiny_folders["sdxl"])) == (native, native)
    with pytest.raises(LoraStudioError, match="outside"):
        preview_tab.base_size(app, str(tmp_path))
