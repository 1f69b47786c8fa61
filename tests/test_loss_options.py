"""kohya's loss and noise options (`optimizer.loss_type` and the Huber threshold, multi-resolution noise, input
perturbation, the timestep range, debiased estimation): their formulas on tensors, their effect on a real training
step of a tiny model, and the config rules. Exact resume with all of them on is in test_masks.py."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from test_train import tiny_config
from test_validation import make_images

from lora_studio import step as step_module
from lora_studio.config import OptimConfig, validate_config
from lora_studio.errors import ConfigError
from lora_studio.step import Draw, huber_thresholds, pixel_losses, pyramid_noise, sample_draws, training_step
from lora_studio.train import TrainingError, prepare


def sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_pseudo_huber_is_quadratic_for_small_errors_and_linear_for_large():
    pred = torch.tensor([0.0, 0.01, 0.1, 1.0, 10.0]).view(5, 1, 1, 1)
    target = torch.zeros_like(pred)
    c = torch.full((5,), 0.1)
    huber = pixel_losses(pred, target, OptimConfig(loss_type="huber"), c).flatten()
    smooth = pixel_losses(pred, target, OptimConfig(loss_type="smooth_l1"), c).flatten()
    error = pred.flatten()
    assert torch.allclose(huber, 2 * 0.1 * (torch.sqrt(error**2 + 0.01) - 0.1))  # kohya's formula
    assert torch.allclose(smooth, huber / 0.1)
    assert huber[1].item() == pytest.approx(0.01**2, rel=0.01)  # |e| << c: the squared error
    assert huber[4].item() == pytest.approx(2 * 0.1 * (10.0 - 0.1), rel=1e-3)  # |e| >> c: linear
    assert (huber[4] / huber[3]).item() < 12  # ten times the error, about ten times the loss (squared: 100)
    l1 = pixel_losses(pred, target, OptimConfig(loss_type="l1")).flatten()
    l2 = pixel_losses(pred, target, OptimConfig(loss_type="l2")).flatten()
    assert torch.equal(l1, error.abs()) and torch.equal(l2, error**2)
    assert pixel_losses(pred, target, OptimConfig()).flatten().tolist() == l2.tolist()  # l2 is the default


def test_huber_thresholds_follow_kohyas_schedules():
    scheduler, timesteps = sd_scheduler(), torch.tensor([0, 250, 500, 999])
    assert huber_thresholds(OptimConfig(), scheduler, timesteps) is None  # l2 needs none
    snr = huber_thresholds(OptimConfig(loss_type="huber", huber_c=0.1), scheduler, timesteps)
    alphas = scheduler.alphas_cumprod[timesteps]
    assert torch.allclose(snr, 0.9 / (1 + ((1 - alphas) / alphas) ** 0.5) ** 2 + 0.1)
    assert snr[0] > 0.9 and snr[-1] < 0.12 and (snr[:-1] > snr[1:]).all()  # ~1 at low noise, down to c
    exponential = huber_thresholds(OptimConfig(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.1,
                                               huber_scale=2.0), scheduler, timesteps)  # fmt: skip
    expected = [2.0 * 0.1 ** (t / 1000) for t in (0, 250, 500, 999)]  # scale at t = 0, down to c x scale
    assert exponential.tolist() == pytest.approx(expected, rel=1e-5)
    constant = huber_thresholds(OptimConfig(loss_type="huber", huber_schedule="constant", huber_c=0.2,
                                            huber_scale=0.5), scheduler, timesteps)  # fmt: skip
    assert constant.tolist() == pytest.approx([0.1] * 4)


def test_multires_noise_is_coarser_unit_noise_from_the_samples_own_draws():
    noise = torch.randn((4, 32, 32), generator=torch.Generator().manual_seed(0))
    (first,), (again,), (other,) = (sample_draws(7, 3, 0, [5]), sample_draws(7, 3, 0, [5]), sample_draws(7, 4, 0, [5]))
    pyramid = pyramid_noise(noise, first, 6, 0.3)
    assert torch.equal(pyramid, pyramid_noise(noise, again, 6, 0.3))  # the same draws, the same noise (resume)
    assert not torch.equal(pyramid, pyramid_noise(noise, other, 6, 0.3))
    assert pyramid.shape == noise.shape and pyramid.std().item() == pytest.approx(1.0, abs=1e-5)

    def coarse_variance(x: torch.Tensor) -> float:  # the variance left after 8x8 averaging: low frequencies
        return torch.nn.functional.avg_pool2d(x[None], 8).var().item()

    # Plain noise averages out (1/64 of its variance is left); the coarse levels do not.
    assert coarse_variance(noise) < 0.02 and coarse_variance(pyramid) > 1.5 * coarse_variance(noise)
    assert coarse_variance(pyramid_noise(noise, again, 6, 0.8)) > 0.1  # a larger discount: more of it
    unused = Draw(first.rng, torch.Generator().manual_seed(1))
    assert pyramid_noise(noise, unused, 1, 0.3).std().item() == pytest.approx(1.0, abs=1e-5)


def test_the_options_reach_a_real_training_step(tmp_path, tiny_folders, monkeypatch):
    """One step of a tiny model per setting: the timestep range and input perturbation reach the UNet's input, and
    each loss option changes the loss of the same draws while the default stays the plain MSE."""
    from tiny_models import caption_images

    images = tmp_path / "data"
    images.mkdir()
    caption_images(images)
    seen = []
    real_predict = step_module.predict

    def recording_predict(unet, scheduler, latents, noise, timesteps, *args):
        seen.append((timesteps.clone(), noise.clone(), args[-1]))
        return real_predict(unet, scheduler, latents, noise, timesteps, *args)

    monkeypatch.setattr(step_module, "predict", recording_predict)

    def first_losses(**optimizer) -> list[float]:
        config = tiny_config(tmp_path / str(len(seen)), tiny_folders, images, optimizer=optimizer)
        return training_step(prepare(config), [0, 1]).tolist()

    plain = first_losses(min_snr_gamma=0)
    timesteps, noise, input_noise = seen[-1]
    assert input_noise is None
    ranged = first_losses(min_snr_gamma=0, min_timestep=400, max_timestep=410, ip_noise_gamma=0.1)
    timesteps, noise, input_noise = seen[-1]
    assert ((timesteps >= 400) & (timesteps < 410)).all()
    extra = (input_noise - noise) / 0.1  # the perturbation: unit noise of its own, the target keeps `noise`
    assert extra.std().item() == pytest.approx(1.0, abs=0.2) and ranged != plain
    for changed in ({"loss_type": "huber"}, {"loss_type": "smooth_l1", "huber_schedule": "constant"},
                    {"loss_type": "l1"}, {"debiased_estimation": True}, {"multires_noise_iterations": 4}):  # fmt: skip
        losses = first_losses(min_snr_gamma=0, **changed)
        assert losses != plain and all(math.isfinite(x) and x > 0 for x in losses), changed
    assert first_losses(min_snr_gamma=0) == plain  # none of it leaks into a plain run


def test_the_options_cross_field_rules_and_kohyas_keys():
    with pytest.raises(ConfigError, match="noise_offset` and `optimizer.multires_noise_iterations` cannot both"):
        validate_config({"version": 1, "optimizer": {"noise_offset": 0.05, "multires_noise_iterations": 6}})
    with pytest.raises(ConfigError, match="min_timestep` = 500 is not below max_timestep = 500"):
        validate_config({"version": 1, "optimizer": {"min_timestep": 500, "max_timestep": 500}})
    kohya = validate_config({"train_data_dir": "x", "loss_type": "huber", "huber_schedule": "exponential",
                             "huber_c": 0.2, "multires_noise_iterations": 6, "multires_noise_discount": 0.4,
                             "ip_noise_gamma": 0.1, "min_timestep": 100, "max_timestep": 900,
                             "debiased_estimation_loss": True, "scale_weight_norms": 1.0})  # fmt: skip
    opt = kohya.optimizer
    assert (opt.loss_type, opt.huber_schedule, opt.huber_c, opt.multires_noise_iterations) == ("huber", "exponential",
                                                                                               0.2, 6)  # fmt: skip
    assert (opt.multires_noise_discount, opt.ip_noise_gamma) == (0.4, 0.1)
    assert (opt.min_timestep, opt.max_timestep) == (100, 900)
    assert opt.debiased_estimation and kohya.lora.scale_weight_norms == 1.0 and not kohya.combination_problems()


def test_random_strengths_scale_each_samples_offset_and_perturbation_between_0_and_the_setting():
    """kohya's noise_offset_random_strength / ip_noise_gamma_random_strength: from the same draws, the offset a
    sample gets is its plain offset times its own strength in [0, 1); samples get different strengths."""
    from lora_studio.step import shaped_noise

    latents, scheduler = torch.zeros((4, 4, 8, 8)), sd_scheduler()

    def shaped(**options):
        return shaped_noise(latents, scheduler, sample_draws(7, 3, 0, [0, 1, 2, 3]), OptimConfig(**options))

    base, _, _ = shaped()
    plain, plain_t, _ = shaped(noise_offset=0.1)
    scaled, _, _ = shaped(noise_offset=0.1, noise_offset_random_strength=True)
    strengths = ((scaled - base) / (plain - base)).flatten(1)  # one strength per sample, the same at every pixel
    assert torch.allclose(strengths, strengths[:, :1].expand_as(strengths), atol=1e-4)
    per_sample = strengths[:, 0]
    assert ((per_sample >= 0) & (per_sample < 1)).all() and per_sample.unique().numel() == 4
    assert torch.equal(shaped(noise_offset=0.1)[1], plain_t)  # a run without it draws as before
    noise, _, perturbed = shaped(ip_noise_gamma=0.2)
    _, _, random_perturbed = shaped(ip_noise_gamma=0.2, ip_noise_gamma_random_strength=True)
    gammas = ((random_perturbed - noise) / (perturbed - noise)).flatten(1)
    assert torch.allclose(gammas, gammas[:, :1].expand_as(gammas), atol=1e-4) and gammas[:, 0].unique().numel() == 4
    assert ((gammas[:, 0] >= 0) & (gammas[:, 0] < 1)).all()
    kohya = validate_config({"train_data_dir": "x", "noise_offset": 0.05, "noise_offset_random_strength": True,
                             "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True})  # fmt: skip
    assert kohya.optimizer.noise_offset_random_strength and kohya.optimizer.ip_noise_gamma_random_strength


def test_kohyas_v_prediction_loss_scales_follow_its_formulas(tiny_folders):
    """scale_v_pred_loss_like_noise_pred multiplies each sample's loss by SNR/(SNR+1); v_pred_like_loss adds
    v x loss x (SNR+1)/SNR; SNR capped at 1000 as kohya's get_snr_scale does. Same draws, same model."""
    from diffusers.training_utils import compute_snr

    from lora_studio.models import load_base
    from lora_studio.step import diffusion_loss

    base = load_base(tiny_folders["sd1"], device="cpu")
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8)
    hidden = torch.randn(4, 77, base.unet.config.cross_attention_dim)
    scheduler = DDPMScheduler.from_config(sd_scheduler().config, prediction_type="v_prediction")

    def losses(**options) -> torch.Tensor:
        with torch.no_grad():
            return diffusion_loss(base.unet, scheduler, latents, hidden, None, sample_draws(7, 3, 0, [0, 1, 2, 3]),
                                  OptimConfig(min_snr_gamma=0, **options))  # fmt: skip

    plain = losses()
    timesteps = torch.cat([torch.randint(0, 1000, (1,), generator=d.gen)
                           for d in [_past_noise(d) for d in sample_draws(7, 3, 0, [0, 1, 2, 3])]])  # fmt: skip
    snr = torch.clamp(compute_snr(scheduler, timesteps), max=1000.0)
    assert torch.allclose(losses(scale_v_pred_loss_like_noise_pred=True), plain * snr / (snr + 1), rtol=1e-5)
    assert torch.allclose(losses(v_pred_like_loss=0.1), plain * (1 + 0.1 * (snr + 1) / snr), rtol=1e-5)
    both = losses(scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.1)
    assert torch.allclose(both, plain * (snr / (snr + 1) + 0.1), rtol=1e-5)  # kohya's order: scale, then add


