"""Colour augmentation (seeded per sample, exact on resume) and the zero-terminal-SNR schedule (v-prediction only)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import stopper, tiny_config
from test_validation import make_images

from lora_studio.config import validate_config
from lora_studio.data import ColorJitter, apply_color_jitter, draw_color_jitter
from lora_studio.errors import ConfigError
from lora_studio.outputs import render_samples
from lora_studio.train import TrainingError, prepare, run_training


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("train"), 4)


def test_a_jitter_is_drawn_from_the_samples_own_generator_and_changes_the_colours():
    strengths = (0.2, 0.2, 0.2, 0.05)
    first = draw_color_jitter(strengths, random.Random("7-3-0-1-0"))
    assert first == draw_color_jitter(strengths, random.Random("7-3-0-1-0"))  # a resume draws the same
    assert first != draw_color_jitter(strengths, random.Random("7-4-0-1-0"))
    assert 0.8 <= first.brightness <= 1.2 and -0.05 <= first.hue <= 0.05
    image = Image.new("RGB", (8, 8), (200, 60, 30))
    image.paste((20, 120, 220), (0, 0, 4, 8))
    assert apply_color_jitter(image, ColorJitter(1.0, 1.0, 1.0, 0.0)).tobytes() == image.tobytes()
    for change in (ColorJitter(1.3, 1, 1, 0), ColorJitter(1, 0.5, 1, 0), ColorJitter(1, 1, 0.3, 0),
                   ColorJitter(1, 1, 1, 0.25)):  # fmt: skip
        assert apply_color_jitter(image, change).tobytes() != image.tobytes(), change
    shifted = np.asarray(apply_color_jitter(image, ColorJitter(1, 1, 1, 1 / 3)).convert("HSV"), dtype=int)
    hue = np.asarray(image.convert("HSV"), dtype=int)[..., 0]
    assert np.all(np.abs((shifted[..., 0] - hue) % 256 - 85) <= 1)  # a third of the wheel


def test_jitter_with_cached_latents_is_refused_and_kohyas_flag_is_migrated():
    with pytest.raises(ConfigError, match="color_jitter. changes every step"):
        validate_config({"version": 1, "dataset": {"color_jitter": [0.1, 0, 0, 0]}})
    with pytest.raises(ConfigError, match="hue 0.9 out of range"):
        validate_config({"version": 1, "dataset": {"color_jitter": [0, 0, 0, 0.9], "cache_latents": False}})
    kohya = validate_config({"color_aug": True, "cache_latents": False, "train_data_dir": "x"})
    assert kohya.dataset.color_jitter == (0.1, 0.1, 0.1, 0.02)


def test_a_run_with_colour_jitter_trains_and_resumes_exactly(tmp_path, tiny_folders, images):
    jitter = {"dataset": {"cache_latents": False, "color_jitter": [0.2, 0.2, 0.2, 0.05], "flip_aug": True}}
    straight = run_training(tiny_config(tmp_path / "a", tiny_folders, images, **jitter))
    plain = run_training(tiny_config(tmp_path / "p", tiny_folders, images, dataset={"cache_latents": False,
                                                                                     "flip_aug": True}))  # fmt: skip
    commands, stop_at_5 = stopper(5)
    config = tiny_config(tmp_path / "b", tiny_folders, images, **jitter)
    stopped = run_training(config, on_event=stop_at_5, commands=commands)
    resumed = run_training(config, resume_from=stopped.run_dir)
    a, b, c = (load_file(str(d.lora_path)) for d in (straight, resumed, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the jitter reached the training


def test_zero_terminal_snr_needs_v_prediction(tmp_path, tiny_folders, images):
    with pytest.raises(ConfigError, match="zero_terminal_snr. needs v-prediction"):
        validate_config({"version": 1, "prediction_type": "epsilon", "optimizer": {"zero_terminal_snr": True}})
    config = tiny_config(tmp_path, tiny_folders, images, optimizer={"zero_terminal_snr": True})
    with pytest.raises(TrainingError, match="needs v-prediction, but .* predicts epsilon"):
        prepare(config)


def test_zero_terminal_snr_rescales_the_schedule_trains_and_samples(tmp_path, tiny_folders, images):
    config = tiny_config(tmp_path, tiny_folders, images, base_model=str(tiny_folders["sd2-v"]),
                         optimizer={"zero_terminal_snr": True, "min_snr_gamma": 5.0},
                         sample={"every_n_steps": 0, "num_inference_steps": 3, "width": 32, "height": 32,
                                 "strengths": [1.0]})  # fmt: skip
    session = prepare(config)
    cumprod = session.noise_scheduler.alphas_cumprod
    assert cumprod[-1] < 1e-6 and cumprod[0] > 0.99  # zero SNR at the last timestep
    plain = prepare(tiny_config(tmp_path / "plain", tiny_folders, images, base_model=str(tiny_folders["sd2-v"])))
    assert plain.noise_scheduler.alphas_cumprod[-1] > 1e-4
    from lora_studio.step import training_step

    losses = [training_step(session, [0, 1]) for _ in range(2)]
    assert all(torch.isfinite(loss).all() for loss in losses)
    event = render_samples(session)
    assert event.images and event.images[0].is_file()


def test_samples_of_a_zero_snr_run_start_from_the_last_timestep(tiny_folders):
    from lora_studio.models import load_base
    from lora_studio.sample import use_sampler

    pipeline = load_base(str(tiny_folders["sd2-v"]), dtype=torch.float32, device="cpu").pipeline
    for sampler in ("euler_a", "ddim", "dpmpp_2m"):
        use_sampler(pipeline, sampler, zero_terminal_snr=True)
        assert pipeline.scheduler.config.rescale_betas_zero_snr and pipeline.scheduler.config.timestep_spacing == (
            "trailing")  # fmt: skip
        pipeline.scheduler.set_timesteps(4)
        assert int(pipeline.scheduler.timesteps[0]) == 999
