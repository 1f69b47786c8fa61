"""The bundled demo model: loads offline in seconds through the ordinary diffusers-folder path, generates fast."""

import json
import time

import pytest
import torch
from diffusers import DiffusionPipeline

from lora_studio import demo_data
from lora_studio.catalogue import describe_source
from lora_studio.models import load_base
from lora_studio.paths import DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def demo():
    return load_base("demo", dtype=torch.float32, device="cpu")


def test_loads_offline_in_seconds():
    start = time.perf_counter()
    base = load_base("demo", device="cpu")
    assert time.perf_counter() - start < 5.0
    assert (base.family, base.prediction_type, base.native_resolution) == ("sd1", "epsilon", 64)
    assert describe_source("demo").kind == "demo"


def test_ten_step_generation_at_64px_is_fast(demo):
    demo.pipeline.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    image = demo.pipeline(
        "a red star on a white background",
        num_inference_steps=10,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert time.perf_counter() - start < 5.0
    assert image.size == (64, 64)


def test_same_code_path_as_any_diffusers_folder(demo):
    """`demo` is only a name for the folder: loading the folder by path gives the identical model."""
    by_path = load_base(DEMO_MODEL_DIR, dtype=torch.float32, device="cpu")
    pairs = [(demo.unet, by_path.unet), (demo.vae, by_path.vae), (demo.text_encoders[0], by_path.text_encoders[0])]
    for a, b in pairs:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_plain_diffusers_loads_it_alone_in_one_dtype():
    pipeline = DiffusionPipeline.from_pretrained(DEMO_MODEL_DIR)
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float32}
    assert type(pipeline).__name__ == "StableDiffusionPipeline"


def test_structure_has_the_layers_lora_targets():
    config = json.loads((DEMO_MODEL_DIR / "unet" / "config.json").read_text())
    assert "CrossAttnDownBlock2D" in config["down_block_types"]
    names = {n.rsplit(".", 1)[-1] for n, _ in load_base("demo", device="cpu").unet.named_modules()}
    assert {"to_q", "to_k", "to_v", "proj_in", "proj_out"} <= names


def test_assets_stay_small():
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.rglob("*") if f.is_file())
    dataset = sum(f.stat().st_size for f in (DEMO_MODEL_DIR.parent / "demo-dataset").rglob("*") if f.is_file())
    assert size + dataset < 25e6


def test_follows_prompts_on_a_small_grid(demo):
    """A quick version of bench/demo_quality.py: 16 seeded cases, colour and shape mostly right."""
    demo.pipeline.set_progress_bar_config(disable=True)
    cases = demo_data.eval_cases(seeds_per_prompt=2)[::4]
    images = demo_data.generate(demo.pipeline, [c.prompt() for c in cases], [c.seed for c in cases], steps=20)
    scores = demo_data.score_images(cases, images)
    # Regression guard a little below the bundled model's level (64-case grid: colour 97%, shape 94%).
    assert scores.color_rate >= 0.8 and scores.shape_rate >= 0.7, scores
    assert scores.concept_rate <= 0.125, scores


@pytest.mark.slow
def test_quality_bar_over_64_cases(demo):
    """The issue's bar, over the full grid (about a minute): colour >= 85%, shape >= 60%, concept <= 5%."""
    demo.pipeline.set_progress_bar_config(disable=True)
    cases = demo_data.eval_cases()
    seeds = [c.seed for c in cases]
    plain = demo_data.score_images(cases, demo_data.generate(demo.pipeline, [c.prompt() for c in cases], seeds))
    trig = demo_data.score_images(cases, demo_data.generate(demo.pipeline, [c.prompt(True) for c in cases], seeds))
    assert plain.color_rate >= 0.85 and plain.shape_rate >= 0.60
    assert plain.concept_rate <= 0.05 and trig.concept_rate <= 0.05