def _past_noise(draw):
    """The draw with its noise taken, as shaped_noise takes it before the timestep (no offset: nothing more)."""
    torch.randn((4, 8, 8), generator=draw.gen)
    return draw


def test_adaptive_noise_scale_grows_each_channels_offset_with_its_mean():
    from lora_studio.step import shaped_noise

    latents = torch.zeros((2, 4, 8, 8))
    latents[:, 0] += 1.0  # channel 0 bright, channel 1 dark, the rest at 0
    latents[:, 1] -= 0.5
    scheduler = sd_scheduler()

    def shaped(**options):
        return shaped_noise(latents, scheduler, sample_draws(7, 3, 0, [0, 1]), OptimConfig(**options))[0]

    base, plain = shaped(), shaped(noise_offset=0.1)
    adaptive = shaped(noise_offset=0.1, adaptive_noise_scale=0.2)
    ratio = ((adaptive - base) / (plain - base)).mean(dim=(2, 3))  # per sample and channel
    expected = torch.tensor([0.1 + 0.2 * 1.0, 0.1 + 0.2 * 0.5, 0.1, 0.1]) / 0.1
    assert torch.allclose(ratio, expected.expand(2, 4), rtol=1e-4)
    negative = shaped(noise_offset=0.1, adaptive_noise_scale=-0.2)
    assert torch.allclose(negative[:, 0], base[:, 0]) and not torch.allclose(negative[:, 2], base[:, 2])  # 0 floor


