"""From a folder of images to validated training items: scanning, validation, image loading, captions.

Two layouts are accepted:
- a plain folder of images with same-name caption files (`cat.png` + `cat.txt`);
- kohya's layout: a parent folder holding `N_name/` concept folders, where N is the repeat count
  and `name` the class or trigger (`10_sks dog/`).

`scan` opens every image once, reports every problem per file with a severity, and keeps only
small per-item records, so memory does not grow with image sizes.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .buckets import (
    Bucket,
    Crop,
    assign_buckets,
    batches_per_epoch,
    count_total_steps,
    plan_crop,
    resize_and_crop,
    updates_per_epoch,
)
from .config import DatasetConfig, TrainConfig
from .errors import LoraStudioError
from .paths import DEMO_DATASET_DIR, is_within

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_CAPTION_BYTES = 64 * 1024  # a caption is a line of tags; a bigger "caption" is some other file
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    path: str
    severity: Severity
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "severity": self.severity, "message": self.message}


@dataclass(frozen=True)
class Item:
    """One usable training image (before repeats)."""

    path: Path
    caption: str  # as read, before trigger/shuffle/dropout (those change per step)
    concept: str  # the kohya folder's name part, or the dataset folder's name
    repeats: int
    width: int  # after EXIF orientation
    height: int
    content_hash: str  # sha256 of the file bytes: the cache key and the duplicate check


@dataclass
class ScanReport:
    root: Path
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    layout: str = "plain"

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def images_per_epoch(self) -> int:
        return sum(item.repeats for item in self.items)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{concept folder: {tag: count}} over the raw captions: kohya's `ss_tag_frequency`."""
        frequency: dict[str, Counter] = {}
        for item in self.items:
            tags = (t.strip() for t in item.caption.split(","))
            frequency.setdefault(item.concept, Counter()).update(t for t in tags if t)
        return {concept: dict(counter) for concept, counter in frequency.items()}


# --- folder layout ---------------------------------------------------------------------------------


def resolve_dataset_path(path: str) -> Path:
    """`demo` names the bundled demo dataset; anything else is a folder path."""
    return DEMO_DATASET_DIR if path.strip() == "demo" else Path(path).expanduser()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_concept_folders(root: Path, config: DatasetConfig) -> tuple[list[tuple[Path, str, int]], list[Problem]]:
    """(folder, concept, repeats) for each source of images, or an explanatory error."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file, not a folder"
        return [], [Problem(str(root), "error", f"the dataset folder {what}; set dataset.path to your images' folder")]
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    kohya = [(p, KOHYA_FOLDER.match(p.name)) for p in subfolders]
    kohya = [(p, m) for p, m in kohya if m]
    own = KOHYA_FOLDER.match(root.name)
    if kohya:
        problems = [
            Problem(
                str(p), "warning", "ignored: not a kohya N_name folder (e.g. 10_sks dog), so its repeats are unknown"
            )
            for p in subfolders
            if not KOHYA_FOLDER.match(p.name)
        ]
        if _image_files(root):
            problems.append(
                Problem(
                    str(root),
                    "warning",
                    "images directly in a kohya parent folder are ignored; move them into an N_name folder",
                )
            )
        return [(p, m.group(2), int(m.group(1))) for p, m in kohya], problems
    if own and _image_files(root):
        return [], [
            Problem(
                str(root),
                "error",
                f"this is a kohya concept folder ({own.group(1)} repeats of '{own.group(2)}'); "
                f"set dataset.path to its parent folder {root.parent} so the repeat count is read",
            )
        ]
    nested = [p for p in subfolders if any(KOHYA_FOLDER.match(q.name) for q in p.iterdir() if q.is_dir())]
    if not _image_files(root) and nested:
        return [], [
            Problem(
                str(root),
                "error",
                f"no images here, but {nested[0]} holds kohya N_name folders; set dataset.path to {nested[0]}",
            )
        ]
    return [(root, root.name, config.repeats)], []


# --- reading one image and its caption ----------------------------------------------------------------


class CaptionError(LoraStudioError):
    """A caption file that is refused: too large, or a link out of the dataset folder."""


def read_caption(image_path: Path, extension: str) -> tuple[str | None, list[str]]:
    """The caption text (None if there is no file) and warnings about its encoding; CaptionError for a caption
    file that is refused (over 64 KB, or a link to a file outside the image's folder)."""
    path = image_path.with_suffix(extension if extension.startswith(".") else "." + extension)
    if not path.is_file():
        return None, []
    if not is_within(path, image_path.parent):
        raise CaptionError(f"{path.name} is a link to a file outside the dataset folder; replace it with a real file")
    size = path.stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise CaptionError(
            f"{path.name} is {size / 1024:,.0f} KB, over the {MAX_CAPTION_BYTES // 1024} KB a caption may have; "
            "it is probably not a caption, so shorten or remove it"
        )
    raw = path.read_bytes()
    notes = []
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark, as Windows Notepad writes
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
        notes.append(f"{path.name} is not UTF-8; read it as Windows-1252; re-save it as UTF-8 to be sure")
    if "\ufffd" in text:
        notes.append(f"{path.name} contains undecodable characters (shown as \ufffd); fix the caption")
    return " ".join(text.split()), notes


def open_image(source: Path | bytes) -> Image.Image:
    """Open and fully decode an image (a path or its bytes), EXIF orientation applied. Raises on any damage."""

    def opened() -> Image.Image:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with opened() as image:
            image.verify()  # checksums (a PNG's CRCs) that decoding alone does not check
        with opened() as image:
            image.load()
            return ImageOps.exif_transpose(image)


def _image_problem(path: Path, exc: BaseException) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (
            f"the image is larger than Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
            "(it may be a malicious file); downscale it if it is genuine"
        )
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown or damaged format); re-export or remove it"
    return f"the image is damaged ({exc}); re-export or remove it"


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB from any mode: alpha composited on `background`, 16-bit scaled to 8-bit, palette expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, background + (255,))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path, background: str = "#ffffff") -> Image.Image:
    """The training view of an image file: oriented, RGB."""
    return to_rgb(open_image(path), hex_color(background))


