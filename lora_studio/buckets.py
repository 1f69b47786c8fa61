"""Aspect-ratio buckets: their sizes, which bucket each image goes to, and the batch order.

Every batch comes from one bucket, so images keep their aspect ratio without padding. The order is
a pure function of (seed, epoch): a run resumed at batch k of epoch e sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from .config import DatasetConfig, OptimConfig
from .errors import ConfigError


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[Bucket]:
    """Every (w, h) with sides multiples of `step` in [min_side, max_side] and w*h <= resolution^2,
    keeping for each width only the tallest height (the largest area at that aspect), as kohya does."""
    max_area = resolution * resolution
    low = math.ceil(min_side / step) * step
    buckets = set()
    for width in range(low, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= low:
            buckets.update((Bucket(width, height), Bucket(height, width)))
    if not buckets:
        raise ConfigError(
            "dataset",
            [
                f"no bucket fits resolution {resolution} with sides {min_side}-{max_side} in steps of {step}; "
                "lower min_bucket_reso or bucket_reso_steps, or raise the resolution"
            ],
        )
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.width * b.height))


def no_upscale_bucket(width: int, height: int, resolution: int, step: int) -> Bucket:
    """For bucket_no_upscale: the image's own size, scaled down to the area limit, sides floored to `step`."""
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    return Bucket(max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))


def assign_buckets(sizes: Sequence[tuple[int, int]], config: DatasetConfig, resolution: int) -> list[Bucket]:
    """The bucket of each image (width, height) under the dataset settings."""
    if not config.enable_bucket:
        square = Bucket(resolution, resolution)
        return [square] * len(sizes)
    if config.bucket_no_upscale:
        return [no_upscale_bucket(w, h, resolution, config.bucket_reso_steps) for w, h in sizes]
    buckets = make_buckets(resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps)
    return [nearest_bucket(w, h, buckets) for w, h in sizes]


# --- resizing to a bucket ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Crop:
    """Where an image came from inside its resized version: SDXL's micro-conditioning values."""

    original_size: tuple[int, int]  # (height, width) of the source image, as SDXL's add_time_ids order them
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket


def plan_crop(
    width: int, height: int, bucket: Bucket, random_crop: bool, rng: random.Random
) -> tuple[tuple[int, int], Crop]:
    """The resize that covers the bucket and the crop offset within it."""
    scale = max(bucket.width / width, bucket.height / height)
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    spare_x, spare_y = resized[0] - bucket.width, resized[1] - bucket.height
    if random_crop:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return resized, Crop((height, width), (top, left), (bucket.height, bucket.width))


def resize_and_crop(image: Image.Image, bucket: Bucket, crop: Crop, resized: tuple[int, int]) -> Image.Image:
    top, left = crop.crop_top_left
    image = image.resize(resized, Image.Resampling.LANCZOS) if image.size != resized else image
    return image.crop((left, top, left + bucket.width, top + bucket.height))


# --- batch order -------------------------------------------------------------------------------------


def epoch_batches(
    buckets: Sequence[Bucket], repeats: Sequence[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """The batches (lists of item indices, repeats expanded) of one epoch, each from a single bucket."""
    rng = random.Random(f"lora-studio-batches-{seed}-{epoch}")  # str seeds are stable across processes
    members: dict[Bucket, list[int]] = defaultdict(list)
    for index, (bucket, count) in enumerate(zip(buckets, repeats, strict=True)):
        members[bucket].extend([index] * count)
    batches = []
    for bucket in sorted(members):
        indices = members[bucket]
        rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class Position:
    """Where training is in the data: epoch and batch within it. Saved with resumable state."""

    epoch: int = 0
    batch: int = 0


def iterate_batches(
    buckets: Sequence[Bucket], repeats: Sequence[int], batch_size: int, seed: int, start: Position = Position()
) -> Iterator[tuple[Position, list[int]]]:
    """Batches forever from `start` on; each comes with its position (resume from the next one)."""
    epoch, first = start.epoch, start.batch
    while True:
        batches = epoch_batches(buckets, repeats, batch_size, seed, epoch)
        for index in range(first, len(batches)):
            yield Position(epoch, index), batches[index]
        epoch, first = epoch + 1, 0


def batches_per_epoch(buckets: Sequence[Bucket], repeats: Sequence[int], batch_size: int) -> int:
    counts: dict[Bucket, int] = defaultdict(int)
    for bucket, count in zip(buckets, repeats, strict=True):
        counts[bucket] += count
    return sum(math.ceil(n / batch_size) for n in counts.values())


def updates_per_epoch(batches: int, accumulation: int) -> int | float:
    """Optimizer steps an epoch takes: whole when accumulation divides the batches, else to 2 decimals."""
    return batches // accumulation if batches % accumulation == 0 else round(batches / accumulation, 2)


def count_total_steps(optim: OptimConfig, per_epoch_batches: int, processes: int = 1) -> int:
    """Optimizer steps in the run: max_train_steps when set, else the steps that cover the epochs.

    Each optimizer step consumes `processes` x gradient_accumulation_steps batches of one continuous
    order that runs across epoch boundaries (iterate_batches), so the count is over all the epochs'
    batches, not rounded up per epoch (which would add up to one step an epoch)."""
    if optim.max_train_steps:
        return optim.max_train_steps
    batches = per_epoch_batches * (optim.max_train_epochs or 1)
    return math.ceil(batches / (optim.gradient_accumulation_steps * processes))


def epochs_due(every_n_epochs: int, epoch_before: int, epoch_after: int) -> bool:
    """Whether epochs epoch_before+1 .. epoch_after (the ones a step just completed, counted from 1) hold a multiple
    of `every_n_epochs` (0: never): when checkpoints, samples and validation by epochs are due."""
    finished = range(epoch_before + 1, epoch_after + 1)
    return bool(every_n_epochs) and any(epoch % every_n_epochs == 0 for epoch in finished)