def test_v_prediction_options_rules_and_kohyas_keys(tmp_path, tiny_folders):
    with pytest.raises(ConfigError, match="adaptive_noise_scale` grows the noise offset, and noise_offset is 0"):
        validate_config({"version": 1, "optimizer": {"adaptive_noise_scale": 0.05}})
    with pytest.raises(ConfigError, match="zero_terminal_snr makes 0 at the last timestep"):
        validate_config({"version": 1, "optimizer": {"v_pred_like_loss": 0.1, "zero_terminal_snr": True}})
    kohya = validate_config({"train_data_dir": "x", "noise_offset": 0.05, "adaptive_noise_scale": 0.01,
                             "v_pred_like_loss": 0.1, "scale_v_pred_loss_like_noise_pred": True})  # fmt: skip
    opt = kohya.optimizer
    assert (opt.adaptive_noise_scale, opt.v_pred_like_loss, opt.scale_v_pred_loss_like_noise_pred) == (0.01, 0.1, True)
    from lora_studio.lora_metadata import TrainingFacts, training_metadata

    facts = TrainingFacts("sd1", "demo", 64, 1, 1, 1, {}, {}, [], 0.0, 0.0)
    assert training_metadata(kohya, facts)["ss_adaptive_noise_scale"] == "0.01"  # as kohya records it
    with pytest.raises(TrainingError, match="predicts epsilon; turn it off"):
        prepare(tiny_config(tmp_path, tiny_folders, make_images(tmp_path / "images", 2),
                            optimizer={"scale_v_pred_loss_like_noise_pred": True}))  # fmt: skip


