"""bench/validation_regions.py's regions are the held-out images' own shapes (it indexes the demo world by name)."""

import numpy as np
import pytest
from PIL import Image

from lora_studio import demo_data
from lora_studio.paths import DEMO_VALIDATION_DIR


def stroke_overlap(path, regions) -> float:
    """Intersection over union of the image's drawn pixels and the region `shape stroke`."""
    drawn = demo_data.foreground_mask(np.asarray(Image.open(path).convert("RGB")))
    stroke = regions["shape stroke"] > 0.5
    return (drawn & stroke).sum() / (drawn | stroke).sum()


def test_the_regions_are_each_held_out_images_own_shape(bench_script):
    bench = bench_script("validation_regions")
    images = sorted(DEMO_VALIDATION_DIR.glob("*.png"))
    assert len(images) == demo_data.DEMO_VALIDATION_IMAGES
    for path in images:
        scene = bench.held_out_scene(path.name)
        assert np.array_equal(np.asarray(demo_data.render(scene)), np.asarray(Image.open(path).convert("RGB")))
        regions = bench.region_masks(path.name, demo_data.SIZE)  # at image size: no averaging down
        assert stroke_overlap(path, regions) > 0.75, path.name  # 0.8-1.0: antialiased edges
        whole = regions["shape interior"] + regions["shape stroke"]
        assert np.abs(whole - regions["shape filled"]).max() < 0.05, path.name  # interior + stroke = the shape
        assert regions["shape interior"].sum() > 50, path.name  # outlines are hollow
        assert (regions["outside the shape"] * regions["shape filled"]).sum() == 0, path.name


def test_another_images_regions_do_not_match(bench_script):
    bench = bench_script("validation_regions")
    first, second = sorted(DEMO_VALIDATION_DIR.glob("*.png"))[:2]
    assert stroke_overlap(first, bench.region_masks(second.name, demo_data.SIZE)) < 0.3


def test_the_recorded_errors_are_the_validation_pass_own(tmp_path, bench_script):
    """Each held-out image's kept per-pixel errors average to the loss the run logged for that step."""
    from lora_studio.config import load_preset
    from lora_studio.runs import RunFolder
    from lora_studio.train import run_training

    bench = bench_script("validation_regions")
    config = load_preset("demo-cpu", [f"output_dir='{tmp_path}'", "sample.every_n_steps=0", "save.every_n_steps=0",
                                      "optimizer.max_train_steps=4", "validation.every_n_steps=2"])  # fmt: skip
    maps = {}
    with bench.errors_recorded(maps):
        run = RunFolder(run_training(config).run_dir)
    logged = {row["step"]: row["validation_loss"] for row in run.read_metrics() if "validation_loss" in row}
    assert sorted(maps) == sorted(logged) == [2, 4]
    for step, errors in maps.items():
        assert len(errors) == demo_data.DEMO_VALIDATION_IMAGES
        assert np.mean([e.mean() for e in errors.values()]) == pytest.approx(logged[step], rel=1e-5)
    assert "errors_recorded" not in bench.validation.masked_mse.__qualname__  # restored, not left patched
    assert "errors_recorded" not in bench.validation.timestep_losses.__qualname__