def hex_color(value: str) -> tuple[int, int, int]:
    return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


# --- scanning -----------------------------------------------------------------------------------------


def scan(config: DatasetConfig, min_side: int | None = None) -> ScanReport:
    """Find, open and check every image; report every problem; keep the usable ones."""
    root = resolve_dataset_path(config.path)
    report = ScanReport(root=root)
    sources, problems = find_concept_folders(root, config)
    report.problems += problems
    report.layout = "kohya" if sources and sources[0][0] != root else "plain"
    seen: dict[str, Path] = {}
    min_side = min_side if min_side is not None else config.min_bucket_reso
    for folder, concept, repeats in sources:
        for path in _image_files(folder):
            item = _scan_one(path, concept, repeats, config, min_side, seen, report.problems)
            if item is not None:
                report.items.append(item)
    if not report.items and not report.errors:
        report.problems.append(
            Problem(
                str(root),
                "error",
                f"no usable images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); add images or fix the path",
            )
        )
    return report


def _scan_one(
    path: Path, concept: str, repeats: int, config: DatasetConfig, min_side: int, seen: dict[str, Path], problems: list
) -> Item | None:
    if not is_within(path, path.parent):
        problems.append(Problem(str(path), "error", "a link to a file outside the dataset folder; copy the file in"))
        return None
    data = path.read_bytes()
    if not data:
        problems.append(Problem(str(path), "error", "the file is empty (0 bytes); re-copy or remove it"))
        return None
    try:
        image = open_image(data)  # decode the bytes already read for the hash: one read per file
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
        problems.append(Problem(str(path), "error", _image_problem(path, exc)))
        return None
    width, height = image.size
    image.close()
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen:
        problems.append(
            Problem(str(path), "warning", f"exact duplicate of {seen[digest].name}; it will be seen twice as often")
        )
    seen.setdefault(digest, path)
    if min(width, height) < min_side:
        fate = "skipped (bucket_no_upscale is on)" if config.bucket_no_upscale else "upscaled, so it may look soft"
        problems.append(
            Problem(
                str(path),
                "warning",
                f"{width}x{height} is smaller than the minimum bucket side {min_side}; it will be {fate}",
            )
        )
        if config.bucket_no_upscale:
            return None
    try:
        caption, notes = read_caption(path, config.caption_extension)
    except CaptionError as exc:
        problems.append(Problem(str(path), "error", str(exc)))
        return None
    problems += [Problem(str(path), "warning", note) for note in notes]
    if caption is None:
        fallback = config.trigger_word or concept
        problems.append(Problem(str(path), "warning", f"no {config.caption_extension} caption; '{fallback}' is used"))
        caption = ""
    elif not caption:
        problems.append(
            Problem(str(path), "warning", "the caption file is empty; only the trigger word or folder name is used")
        )
    return Item(path, caption, concept, repeats, width, height, digest)


