"""On-disk caches of VAE latents and text-encoder outputs.

Each entry is one safetensors file named by a hash of everything that determines its content:
- a latent entry: the image bytes, the bucket, the crop, the flip, the alpha background and the
  VAE's identity (config and weights);
- a text entry: the caption, the clip skip and the text encoders' identity.
So a changed image or setting misses exactly the affected entries, and an unchanged dataset hits
across runs. Entries are written to a temp file and renamed: a crash never leaves half an entry.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .buckets import Bucket, Crop, plan_crop
from .config import DatasetConfig, TrainConfig
from .data import Item, bucket_mask, bucket_pixels
from .paths import in_home
from .runs import output_root
from .safetensors_io import save_tensors

Progress = Callable[[int, int], None]


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's config and every weight: its identity as a cache key ingredient."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def must_upcast(vae: torch.nn.Module) -> bool:
    """An fp16 VAE that overflows in fp16: the SDXL VAE gives NaN latents there (a frequent report in other
    trainers' trackers). diffusers marks such VAEs `force_upcast` (the default); a fixed fp16 VAE, such as
    madebyollin's sdxl-vae-fp16-fix, sets it false and encodes in fp16."""
    return next(vae.parameters()).dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", True))


@contextmanager
def encoding_precision(vae: torch.nn.Module):
    """The VAE in fp32 (and autocast off) while it encodes, when it must be upcast; back to fp16 after. The
    fp16 -> fp32 -> fp16 round trip is exact, so the weights are unchanged. As diffusers' SDXL pipeline
    does for decoding."""
    if not must_upcast(vae):
        yield
        return
    vae.to(torch.float32)
    try:
        with torch.autocast(next(vae.parameters()).device.type, enabled=False):
            yield
    finally:
        vae.to(torch.float16)


@torch.no_grad()
def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution (mean, std; unscaled, fp32 on the CPU) of a batch of [-1, 1] pixels: the one
    VAE encode of training steps and of the latent cache."""
    with encoding_precision(vae):
        param = next(vae.parameters())
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()


def _entry_path(folder: Path, key: str) -> Path:
    return folder / key[:2] / f"{key}.safetensors"


def _read_entry(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError):
        return None  # missing or unreadable: rebuild it


def _read_remembered(memory: dict, folder: Path | None, key: str) -> dict[str, torch.Tensor] | None:
    """An entry from memory, else from disk (then kept in memory); None when it is not cached."""
    if key not in memory and folder is not None:
        found = _read_entry(_entry_path(folder, key))
        if found is None:
            return None
        memory[key] = found
    return memory.get(key)


def _write_entry(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


# --- latents ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentEntry:
    """One cached latent: an item as it is cropped and flipped into its bucket."""

    item_index: int
    bucket: Bucket
    resized: tuple[int, int]
    crop: Crop
    flip: bool


def plan_latent_entries(items: Sequence[Item], buckets: Sequence[Bucket], config: DatasetConfig) -> list[LatentEntry]:
    """Center crops (random crops change per step and cannot be cached), plus mirrored copies of the images whose
    folder has flip_aug."""
    entries = []
    for index, (item, bucket) in enumerate(zip(items, buckets, strict=True)):
        resized, crop = plan_crop(item.width, item.height, bucket, random_crop=False, rng=random.Random(0))
        for flip in (False, True) if config.for_subset(item.subset).flip_aug else (False,):
            entries.append(LatentEntry(index, bucket, resized, crop, flip))
    return entries


class LatentCache:
    """VAE latents per (image, bucket, crop, flip, VAE). With `folder` None (`cache_latents_to_disk = false`)
    they live in memory only, for this run: nothing is written, and the next run encodes again."""

    def __init__(self, folder: Path | None, vae: torch.nn.Module, background: str = "#ffffff"):
        self.folder = Path(folder) / "latents" if folder is not None else None
        self.vae = vae
        self.background = background
        self.vae_id = module_fingerprint(vae)
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def key(self, item: Item, entry: LatentEntry) -> str:
        parts = [item.content_hash, entry.bucket, entry.resized, entry.crop, entry.flip, self.background, self.vae_id]
        if item.mask_hash:  # the mask is stored with the latent: another mask is another entry
            parts.append(("mask", item.mask_hash))
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def get(self, item: Item, entry: LatentEntry) -> dict[str, torch.Tensor] | None:
        """{'mean', 'std'} of the latent distribution (unscaled), plus 'mask' (1, h, w) for an item with a mask; None
        when not cached.

        Entries read once stay in memory: training reads every entry every epoch, and a file open per
        sample per step costs more than the tiny demo UNet's whole step."""
        return _read_remembered(self.memory, self.folder, self.key(item, entry))

    def pixels(self, item: Item, entry: LatentEntry) -> torch.Tensor:
        """The VAE input for an entry: [-1, 1], CHW."""
        return bucket_pixels(item, entry.bucket, entry.resized, entry.crop, entry.flip, self.background)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_pixels(self.vae, pixels)

    def fill(
        self,
        items: Sequence[Item],
        entries: Sequence[LatentEntry],
        batch_size: int = 8,
        progress: Progress | None = None,
    ) -> dict[str, int]:
        """Encode every entry not yet cached, in VAE batches of one bucket each. Returns hit/built counts."""
        missing: dict[Bucket, list[LatentEntry]] = defaultdict(list)
        for entry in entries:
            if not self._has(self.key(items[entry.item_index], entry)):
                missing[entry.bucket].append(entry)
        total = sum(len(v) for v in missing.values())
        done = 0
        for bucket in sorted(missing):
            group = missing[bucket]
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                pixels = torch.stack([self.pixels(items[e.item_index], e) for e in chunk])
                means, stds = self.encode(pixels)
                for entry, mean, std in zip(chunk, means, stds, strict=True):
                    item = items[entry.item_index]
                    mask = bucket_mask(item, entry.bucket, entry.resized, entry.crop, entry.flip, mean.shape[-2:])
                    tensors = {"mean": mean, "std": std, **({"mask": mask} if mask is not None else {})}
                    self._store(self.key(item, entry), tensors)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return {"hits": len(entries) - total, "built": total}

    def _has(self, key: str) -> bool:
        return key in self.memory if self.folder is None else _entry_path(self.folder, key).is_file()

    def _store(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            self.memory[key] = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        else:
            _write_entry(_entry_path(self.folder, key), tensors)


# --- text embeddings ------------------------------------------------------------------------------------


class TextCache:
    """Text-encoder outputs per caption. `encode(captions) -> {name: tensor [batch, ...]}` does the work,
    so the training code decides what to keep (hidden states after clip skip, SDXL's pooled output)."""

    def __init__(self, folder: Path, text_encoders: Sequence[torch.nn.Module], clip_skip: int, max_tokens: int = 75,
                 emphasis: bool = False):  # fmt: skip
        self.folder = Path(folder) / "text"
        identity = "|".join(module_fingerprint(m) for m in text_encoders)
        self.identity = f"{identity}|clip_skip={clip_skip}"
        # Readings added later join the key only when on, so the caches made before them keep their keys.
        if max_tokens != 75:
            self.identity += f"|max_tokens={max_tokens}"
        if emphasis:
            self.identity += "|emphasis"
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.identity}|{caption}".encode()).hexdigest()

    def get(self, caption: str) -> dict[str, torch.Tensor] | None:
        return _read_remembered(self.memory, self.folder, self.key(caption))

    def fill(
        self,
        captions: Sequence[str],
        encode: Callable[[list[str]], dict[str, torch.Tensor]],
        batch_size: int = 32,
        progress: Progress | None = None,
    ) -> dict[str, int]:
        unique = list(dict.fromkeys(captions))
        missing = [c for c in unique if not _entry_path(self.folder, self.key(c)).is_file()]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            with torch.no_grad():
                outputs = encode(chunk)
            for row, caption in enumerate(chunk):
                _write_entry(_entry_path(self.folder, self.key(caption)), {k: v[row] for k, v in outputs.items()})
            if progress is not None:
                progress(start + len(chunk), len(missing))
        return {"hits": len(unique) - len(missing), "built": len(missing)}


def cache_folder(config: TrainConfig) -> Path:
    """`dataset.cache_dir` (relative: under the home), else `.cache` in the folder the runs go in."""
    if config.dataset.cache_dir.strip():
        return in_home(config.dataset.cache_dir)
    return output_root(config.output_dir) / ".cache"
