"""Masked loss: masks found beside images or in the alpha channel, transformed like their image, cached with the
latents, weighting the loss (a masked pixel adds nothing and gets no gradient), painted in the Dataset tab."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import straight_and_resumed, tiny_config

from lora_studio.buckets import Bucket
from lora_studio.cache import LatentCache, LatentEntry
from lora_studio.config import DatasetConfig, validate_config
from lora_studio.data import bucket_mask, mask_file, scan
from lora_studio.dataset_edit import DatasetEditError, clear_mask, mask_overlay, painted_mask, save_painted_mask
from lora_studio.errors import ConfigError
from lora_studio.models import load_base
from lora_studio.step import loss_weights, masked_mse
from lora_studio.train import prepare


def masked_images(folder, count=4, half=True):
    """Images with a white left half (learned) and a black right half (ignored) in their masks."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (48, 32), (40 * i, 100, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a thing number {i}")
        mask = Image.new("L", (48, 32), 255)
        if half:
            mask.paste(0, (24, 0, 48, 32))
        else:
            mask.paste(0, (0, 0, 48, 32))
        mask.save(mask_file(folder / f"{i}.png"))
    return folder


def test_masks_are_found_checked_and_never_taken_for_images(tmp_path):
    folder = masked_images(tmp_path / "d", count=2)
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "alpha.png")
    Image.new("RGB", (32, 32)).save(folder / "plain.png")
    Image.new("L", (10, 10)).save(folder / "wrong.mask.png")
    Image.new("RGB", (32, 32)).save(folder / "wrong.png")
    report = scan(DatasetConfig(path=str(folder), masked_loss=True, alpha_mask=True, min_bucket_reso=32))
    names = {i.path.name: i.mask_hash for i in report.items}
    assert set(names) == {"0.png", "1.png", "alpha.png", "plain.png"}  # no .mask.png is an image; wrong.png refused
    assert len(names["0.png"]) == 64 and names["alpha.png"] == "alpha" and names["plain.png"] == ""
    assert any("the mask is 10x10 but wrong.png is 32x32" in p.message for p in report.errors)
    assert any("no plain.mask.png; the whole image is learned" in p.message for p in report.warnings)
    off = scan(DatasetConfig(path=str(folder), min_bucket_reso=32))
    assert all(i.mask_hash == "" for i in off.items) and not off.errors  # masks are read only with masked loss on


def test_a_mask_follows_its_images_crop_and_flip_down_to_latent_size(tmp_path):
    folder = masked_images(tmp_path / "d", count=1)
    (item,) = scan(DatasetConfig(path=str(folder), masked_loss=True, min_bucket_reso=32)).items
    bucket = Bucket(32, 32)
    from lora_studio.buckets import plan_crop

    resized, crop = plan_crop(48, 32, bucket, False, None)  # 48x32 -> centre 32x32: columns 8..40 of the image
    plain = bucket_mask(item, bucket, resized, crop, False, (4, 4))[0]
    flipped = bucket_mask(item, bucket, resized, crop, True, (4, 4))[0]
    assert plain.shape == (4, 4) and torch.equal(flipped, plain.flip(-1))
    assert torch.allclose(plain[:, :2], torch.ones(4, 2)) and torch.allclose(plain[:, 2:], torch.zeros(4, 2))
    weights = loss_weights([plain[None], None], 0.25, torch.Size((2, 4, 4, 4)))
    assert weights.shape == (2, 1, 4, 4) and torch.allclose(weights[0, 0, :, 2:], torch.full((4, 2), 0.25))
    assert torch.equal(weights[1], torch.ones(1, 4, 4))  # an image without a mask is learned whole


def test_a_masked_pixel_adds_nothing_and_gets_no_gradient():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    weights = torch.ones(2, 1, 8, 8)
    weights[:, :, :, 4:] = 0.0
    masked_mse(pred, target, weights).sum().backward()
    assert torch.all(pred.grad[..., 4:] == 0) and torch.all(pred.grad[..., :4] != 0)
    changed = target.clone()
    changed[..., 4:] += 100.0  # anything at all in the ignored half
    assert torch.equal(masked_mse(pred, target, weights), masked_mse(pred, changed, weights))
    assert torch.allclose(masked_mse(pred, target), ((pred - target) ** 2).mean(dim=(1, 2, 3)))