# --- captions -------------------------------------------------------------------------------------------


def build_caption(item: Item, config: DatasetConfig, rng: random.Random) -> str:
    """The caption one training step sees: prefix/suffix, trigger, tag shuffle and dropout applied.

    The trigger word goes first (unless already present) and always survives shuffling and tag
    dropout, as kohya does with `keep_tokens` covering it.
    """
    if config.caption_dropout_rate and rng.random() < config.caption_dropout_rate:
        return ""
    text = item.caption
    if not text and not config.trigger_word:
        text = item.concept  # kohya's fallback: the concept folder's class name
    text = ", ".join(p for p in (config.caption_prefix.strip(" ,"), text, config.caption_suffix.strip(" ,")) if p)
    tags = [t.strip() for t in text.split(",") if t.strip()]
    trigger = config.trigger_word.strip()
    keep = config.keep_tokens
    if trigger and trigger not in {t.strip() for t in tags} and trigger not in text.split():
        tags.insert(0, trigger)
        keep += 1
    fixed, rest = tags[:keep], tags[keep:]
    if config.caption_tag_dropout_rate:
        rest = [t for t in rest if rng.random() >= config.caption_tag_dropout_rate]
    if config.shuffle_caption:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)


# --- the report behind `lora-studio dataset` -------------------------------------------------------------


def dataset_report(config: TrainConfig, resolution: int | None = None) -> dict:
    """Items, repeats, buckets, steps and every problem, as plain data (the CLI prints it or its JSON)."""
    dataset = config.dataset
    resolution = resolution or dataset.resolution or 512
    report = scan(dataset)
    buckets = assign_buckets([(i.width, i.height) for i in report.items], dataset, resolution) if report.items else []
    repeats = [i.repeats for i in report.items]
    per_epoch = batches_per_epoch(buckets, repeats, dataset.batch_size) if buckets else 0
    counts = Counter(buckets)
    total = count_total_steps(config.optimizer, per_epoch)
    return {
        "path": str(report.root),
        "layout": report.layout,
        "items": len(report.items),
        "images_per_epoch": report.images_per_epoch,
        "repeats": {c: r for c, r in sorted({(i.concept, i.repeats) for i in report.items})},
        "resolution": resolution,
        "batch_size": dataset.batch_size,
        "buckets": [{"width": b.width, "height": b.height, "count": n} for b, n in sorted(counts.items())],
        "batches_per_epoch": per_epoch,
        "steps_per_epoch": updates_per_epoch(per_epoch, config.optimizer.gradient_accumulation_steps),
        "total_steps": total,
        "errors": [p.as_dict() for p in report.errors],
        "warnings": [p.as_dict() for p in report.warnings],
    }


# --- transforms: an item as one training step sees it ------------------------------------------------------


def bucket_pixels(
    item: Item, bucket: Bucket, resized: tuple[int, int], crop: Crop, flip: bool, background: str
) -> torch.Tensor:
    """An item resized and cropped into its bucket, optionally mirrored, as a [-1, 1] CHW tensor."""
    image = resize_and_crop(load_image(item.path, background), bucket, crop, resized)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    import torch  # here, not at the top: the app's Dataset tab uses this module before torch is needed

    return torch.from_numpy(array).permute(2, 0, 1)


@dataclass
class StepSample:
    """What a training step needs of one item when latents are not cached."""

    pixels: torch.Tensor
    caption: str
    crop: Crop  # SDXL's original size, crop top-left and target size
    flip: bool


def make_step_sample(item: Item, bucket: Bucket, config: DatasetConfig, rng: random.Random) -> StepSample:
    """Random crop and flip (when enabled) and the step's caption, all drawn from `rng` for exact resume."""
    resized, crop = plan_crop(item.width, item.height, bucket, config.random_crop, rng)
    flip = config.flip_aug and rng.random() < 0.5
    pixels = bucket_pixels(item, bucket, resized, crop, flip, config.alpha_background)
    return StepSample(pixels, build_caption(item, config, rng), crop, flip)
