"""Bucket geometry, assignment, single-bucket batches, deterministic and resumable order."""

import itertools
import math
import random

import pytest
from PIL import Image

from lora_studio.buckets import (
    Bucket,
    Position,
    assign_buckets,
    batches_per_epoch,
    count_total_steps,
    epoch_batches,
    iterate_batches,
    make_buckets,
    nearest_bucket,
    no_upscale_bucket,
    plan_crop,
    resize_and_crop,
)
from lora_studio.config import DatasetConfig, OptimConfig
from lora_studio.errors import ConfigError


@pytest.mark.parametrize(
    "resolution, low, high, step", [(512, 256, 1024, 64), (1024, 512, 2048, 64), (768, 256, 1536, 32)]
)
def test_buckets_respect_area_multiple_and_side_limits(resolution, low, high, step):
    buckets = make_buckets(resolution, low, high, step)
    assert Bucket(resolution, resolution) in buckets
    for b in buckets:
        assert b.width * b.height <= resolution * resolution
        assert b.width % step == 0 and b.height % step == 0
        assert low <= b.width <= high and low <= b.height <= high
        assert Bucket(b.height, b.width) in buckets, "both orientations exist"


def test_impossible_bucket_settings_say_what_to_change():
    with pytest.raises(ConfigError, match="lower min_bucket_reso"):
        make_buckets(256, 512, 1024, 64)


def test_assignment_is_as_good_as_the_best_available_bucket():
    buckets = make_buckets(512, 256, 1024, 64)
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(100, 4000), rng.randint(100, 4000)
        chosen = nearest_bucket(w, h, buckets)
        error = abs(math.log(chosen.aspect) - math.log(w / h))
        best = min(abs(math.log(b.aspect) - math.log(w / h)) for b in buckets)
        assert error <= best + 1e-12


def test_no_upscale_buckets_never_exceed_the_image():
    for w, h in [(300, 200), (1000, 3000), (64, 64), (5000, 5000)]:
        b = no_upscale_bucket(w, h, 512, 64)
        assert b.width <= max(w, 64) and b.height <= max(h, 64)
        assert b.width * b.height <= 512 * 512 and b.width % 64 == 0 and b.height % 64 == 0


def test_disabled_bucketing_uses_one_square():
    config = DatasetConfig(enable_bucket=False)
    assert set(assign_buckets([(300, 900), (900, 300)], config, 512)) == {Bucket(512, 512)}


def sizes(n, seed=0):
    rng = random.Random(seed)
    return [(rng.choice([512, 768, 1024]), rng.choice([512, 768, 1024])) for _ in range(n)]


@pytest.fixture
def layout():
    config = DatasetConfig(min_bucket_reso=256, max_bucket_reso=1024)
    buckets = assign_buckets(sizes(40), config, 512)
    repeats = [1 + i % 3 for i in range(40)]
    return buckets, repeats


def test_batches_never_mix_buckets_and_cover_every_repeat(layout):
    buckets, repeats = layout
    batches = epoch_batches(buckets, repeats, 4, seed=1, epoch=0)
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert sorted(itertools.chain(*batches)) == sorted(i for i, r in enumerate(repeats) for _ in range(r))
    assert len(batches) == batches_per_epoch(buckets, repeats, 4)


def test_same_seed_same_order_other_seed_or_epoch_differs(layout):
    buckets, repeats = layout
    first = epoch_batches(buckets, repeats, 4, seed=1, epoch=0)
    assert first == epoch_batches(buckets, repeats, 4, seed=1, epoch=0)
    assert first != epoch_batches(buckets, repeats, 4, seed=2, epoch=0)
    assert first != epoch_batches(buckets, repeats, 4, seed=1, epoch=1)


def test_resume_from_position_k_yields_the_same_remaining_order(layout):
    buckets, repeats = layout
    uninterrupted = list(itertools.islice(iterate_batches(buckets, repeats, 4, seed=3), 60))
    k = 37
    stopped_at = uninterrupted[k][0]
    resumed = list(itertools.islice(iterate_batches(buckets, repeats, 4, seed=3, start=stopped_at), 60 - k))
    assert resumed == uninterrupted[k:]
    assert stopped_at.epoch >= 1, "the stop point lies past an epoch boundary, the harder case"
    assert Position(0, 0) == uninterrupted[0][0]


def test_center_and_random_crops_fit_the_bucket():
    image = Image.new("RGB", (1000, 500), (10, 20, 30))
    bucket = Bucket(512, 384)
    resized, crop = plan_crop(1000, 500, bucket, random_crop=False, rng=random.Random(0))
    assert resized[0] >= 512 and resized[1] >= 384
    assert crop.original_size == (500, 1000) and crop.target_size == (384, 512)
    assert crop.crop_top_left == (0, (resized[0] - 512) // 2)
    assert resize_and_crop(image, bucket, crop, resized).size == (512, 384)
    offsets = {plan_crop(1000, 500, bucket, True, random.Random(s))[1].crop_top_left for s in range(10)}
    assert len(offsets) > 1 and all(0 <= left <= resized[0] - 512 for _, left in offsets)


@pytest.mark.parametrize(
    "accumulation, processes, expected",
    [(1, 1, 60), (2, 1, 30), (4, 1, 15), (1, 2, 30), (2, 2, 15), (1, 4, 15), (7, 1, 9)],
)
def test_epochs_count_updates_of_every_process_and_micro_batch(accumulation, processes, expected):
    """6 batches an epoch, 10 epochs: an update takes accumulation x processes batches of the one order."""
    optim = OptimConfig(max_train_steps=None, max_train_epochs=10, gradient_accumulation_steps=accumulation)
    assert count_total_steps(optim, 6, processes) == expected
    assert count_total_steps(optim.model_copy(update={"max_train_steps": 7}), 6, processes) == 7
