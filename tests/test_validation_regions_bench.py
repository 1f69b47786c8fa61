"""bench/validation_regions.py's regions are the held-out images' own shapes (it indexes the demo world by name)."""

import numpy as np
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
