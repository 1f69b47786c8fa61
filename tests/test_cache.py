"""Latent and text caches: hits on a second run, exact invalidation, equality with fresh encodes, atomic entries."""

import pytest
import torch
from PIL import Image
from tiny_models import text_config, tiny_vae
from transformers import CLIPTextModel

from lora_studio.buckets import assign_buckets
from lora_studio.cache import LatentCache, TextCache, plan_latent_entries
from lora_studio.config import DatasetConfig, TrainConfig
from lora_studio.data import scan


def make_images(folder, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = (96, 64) if i % 2 else (64, 96)
        image = Image.new("RGB", size, (40 * i, 255 - 40 * i, 90))
        image.paste((250, 250, 250), (0, 0, 20, 20))  # a corner mark, so mirrored copies differ
        image.save(folder / f"img{i}.png")


def prepare(folder, **settings):
    config = DatasetConfig(path=str(folder), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, **settings)
    report = scan(config)
    buckets = assign_buckets([(i.width, i.height) for i in report.items], config, 64)
    return report.items, plan_latent_entries(report.items, buckets, config)


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return tiny_vae().eval()


def test_second_run_hits_and_cached_latents_equal_fresh_encodes(tmp_path, vae):
    make_images(tmp_path / "data")
    items, entries = prepare(tmp_path / "data")
    cache = LatentCache(tmp_path / "cache", vae)
    seen = []
    assert cache.fill(items, entries, batch_size=2, progress=lambda d, t: seen.append((d, t))) == {
        "hits": 0,
        "built": 5,
    }
    assert seen[-1] == (5, 5) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    again = LatentCache(tmp_path / "cache", vae)
    assert again.fill(items, entries) == {"hits": 5, "built": 0}
    for item, entry in zip(items, entries, strict=True):
        cached = again.get(item, entry)
        mean, std = again.encode(again.pixels(item, entry)[None])
        assert cached["mean"].shape == (4, entry.bucket.height // 2, entry.bucket.width // 2)
        # Batched and single encodes differ only by float32 summation order (~5e-6).
        torch.testing.assert_close(cached["mean"], mean[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cached["std"], std[0], rtol=1e-4, atol=1e-4)


def test_changing_one_image_rebuilds_only_its_entry(tmp_path, vae):
    make_images(tmp_path / "data")
    items, entries = prepare(tmp_path / "data")
    cache = LatentCache(tmp_path / "cache", vae)
    cache.fill(items, entries)
    Image.new("RGB", (64, 96), (1, 2, 3)).save(tmp_path / "data" / "img2.png")
    items2, entries2 = prepare(tmp_path / "data")
    assert cache.fill(items2, entries2) == {"hits": 4, "built": 1}


def test_changed_settings_or_vae_miss(tmp_path, vae):
    make_images(tmp_path / "data")
    items, entries = prepare(tmp_path / "data")
    LatentCache(tmp_path / "cache", vae).fill(items, entries)
    assert LatentCache(tmp_path / "cache", vae, background="#000000").fill(items, entries)["built"] == 5
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    assert LatentCache(tmp_path / "cache", vae).fill(items, entries)["built"] == 5


def test_flip_aug_caches_mirrored_copies(tmp_path, vae):
    make_images(tmp_path / "data", n=2)
    items, entries = prepare(tmp_path / "data", flip_aug=True)
    assert len(entries) == 4 and {e.flip for e in entries} == {False, True}
    cache = LatentCache(tmp_path / "cache", vae)
    cache.fill(items, entries)
    plain, mirrored = (cache.get(items[0], e)["mean"] for e in entries[:2])
    assert not torch.equal(plain, mirrored)


def test_a_full_disk_mid_fill_leaves_no_entry(tmp_path, vae, small_disk):
    from lora_studio.fsutil import WriteError

    make_images(tmp_path / "data", n=2)
    items, entries = prepare(tmp_path / "data")
    cache = LatentCache(small_disk.folder / "cache", vae)
    small_disk.fill()
    with pytest.raises(WriteError, match="No space left on device"):
        cache.fill(items, entries)
    small_disk.free()
    assert [p for p in (small_disk.folder / "cache").rglob("*") if p.is_file()] == []
    assert cache.fill(items, entries) == {"hits": 0, "built": 2}


def test_unreadable_entry_is_rebuilt(tmp_path, vae):
    make_images(tmp_path / "data", n=1)
    items, entries = prepare(tmp_path / "data")
    cache = LatentCache(tmp_path / "cache", vae)
    cache.fill(items, entries)
    entry_file = next((tmp_path / "cache").rglob("*.safetensors"))
    entry_file.write_bytes(b"garbage")
    assert cache.get(items[0], entries[0]) is None


def test_text_cache_refusals():
    assert "text encoder is being trained" in TrainConfig().text_cache_refusal()
    frozen = {"train_text_encoder": False}
    assert "shuffle_caption" in TrainConfig(lora=frozen, dataset={"shuffle_caption": True}).text_cache_refusal()
    assert TrainConfig(lora=frozen).text_cache_refusal() is None


def test_latents_kept_in_memory_only_write_nothing(tmp_path, vae):
    """cache_latents_to_disk = false: the run encodes once and keeps the latents in memory; no file is written."""
    make_images(tmp_path / "data", n=2)
    items, entries = prepare(tmp_path / "data")
    cache = LatentCache(None, vae)
    assert cache.fill(items, entries) == {"hits": 0, "built": 2}
    assert cache.fill(items, entries) == {"hits": 2, "built": 0}
    on_disk = LatentCache(tmp_path / "disk", vae)
    on_disk.fill(items, entries)
    for entry in entries:
        item = items[entry.item_index]
        assert torch.equal(cache.get(item, entry)["mean"], on_disk.get(item, entry)["mean"])
    written = set(tmp_path.rglob("*.safetensors"))
    assert written and written == set((tmp_path / "disk").rglob("*.safetensors"))  # the memory cache wrote none


def test_text_cache_hits_and_clip_skip_invalidates(tmp_path):
    torch.manual_seed(0)
    encoder = CLIPTextModel(text_config(32, "quick_gelu")).eval()

    def encode(captions):
        ids = torch.tensor([[49406, 320 + len(c), 49407] + [49407] * 4 for c in captions])
        return {"hidden": encoder(ids).last_hidden_state}

    captions = ["a red star", "a blue circle", "a red star"]
    cache = TextCache(tmp_path, [encoder], clip_skip=1)
    assert cache.fill(captions, encode) == {"hits": 0, "built": 2}
    assert cache.fill(captions, encode) == {"hits": 2, "built": 0}
    torch.testing.assert_close(cache.get("a blue circle")["hidden"], encode(["a blue circle"])["hidden"][0])
    assert TextCache(tmp_path, [encoder], clip_skip=2).fill(captions, encode)["built"] == 2


def overflowing_vae() -> torch.nn.Module:
    """A tiny VAE whose first convolution's outputs exceed fp16's range (65504), as the SDXL VAE's do."""
    torch.manual_seed(0)
    vae = tiny_vae()
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
    return vae.eval()


def test_an_fp16_vae_encodes_in_fp32_and_stays_fp16():
    """Issue 17: on fp16 cards the VAE encodes upcast (diffusers' force_upcast), so latents are finite."""
    from lora_studio.cache import encode_pixels, must_upcast

    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = overflowing_vae()
    expected_mean, _ = encode_pixels(reference, pixels)
    assert torch.isfinite(expected_mean).all()

    half = overflowing_vae().half()
    with torch.no_grad():
        raw = half.encode(pixels.half()).latent_dist.mean
    assert not torch.isfinite(raw).all()  # what encoding in fp16 gives: the bug this guards against
    assert must_upcast(half)
    mean, std = encode_pixels(half, pixels)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    assert torch.allclose(mean, expected_mean, rtol=1e-2, atol=1e-2)  # fp16 weights, fp32 maths
    assert all(p.dtype == torch.float16 for p in half.parameters())  # handed back as it came

    fixed = overflowing_vae().half()
    fixed.register_to_config(force_upcast=False)  # a fixed fp16 VAE the user provides: encoded in fp16
    assert not must_upcast(fixed)
