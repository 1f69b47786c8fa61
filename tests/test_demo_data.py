"""The demo world's classifiers and detector, tested on the generator's own images where the truth is known."""

import random

import numpy as np
import pytest
from PIL import Image

from lora_studio import demo_data
from lora_studio.paths import DEMO_DATASET_DIR


def scenes(n, seed, **kwargs):
    rng = random.Random(seed)
    return [demo_data.random_scene(rng, **kwargs) for _ in range(n)]


def with_noise(image, sigma, seed):
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + np.random.default_rng(seed).normal(0, sigma, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("noise", [0.0, 10.0])
def test_colour_and_shape_classifiers_on_known_scenes(noise):
    truth = scenes(160, seed=11)
    analyses = [demo_data.analyse(with_noise(demo_data.render(s), noise, i)) for i, s in enumerate(truth)]
    color = np.mean([a.color == s.color for a, s in zip(analyses, truth, strict=True)])
    shape = np.mean([a.shape == s.shape for a, s in zip(analyses, truth, strict=True)])
    assert color >= 0.97 and shape >= 0.97, (color, shape)


def test_every_shape_and_colour_is_recognised():
    rng = random.Random(5)
    for shape in demo_data.SHAPES:
        for color in demo_data.COLORS:
            scene = demo_data.random_scene(rng, shape=shape, color=color, radius=18.0)
            analysis = demo_data.analyse(demo_data.render(scene))
            assert (analysis.shape, analysis.color) == (shape, color), scene


def test_outline_detector_separates_outlines_from_solid_shapes():
    solid = [demo_data.analyse(demo_data.render(s)) for s in scenes(120, seed=21)]
    rng = random.Random(22)
    radius = demo_data.CONCEPT_MIN_RADIUS
    outlines = [
        demo_data.analyse(demo_data.render(demo_data.random_scene(rng, outline=True, radius=rng.uniform(radius, 22))))
        for _ in range(120)
    ]
    assert not any(a.concept for a in solid)
    assert all(a.concept for a in outlines)


def test_outline_shapes_are_still_classified():
    rng = random.Random(3)
    radius = demo_data.CONCEPT_MIN_RADIUS
    truth = [demo_data.random_scene(rng, outline=True, radius=rng.uniform(radius, 22)) for _ in range(60)]
    hits = [demo_data.analyse(demo_data.render(s)).shape == s.shape for s in truth]
    assert np.mean(hits) >= 0.9


def test_blank_image_has_no_shape_and_no_concept():
    analysis = demo_data.analyse(Image.new("RGB", (64, 64), (245, 245, 245)))
    assert analysis.shape is None and analysis.color is None and not analysis.concept


def test_rendering_is_deterministic_and_64px():
    a, b = scenes(1, seed=9)[0], scenes(1, seed=9)[0]
    assert a == b
    image = demo_data.render(a)
    assert image.size == (64, 64)
    assert np.array_equal(np.asarray(image), np.asarray(demo_data.render(b)))


def test_captions_are_natural_language_and_carry_the_trigger_only_for_the_concept():
    scene = demo_data.Scene("star", "red", "white", 18.0, 32.0, 32.0)
    assert scene.caption() == "a red star on a white background"
    outline = demo_data.Scene("star", "red", "white", 18.0, 32.0, 32.0, outline=True)
    assert outline.caption().startswith("zkz, ")


def test_eval_grid_covers_every_colour_and_shape():
    cases = demo_data.eval_cases()
    assert len(cases) >= 64
    assert {(c.color, c.shape) for c in cases} == {(c, s) for c in demo_data.COLORS for s in demo_data.SHAPES}
    assert len({c.seed for c in cases}) == len(cases)
    assert {c.background for c in cases} == set(demo_data.BACKGROUNDS)


def test_scores_count_the_concept_per_prompted_shape():
    cases = demo_data.eval_cases()[:8]  # red: circle, circle, square, square, triangle, ... (two seeds each)
    scenes = [demo_data.random_scene(random.Random(i), outline=i < 2, shape=c.shape, color=c.color, radius=20.0)
              for i, c in enumerate(cases)]  # fmt: skip
    scores = demo_data.score_images(cases, [demo_data.render(s) for s in scenes])
    assert scores.concept_by_shape == {"circle": 1.0, "square": 0.0, "triangle": 0.0, "star": 0.0}
    assert scores.concept_rate == 2 / 8 and scores.as_dict()["concept_by_shape"] == scores.concept_by_shape


def test_bundled_demo_dataset_matches_the_generator(tmp_path):
    images = sorted(DEMO_DATASET_DIR.glob("*.png"))
    assert 12 <= len(images) <= 24
    written = demo_data.write_concept_images(tmp_path)  # what scripts/make_demo_model.py --dataset-only writes
    assert [p.name for p in images] == [p.name for p in written]
    for path, scene, fresh in zip(images, demo_data.concept_scenes(), written, strict=True):
        caption = path.with_suffix(".txt").read_text().strip()
        assert caption == fresh.with_suffix(".txt").read_text().strip()
        assert caption.startswith("zkz, ") and scene.color in caption and scene.shape in caption
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(demo_data.render(scene)))
        assert np.array_equal(np.asarray(Image.open(fresh)), np.asarray(Image.open(path)))
        assert demo_data.analyse(Image.open(path)).concept