def test_the_mask_is_cached_with_the_latent_and_a_new_mask_is_a_new_entry(tmp_path):
    folder = masked_images(tmp_path / "d", count=1)
    config = DatasetConfig(path=str(folder), masked_loss=True, min_bucket_reso=32)
    (item,) = scan(config).items
    vae = load_base("demo", dtype=torch.float32, device="cpu").vae
    cache = LatentCache(tmp_path / "cache", vae)
    from lora_studio.buckets import plan_crop

    resized, crop = plan_crop(48, 32, Bucket(32, 32), False, None)
    entry = LatentEntry(0, Bucket(32, 32), resized, crop, False)
    assert cache.fill([item], [entry]) == {"hits": 0, "built": 1}
    stored = cache.get(item, entry)
    assert set(stored) == {"mean", "std", "mask"} and stored["mask"].shape == (1, *stored["mean"].shape[-2:])
    Image.new("L", (48, 32), 255).save(mask_file(item.path))  # the mask changed: the cache must not serve the old one
    (changed,) = scan(config).items
    assert changed.mask_hash != item.mask_hash and cache.key(changed, entry) != cache.key(item, entry)
    assert cache.fill([changed], [entry]) == {"hits": 0, "built": 1}
    assert torch.equal(cache.get(changed, entry)["mask"], torch.ones_like(stored["mask"]))


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "per-step"])
def test_an_all_ignored_dataset_trains_nothing(tmp_path, tiny_folders, cached):
    folder = masked_images(tmp_path / "d", half=False)
    config = tiny_config(tmp_path, tiny_folders, folder, dataset={"masked_loss": True, "cache_latents": cached},
                         optimizer={"weight_decay": 0.0, "max_train_steps": 3})  # fmt: skip
    session = prepare(config)
    from lora_studio.step import training_step

    before = {k: v.clone() for k, v in session.models["unet"].state_dict().items() if "lora" in k}
    assert training_step(session, [0, 1]).tolist() == [0.0, 0.0]
    after = session.models["unet"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # zero weight: zero gradient, no update


def test_every_feature_on_resumes_bit_exactly(tmp_path, tiny_folders):
    """Masked loss with unmasked weight, validation on held-out images, the EMA, flips, generated regularization
    images at half weight, kohya's max-norm cap, LoRA+, and kohya's loss and noise options (pseudo-Huber,
    multi-resolution noise, input perturbation, a timestep range, debiased estimation): stop at 5, resume to 8."""
    from lora_studio.safetensors_io import read_header

    folder = masked_images(tmp_path / "d", count=6)
    settings = {
        "dataset": {"masked_loss": True, "unmasked_weight": 0.1, "flip_aug": True},
        "validation": {"fraction": 0.34, "every_n_steps": 3},
        "lora": {"ema_decay": 0.9, "scale_weight_norms": 0.05, "loraplus_lr_ratio": 4},
        "regularization": {"generate": True, "steps": 2, "prior_loss_weight": 0.5},
        "optimizer": {"loss_type": "huber", "multires_noise_iterations": 4, "ip_noise_gamma": 0.1,
                      "min_timestep": 100, "max_timestep": 900, "debiased_estimation": True,
                      "v_pred_like_loss": 0.1},  # fmt: skip
    }
    straight, _resumed, a, b = straight_and_resumed(tmp_path, tiny_folders, folder, **settings)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    metadata = read_header(straight.lora_path).metadata  # as kohya records them
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"], metadata["ss_huber_c"]) == ("huber", "snr", "0.1")
    assert (metadata["ss_multires_noise_iterations"], metadata["ss_debiased_estimation"]) == ("4", "True")
    assert metadata["ss_scale_weight_norms"] == "0.05" and metadata["ss_adaptive_noise_scale"] == "None"
    assert json.loads(metadata["ss_network_args"])["loraplus_lr_ratio"] == "4"


def test_masked_settings_without_masked_loss_are_refused():
    with pytest.raises(ConfigError, match="act only with masked loss"):
        validate_config({"version": 1, "dataset": {"alpha_mask": True}})
    migrated = validate_config({"alpha_mask": True, "train_data_dir": "x"})  # kohya's key turns masked loss on
    assert migrated.dataset.masked_loss and migrated.dataset.alpha_mask


def test_painting_a_mask_saves_it_beside_its_image_and_shows_it(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (16, 8), (0, 0, 255)).save(folder / "a.png")
    assert mask_overlay(folder, "a.png").getpixel((12, 4)) == (0, 0, 255)  # no mask: shown as it is
    stroke = np.zeros((8, 16, 4), dtype=np.uint8)
    stroke[:, 8:, 3] = 255  # painted over the right half
    path = save_painted_mask(folder, "a.png", [stroke])
    assert path == folder / "a.mask.png"
    mask = np.asarray(Image.open(path))
    assert (mask[:, :8] == 255).all() and (mask[:, 8:] == 0).all()
    shown = mask_overlay(folder, "a.png")
    assert shown.getpixel((2, 4)) == (0, 0, 255) and shown.getpixel((12, 4))[0] > 100  # the ignored half in red
    second = np.zeros((8, 16, 4), dtype=np.uint8)
    second[:4, :4, 3] = 255
    save_painted_mask(folder, "a.png", [second])  # painting again adds to the mask
    mask = np.asarray(Image.open(path))
    assert (mask[:4, :4] == 0).all() and (mask[4:, :8] == 255).all() and (mask[:, 8:] == 0).all()
    assert not list(folder.glob("*.tmp*")) and not list(folder.glob(".*"))  # written through a temp file and renamed
    with pytest.raises(DatasetEditError, match="not the image's 16x8"):
        painted_mask((16, 8), [np.zeros((4, 4, 4), dtype=np.uint8)], None)
    with pytest.raises(DatasetEditError, match="outside the dataset folder|not an image"):
        save_painted_mask(folder, "../../etc/passwd", [stroke])
    assert clear_mask(folder, "a.png") and not path.exists() and not clear_mask(folder, "a.png")