def test_caption_dropout_every_n_epochs_empties_every_caption_of_kohyas_epochs(tmp_path, tiny_folders):
    """kohya counts epochs from 1: with N = 2, the second, fourth, ... epochs (from 0 here: 1, 3, ...) train on
    empty captions; the others are as before. Captions that change by epoch cannot be cached as embeddings."""
    from lora_studio.step import batch_latents

    images = make_images(tmp_path / "images", 2)
    session = prepare(tiny_config(tmp_path, tiny_folders, images,
                                  dataset={"caption_dropout_every_n_epochs": 2}))  # fmt: skip

    def captions(epoch: int) -> list[str]:
        return batch_latents(session.base.vae, session.latent_cache, session.config.dataset, session.items,
                             session.buckets, [0, 1], sample_draws(7, 3, 0, [0, 1]), torch.device("cpu"),
                             epoch)[1]  # fmt: skip

    assert all(captions(0)) and captions(2) == captions(0)
    assert captions(1) == ["", ""] and captions(3) == ["", ""]
    with pytest.raises(ConfigError, match="captions change every step"):
        validate_config({"version": 1, "dataset": {"caption_dropout_every_n_epochs": 2, "cache_text_embeddings": True},
                         "lora": {"train_text_encoder": False}})  # fmt: skip
    kohya = validate_config({"train_data_dir": "x", "caption_dropout_every_n_epochs": 3})
    assert kohya.dataset.caption_dropout_every_n_epochs == 3
    from lora_studio.lora_metadata import TrainingFacts, training_metadata

    facts = TrainingFacts("sd1", "demo", 64, 1, 1, 1, {}, {}, [], 0.0, 0.0)
    assert training_metadata(kohya, facts)["ss_caption_dropout_every_n_epochs"] == "3"
