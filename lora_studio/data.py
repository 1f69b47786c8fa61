"""From a folder of images to validated training items: scanning, validation, image loading, captions.

Two layouts are accepted:
- a plain folder of images with same-name caption files (`cat.png` + `cat.txt`);
- kohya's layout: a parent folder holding `N_name/` concept folders, where N is the repeat count
  and `name` the class or trigger (`10_sks dog/`).
`dataset.subsets` adds more folders of either layout (or one `N_name` folder itself), each with its own
repeat count and class tokens (kohya's `[[datasets.subsets]]`, OneTrainer's concepts).

`scan` opens every image once, reports every problem per file with a severity, and keeps only
small per-item records, so memory does not grow with image sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import re
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

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
from .config import MAX_REPEATS, DatasetConfig, DatasetSubset, TrainConfig
from .errors import LoraStudioError
from .paths import DEMO_DATASET_DIR, DEMO_VALIDATION_DIR, is_within

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MASK_SUFFIX = ".mask.png"  # `cat.mask.png` beside `cat.png`: white = learn, black = ignore (masked loss)
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
    mask_hash: str = ""  # sha256 of its mask file with masked loss on, "alpha" for its alpha channel, else ""
    regularization: bool = False  # a prior-preservation image: no trigger word, its loss weighted by prior_loss_weight
    named_concept: bool = False  # its concept was named (kohya folder, class_tokens), not just a plain folder's name
    subset: int = 0  # the line of dataset.subsets it came from (whose caption settings it takes); 0: dataset.path


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

    @staticmethod
    def folder_name(item: Item) -> str:
        """The name of the folder an item came from, as kohya keys its metadata: `10_zkz` in kohya's layout, the
        dataset folder's own name in a plain one, the class folder's for a regularization image. Images are only
        ever read directly inside such a folder, so it is the image's own folder."""
        return item.path.parent.resolve().name

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{folder name: {tag: count}} over the raw captions, tags lower-cased: kohya's `ss_tag_frequency`."""
        frequency: dict[str, Counter] = {}
        for item in self.items:
            tags = (t.strip().lower() for t in re.split(r"[,\n]", item.caption))
            frequency.setdefault(self.folder_name(item), Counter()).update(t for t in tags if t)
        return {folder: dict(counter) for folder, counter in frequency.items()}


# --- folder layout ---------------------------------------------------------------------------------


def resolve_dataset_path(path: str) -> Path:
    """`demo` names the bundled demo dataset and `demo-validation` its held-out images; anything else is a folder."""
    bundled = {"demo": DEMO_DATASET_DIR, "demo-validation": DEMO_VALIDATION_DIR}
    return bundled.get(path.strip(), Path(path).expanduser())


def is_training_image(path: Path) -> bool:
    """An image file of a dataset: an image suffix, and not another image's mask."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not is_mask_file(path)


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_file(image_path: Path) -> Path:
    """Where an image's mask lives: `cat.png` -> `cat.mask.png` beside it."""
    return image_path.with_name(image_path.stem + MASK_SUFFIX)


def image_files(folder: Path) -> list[Path]:
    """The training images directly in `folder` (masks left out), in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_training_image(p))


class Source(NamedTuple):
    """A folder whose images are read directly, with what its images share."""

    folder: Path
    concept: str  # the class tokens: a kohya N_name folder's name part, a subset's class_tokens, else the folder name
    repeats: int
    named: bool = True  # False: only a plain folder's name, which no caption takes while a trigger word is set
    subset: int = 0  # the line of dataset.subsets it comes from (its caption settings); 0: dataset.path


def chosen_subsets(config: DatasetConfig, regularization: bool) -> list[tuple[int, DatasetSubset]]:
    """(line number, subset) of the training subsets, or of the regularization ones."""
    return [(n, s) for n, s in enumerate(config.subsets, 1) if s.regularization == regularization]


def dataset_sources(config: DatasetConfig, setting: str = "dataset.path", regularization: bool = False,
                    ) -> tuple[list[Source], list[Problem]]:  # fmt: skip
    """Every folder the images come from: `path`'s (plain or kohya layout), then each subset's (the training
    subsets, or with `regularization` the regularization ones)."""
    subsets = chosen_subsets(config, regularization)
    if not config.path.strip() and not subsets:
        return [], [Problem(setting, "error", f"no folder of images is set; set {setting} to your images' folder")]
    sources, problems = [], []
    if config.path.strip():
        sources, problems = find_concept_folders(resolve_dataset_path(config.path), config, setting)
    for number, subset in subsets:
        found, found_problems = subset_folders(subset, config, number)
        sources += found
        problems += found_problems
    sources, twice = read_once(sources, setting)
    return sources, problems + twice


def read_once(sources: list[Source], setting: str = "dataset.path") -> tuple[list[Source], list[Problem]]:
    """Each folder once, and an error for a folder that two settings name (two spellings of one path, a link, or a
    kohya `N_name` folder named both directly and through its parent): its images would silently count twice."""
    def named_by(source: Source) -> str:
        return f"line {source.subset} of dataset.subsets" if source.subset else setting

    first: dict[Path, Source] = {}
    problems = []
    for source in sources:
        folder = source.folder.resolve()
        if folder in first:
            both = f"{named_by(first[folder])} and {named_by(source)}"
            problems.append(Problem(str(source.folder), "error", f"this folder is read by both {both}; name it once, "
                                    "with the repeats it should have"))  # fmt: skip
        else:
            first[folder] = source
    return list(first.values()), problems


def subset_folders(subset: DatasetSubset, config: DatasetConfig, line: int) -> tuple[list[Source], list[Problem]]:
    """A subset's folders as `find_concept_folders` finds them, or its path itself when that is one kohya `N_name`
    folder of images (kohya's dataset configs point at those); its repeats and class tokens, where set, replace
    the folders' own."""
    setting = f"line {line} of dataset.subsets"
    root = resolve_dataset_path(subset.path)
    own = KOHYA_FOLDER.match(root.name)
    if own and root.is_dir() and image_files(root):
        found, problems = [Source(root, own.group(2), int(own.group(1)))], []
    else:
        found, problems = find_concept_folders(root, config, setting)
    tokens = subset.class_tokens.strip()
    sources = [Source(source.folder, tokens or source.concept, subset.repeats or source.repeats,
                      bool(tokens) or source.named, line) for source in found]  # fmt: skip
    bad = [source.folder for source in sources if not 1 <= source.repeats <= MAX_REPEATS]
    problems += [Problem(str(folder), "error", f"a kohya folder's count must be 1 to {MAX_REPEATS}; rename the "
                         f"folder or give {setting} its own repeats")  # fmt: skip
                 for folder in bad]
    return [source for source in sources if source.folder not in bad], problems


def find_concept_folders(root: Path, config: DatasetConfig, setting: str = "dataset.path",
                         ) -> tuple[list[Source], list[Problem]]:  # fmt: skip
    """(folder, concept, repeats) for each source of images, or an explanatory error naming the folder and the
    `setting` that gave it."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file, not a folder"
        return [], [Problem(str(root), "error", f"the folder {root} {what}; set {setting} to your images' folder")]
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
        if image_files(root):
            problems.append(
                Problem(
                    str(root),
                    "warning",
                    "images directly in a kohya parent folder are ignored; move them into an N_name folder",
                )
            )
        sources = [Source(p, m.group(2), int(m.group(1))) for p, m in kohya]
        counted = [source for source in sources if 1 <= source.repeats <= MAX_REPEATS]
        problems += [
            Problem(str(folder), "error", f"{repeats} repeats: a kohya folder's count must be 1 to {MAX_REPEATS}; "
                    "rename the folder")  # fmt: skip
            for folder, repeats in ((source.folder, source.repeats) for source in sources if source not in counted)
        ]
        return counted, problems
    if own and image_files(root):
        return [], [
            Problem(
                str(root),
                "error",
                f"this is a kohya concept folder ({own.group(1)} repeats of '{own.group(2)}'); "
                f"set {setting} to its parent folder {root.parent} so the repeat count is read",
            )
        ]
    nested = [p for p in subfolders if any(KOHYA_FOLDER.match(q.name) for q in p.iterdir() if q.is_dir())]
    if not image_files(root) and nested:
        return [], [
            Problem(
                str(root),
                "error",
                f"no images here, but {nested[0]} holds kohya N_name folders; set {setting} to {nested[0]}",
            )
        ]
    return [Source(root, root.name, config.repeats, named=False)], []


# --- reading one image and its caption ----------------------------------------------------------------


class CaptionError(LoraStudioError):
    """A caption file that is refused: too large, or a link out of the dataset folder."""


def read_caption(image_path: Path, extension: str, lines: bool = False) -> tuple[str | None, list[str]]:
    """The caption text (None if there is no file) and warnings about its encoding; CaptionError for a caption
    file that is refused (over 64 KB, or a link to a file outside the image's folder). Its lines are joined into
    one, or with `lines` (enable_wildcard: one caption a line) kept apart by newlines."""
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
    if lines:
        return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip()), notes
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


def smallest_unscaled_side(config: DatasetConfig) -> int:
    """The shortest image side that training will not upscale: the smallest bucket side with buckets, the training
    resolution without them (every image is resized to cover resolution x resolution); when that resolution is the
    family's default (0), unknown here, the bucket minimum stands in rather than warn about what will not happen."""
    if not config.enable_bucket and config.resolution:
        return config.resolution
    return config.min_bucket_reso


def scan(config: DatasetConfig, min_side: int | None = None, setting: str = "dataset.path",
         regularization: bool = False) -> ScanReport:  # fmt: skip
    """Find, open and check every image; report every problem; keep the usable ones. `setting` names the
    config field the folder came from, for the message when it is missing; `regularization` takes the
    regularization subsets instead of the training ones."""
    subsets = chosen_subsets(config, regularization)
    root = resolve_dataset_path(config.path if config.path.strip() or not subsets else subsets[0][1].path)
    report = ScanReport(root=root)
    sources, problems = dataset_sources(config, setting, regularization)
    report.problems += problems
    report.layout = "kohya" if config.path.strip() and sources and sources[0].folder != root else "plain"
    seen: dict[str, Path] = {}
    min_side = min_side if min_side is not None else smallest_unscaled_side(config)
    files = [(source, path) for source in sources for path in image_files(source.folder)]
    for (source, path), probe in zip(files, probe_images([path for _source, path in files]), strict=True):
        item = _scan_one(path, probe, source, config, min_side, seen, report.problems)
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


class Probe(NamedTuple):
    """What a scan needs of an image file: its size as trained (EXIF orientation applied) and its content hash."""

    width: int
    height: int
    digest: str


# Probes of files seen, by the file's identity: (path, inode, size, mtime, ctime). ctime changes with any write or
# rename and no tool can set it back, so an entry never outlives its file's content. Bounded, oldest out first.
_probes: dict[tuple, Probe | str] = {}
_probes_lock = threading.Lock()
PROBES_KEPT = 20_000
# A file written this recently is not remembered: the kernel stamps times at its clock tick (a few ms), so a second
# write of the same size within the tick would keep all five (git's "racy" entries, handled the same way).
SETTLED_NS = 2_000_000_000
PROBE_THREADS = 4  # files probed at once, at most one per core


def file_identity(path: Path, stat: os.stat_result) -> tuple:
    """What tells one version of a file from another without reading it: path, inode, size, modification and change
    times (what probe_image and the gallery's copies are remembered by)."""
    return (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def settled(stat: os.stat_result) -> bool:
    """Whether the file was last written long enough ago (SETTLED_NS) for its identity to name its content."""
    return time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > SETTLED_NS


def probe_image(path: Path) -> Probe | str:
    """The image's Probe, or why it cannot be used (a sentence). A file is read, checked and decoded in full once;
    a scan again (the Dataset tab shown, each "Check settings", an upload) finds it unchanged and reads nothing:
    with 100 photos of 12 MP that was ~10 s every time."""
    try:
        stat = path.stat()
        key = file_identity(path, stat)
        if key in _probes:
            return _probes[key]
        data = path.read_bytes()
    except OSError as exc:
        return f"the file cannot be read ({exc.strerror or exc}); check its permissions, or re-copy it"
    if not data:
        probe: Probe | str = "the file is empty (0 bytes); re-copy or remove it"
    else:
        try:
            with open_image(data) as image:  # decode the bytes already read for the hash: one read per file
                probe = Probe(*image.size, hashlib.sha256(data).hexdigest())
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
            probe = _image_problem(path, exc)
    if settled(stat):
        with _probes_lock:  # probe_images' threads, and the app's requests
            while len(_probes) >= PROBES_KEPT:
                _probes.pop(next(iter(_probes)))
            _probes[key] = probe
    return probe


def probe_images(paths: list[Path]) -> list[Probe | str | None]:
    """probe_image of each path, several at once (Pillow's decoding and hashlib's hashing let go of the GIL: on 2
    cores a first scan of 100 photos of 12 MP took 9.2 s one by one); None for a link out of its folder, which is
    not read."""

    def probed(path: Path) -> Probe | str | None:
        return probe_image(path) if is_within(path, path.parent) else None

    if len(paths) < 2:
        return [probed(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, os.cpu_count() or 1)) as pool:
        return list(pool.map(probed, paths))


def _scan_one(
    path: Path, probe: Probe | str | None, source: Source, config: DatasetConfig, min_side: int,
    seen: dict[str, Path], problems: list,
) -> Item | None:  # fmt: skip
    if probe is None:
        problems.append(Problem(str(path), "error", "a link to a file outside the dataset folder; copy the file in"))
        return None
    if isinstance(probe, str):
        problems.append(Problem(str(path), "error", probe))
        return None
    width, height, digest = probe
    if digest in seen:
        problems.append(
            Problem(str(path), "warning", f"exact duplicate of {seen[digest].name}; it will be seen twice as often")
        )
    seen.setdefault(digest, path)
    if min(width, height) < min_side:
        fate = "skipped (bucket_no_upscale is on)" if config.bucket_no_upscale else "upscaled, so it may look soft"
        limit = "training resolution" if min_side == config.resolution and not config.enable_bucket else (
            "minimum bucket side")
        problems.append(
            Problem(
                str(path),
                "warning",
                f"{width}x{height} is smaller than the {limit} {min_side}; it will be {fate}",
            )
        )
        if config.bucket_no_upscale:
            return None
    try:
        own = config.for_subset(source.subset)
        caption, notes = read_caption(path, own.caption_extension, lines=own.enable_wildcard)
    except CaptionError as exc:
        problems.append(Problem(str(path), "error", str(exc)))
        return None
    problems += [Problem(str(path), "warning", note) for note in notes]
    uncaptioned = caption is None
    if uncaptioned:
        caption = ""
    elif not caption:
        problems.append(
            Problem(str(path), "warning", "the caption file is empty; only the trigger word or folder name is used")
        )
    mask_hash = _check_mask(path, image_size=(width, height), config=config, problems=problems)
    if mask_hash is None:
        return None
    item = Item(path, caption, source.concept, source.repeats, width, height, digest, mask_hash,
                named_concept=source.named, subset=source.subset)  # fmt: skip
    if uncaptioned:
        extension = config.for_subset(source.subset).caption_extension
        problems.append(Problem(str(path), "warning", f"no {extension} caption; '{validation_caption(item, config)}' "
                                "is used"))  # fmt: skip
    return item


def _check_mask(path: Path, image_size: tuple[int, int], config: DatasetConfig, problems: list) -> str | None:
    """With masked loss on: the mask's hash ("" when the whole image is learned, "alpha" for the alpha channel);
    None (and an error) for a mask that cannot be used."""
    if not config.masked_loss:
        return ""
    source = mask_file(path)
    if not source.is_file():
        if config.alpha_mask and _has_alpha(path):
            return "alpha"
        problems.append(Problem(str(path), "warning", f"no {source.name}; the whole image is learned"))
        return ""
    if not is_within(source, path.parent):
        problems.append(Problem(str(source), "error", "a link to a file outside the dataset folder; copy it in"))
        return None
    data = source.read_bytes()
    try:
        size = open_image(data).size
    except Exception as exc:  # Pillow raises several kinds for damaged files
        problems.append(Problem(str(source), "error", _image_problem(source, exc)))
        return None
    if size != image_size:
        problems.append(Problem(str(source), "error", (
            f"the mask is {size[0]}x{size[1]} but {path.name} is {image_size[0]}x{image_size[1]}; "
            "re-export the mask at the image's size")))  # fmt: skip
        return None
    return hashlib.sha256(data).hexdigest()


def _has_alpha(path: Path) -> bool:
    with Image.open(path) as image:
        return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


# --- the validation set ---------------------------------------------------------------------------------


def split_validation(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(training, held out): `fraction` of each concept folder's images, drawn with `seed`, at least one from a
    folder of two or more, never a folder's last image. Stratified, so every concept is both trained and
    validated; the draw depends only on the seed and the file names, so a resume holds out the same images."""
    if not fraction:
        return list(items), []
    folders: dict[str, list[Item]] = {}
    for item in items:
        folders.setdefault(item.concept, []).append(item)
    held: set[Path] = set()
    for concept, members in folders.items():
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        ordered = sorted(members, key=lambda i: i.path.name)
        held |= {i.path for i in random.Random(f"{seed}-validation-{concept}").sample(ordered, count)}
    return [i for i in items if i.path not in held], [i for i in items if i.path in held]


def validation_items(config: TrainConfig, report: ScanReport) -> tuple[ScanReport, list[Item], list[Problem]]:
    """The training report with any held-out images removed, the validation images, and problems found.

    `validation.fraction` holds out part of each folder; `validation.path` scans a separate folder with the
    dataset's own settings (its kohya repeat counts do not matter: every image is scored once)."""
    settings = config.validation
    if settings.path.strip():
        scanned = scan(config.dataset.model_copy(update={"path": settings.path, "subsets": []}),
                       setting="validation.path")
        problems = [Problem(p.path, p.severity, f"validation image: {p.message}") for p in scanned.problems]
        return report, scanned.items, problems
    training, held = split_validation(report.items, settings.fraction, config.validation_seed)
    problems = []
    if settings.fraction and not held:
        problems.append(Problem(str(report.root), "error", (
            f"validation.fraction = {settings.fraction} holds out no image: every folder has a single image; "
            "add images, or give a separate folder in validation.path")))  # fmt: skip
    return ScanReport(report.root, training, report.problems, report.layout), held, problems


# --- regularization images ----------------------------------------------------------------------------------


def regularization_items(config: TrainConfig) -> tuple[list[Item], list[Problem]]:
    """The images of `regularization.path` (plain or kohya N_class/ layout) and of the regularization subsets,
    marked as regularization images."""
    if not config.regularization.path.strip() and not config.dataset.has_regularization_subsets():
        return [], []
    scanned = scan(config.dataset.model_copy(update={"path": config.regularization.path, "masked_loss": False,
                                                     "alpha_mask": False, "unmasked_weight": 0.0}),
                   setting="regularization.path", regularization=True)  # fmt: skip
    problems = [Problem(p.path, p.severity, f"regularization image: {p.message}") for p in scanned.problems]
    return [dataclasses.replace(i, regularization=True) for i in scanned.items], problems


def balance_regularization(training: list[Item], regularization: list[Item]) -> list[Item]:
    """kohya's balance: the regularization images repeated, one more repeat at a time in order, until an epoch holds
    as many of them as of training images (with repeats); their own N_ repeat counts start the count."""
    target = sum(i.repeats for i in training)
    if not regularization or not target:
        return list(regularization)
    repeats = [min(i.repeats, target) for i in regularization]
    count, index = sum(repeats), 0
    while count < target:
        repeats[index % len(regularization)] += 1
        count, index = count + 1, index + 1
    while count > target:  # more regularization images than training ones: the later ones sit out
        last = max(i for i, r in enumerate(repeats) if r > 0)
        repeats[last] -= 1
        count -= 1
    return [dataclasses.replace(i, repeats=r) for i, r in zip(regularization, repeats, strict=True) if r > 0]


def planned_regularization(config: TrainConfig, training: list[Item], resolution: int) -> tuple[list[Item], list]:
    """The regularization images an epoch will hold, before any model loads: the folder's, balanced; or stand-ins
    for the images `regularization.generate` will render (square, at the training resolution)."""
    if config.regularization.generate and training:
        count = config.regularization.images or len(training)
        planned = [Item(Path(f"generated-{n}"), "", "regularization", 1, resolution, resolution, "", "", True)
                   for n in range(count)]  # fmt: skip
        return balance_regularization(training, planned), []
    found, problems = regularization_items(config)
    return balance_regularization(training, found), problems


# --- captions -------------------------------------------------------------------------------------------


def validation_caption(item: Item, config: DatasetConfig) -> str:
    """An image's caption as the validation pass sees it every time: trigger and prefix/suffix, no shuffle, no
    dropout (a validation loss that drew its captions would not compare weights alone)."""
    fixed = config.for_subset(item.subset).model_copy(update={"shuffle_caption": False, "caption_dropout_rate": 0.0,
                                                              "caption_tag_dropout_rate": 0.0})  # fmt: skip
    return _caption(item, fixed, random.Random(0))


def build_caption(item: Item, config: DatasetConfig, rng: random.Random) -> str:
    """The caption one training step sees: prefix/suffix, trigger, tag shuffle and dropout applied, with the
    settings of the folder the image came from.

    The trigger word goes first (unless already present) and always survives shuffling and tag
    dropout, as kohya does with `keep_tokens` covering it.
    """
    return _caption(item, config.for_subset(item.subset), rng)


def _caption(item: Item, config: DatasetConfig, rng: random.Random) -> str:
    if config.caption_dropout_rate and rng.random() < config.caption_dropout_rate:
        return ""
    text = wildcard_caption(item.caption, rng) if config.enable_wildcard else item.caption
    if not text and (item.regularization or item.named_concept or not config.trigger_word):
        # kohya's fallback: the class tokens (a kohya folder's name, a subset's class_tokens); a plain folder's name
        # only without a trigger word, which says more than "images" or "dataset" would
        text = item.concept
    text = ", ".join(p for p in (config.caption_prefix.strip(" ,"), text, config.caption_suffix.strip(" ,")) if p)
    fixed, rest, end = caption_parts(text, config)
    trigger = "" if item.regularization else config.trigger_word.strip()  # the class, not the concept
    if trigger and trigger not in {*fixed, *rest, *end} and trigger not in text.split():
        fixed.insert(0, trigger)
    if config.caption_tag_dropout_rate:
        rest = [t for t in rest if rng.random() >= config.caption_tag_dropout_rate]
    if config.shuffle_caption:
        rng.shuffle(rest)
    caption = ", ".join(fixed + rest + end)
    return caption.replace(config.secondary_separator, ", ") if config.secondary_separator else caption


def wildcard_caption(text: str, rng: random.Random | None = None) -> str:
    """kohya's wildcards: one line of a caption of several, and one option of each {a|b|c}, drawn from `rng`
    (without: the first of each); {{ and }} are literal braces."""
    lines = text.split("\n")
    line = rng.choice(lines) if rng is not None and len(lines) > 1 else lines[0]
    line = line.replace("{{", "\x00").replace("}}", "\x01")  # no caption holds these control characters
    line = WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")) if rng else m.group(1).split("|")[0], line)
    return line.replace("\x00", "{").replace("\x01", "}")


WILDCARD = re.compile(r"\{([^{}]+)\}")


def first_caption(item: Item, config: DatasetConfig) -> str:
    """An image's caption file as one text (for a prompt): with its folder's wildcards on, the first line and the
    first option of each."""
    return wildcard_caption(item.caption) if config.for_subset(item.subset).enable_wildcard else item.caption


def caption_parts(text: str, config: DatasetConfig) -> tuple[list[str], list[str], list[str]]:
    """A caption's tags as (kept at the start, shuffled and dropped, kept at the end): with kohya's
    keep_tokens_separator in the caption, what comes before it, between it and a second one, and after that;
    else the first keep_tokens tags and the rest."""
    def tags(part: str) -> list[str]:
        return [t.strip() for t in part.split(",") if t.strip()]

    separator = config.keep_tokens_separator
    if separator and separator in text:
        head, _, tail = text.partition(separator)
        middle, _, last = tail.partition(separator)
        return tags(head), tags(middle.replace(separator, ",")), tags(last.replace(separator, ","))
    every = tags(text)
    return every[: config.keep_tokens], every[config.keep_tokens :], []


# --- the report behind `lora-studio dataset` -------------------------------------------------------------


def dataset_report(config: TrainConfig, resolution: int | None = None) -> dict:
    """Items, repeats, buckets, steps and every problem, as plain data (the CLI prints it or its JSON)."""
    dataset = config.dataset
    resolution = resolution or dataset.resolution or 512
    report, held, problems = validation_items(config, scan(dataset))
    regularization, reg_problems = planned_regularization(config, report.items, resolution)
    report.problems = report.problems + problems + reg_problems
    counted = report.items + regularization
    buckets = assign_buckets([(i.width, i.height) for i in counted], dataset, resolution) if counted else []
    repeats = [i.repeats for i in counted]
    per_epoch = batches_per_epoch(buckets, repeats, dataset.batch_size) if buckets else 0
    counts = Counter(buckets)
    total = count_total_steps(config.optimizer, per_epoch)
    return {
        "path": str(report.root),
        "layout": report.layout,
        "items": len(report.items),
        "images_per_epoch": report.images_per_epoch,
        "validation_images": [str(i.path) for i in held],
        "regularization_images_per_epoch": sum(i.repeats for i in regularization),
        "repeats": {c: r for c, r in sorted({(i.concept, i.repeats) for i in report.items})},
        "folders": folder_counts(report.items),
        "resolution": resolution,
        "batch_size": dataset.batch_size,
        "buckets": [{"width": b.width, "height": b.height, "count": n} for b, n in sorted(counts.items())],
        "batches_per_epoch": per_epoch,
        "steps_per_epoch": updates_per_epoch(per_epoch, config.optimizer.gradient_accumulation_steps),
        "total_steps": total,
        "errors": [p.as_dict() for p in report.errors],
        "warnings": [p.as_dict() for p in report.warnings],
    }


def folder_counts(items: list[Item]) -> list[dict]:
    """Per source folder, in scan order: its path, concept (class tokens), repeats and usable images."""
    folders: dict[Path, dict] = {}
    for item in items:
        entry = folders.setdefault(item.path.parent, {"path": str(item.path.parent), "concept": item.concept,
                                                      "repeats": item.repeats, "images": 0})  # fmt: skip
        entry["images"] += 1
    return list(folders.values())


# --- transforms: an item as one training step sees it ------------------------------------------------------


def load_mask(item: Item) -> Image.Image | None:
    """An item's loss mask as an 8-bit L image the size of the image (oriented like it), or None when the whole
    image is learned: its `.mask.png`, or its alpha channel (kohya's alpha_mask)."""
    if not item.mask_hash:
        return None
    if item.mask_hash == "alpha":
        return open_image(item.path).convert("RGBA").getchannel("A")
    return open_image(mask_file(item.path)).convert("L")


def bucket_mask(
    item: Item, bucket: Bucket, resized: tuple[int, int], crop: Crop, flip: bool, latent_size: tuple[int, int]
) -> torch.Tensor | None:
    """An item's mask through the same resize, crop and flip as its image, averaged down to the latent's
    (height, width): a (1, h, w) tensor in [0, 1], or None without a mask."""
    mask = load_mask(item)
    if mask is None:
        return None
    mask = resize_and_crop(mask, bucket, crop, resized)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    import torch  # here, as in bucket_pixels: the Dataset tab uses this module before torch is needed
    import torch.nn.functional as F

    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(pixels, size=latent_size, mode="area")[0].clamp(0.0, 1.0)


def bucket_pixels(
    item: Item, bucket: Bucket, resized: tuple[int, int], crop: Crop, flip: bool, background: str,
    jitter: ColorJitter | None = None,
) -> torch.Tensor:  # fmt: skip
    """An item resized and cropped into its bucket, optionally mirrored and colour-jittered, as a [-1, 1] CHW
    tensor."""
    image = resize_and_crop(load_image(item.path, background), bucket, crop, resized)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if jitter is not None:
        image = apply_color_jitter(image, jitter)
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
    resized: tuple[int, int] = (0, 0)  # the size it was resized to before the crop (for its mask)


def make_step_sample(item: Item, bucket: Bucket, config: DatasetConfig, rng: random.Random) -> StepSample:
    """Random crop, flip and colour jitter (where the item's folder enables them) and the step's caption, all
    drawn from `rng` for exact resume."""
    own = config.for_subset(item.subset)
    resized, crop = plan_crop(item.width, item.height, bucket, own.random_crop, rng)
    flip = own.flip_aug and rng.random() < 0.5
    jitter = draw_color_jitter(own.color_jitter, rng) if own.color_augmented else None
    pixels = bucket_pixels(item, bucket, resized, crop, flip, config.alpha_background, jitter)
    return StepSample(pixels, build_caption(item, config, rng), crop, flip, resized)


@dataclass(frozen=True)
class ColorJitter:
    brightness: float  # factors: 1 leaves the image as it is
    contrast: float
    saturation: float
    hue: float  # a shift in turns of the colour wheel: 0 leaves it


def draw_color_jitter(strengths: tuple[float, float, float, float], rng: random.Random) -> ColorJitter:
    """One sample's colour change: each factor uniform in 1 +- its strength, the hue shift in +- its strength."""
    brightness, contrast, saturation, hue = strengths
    return ColorJitter(*(1.0 + rng.uniform(-s, s) for s in (brightness, contrast, saturation)), rng.uniform(-hue, hue))


def apply_color_jitter(image: Image.Image, jitter: ColorJitter) -> Image.Image:
    """Brightness, contrast, saturation (Pillow's ImageEnhance) and a hue rotation (in HSV), in that order."""
    image = ImageEnhance.Brightness(image).enhance(jitter.brightness)
    image = ImageEnhance.Contrast(image).enhance(jitter.contrast)
    image = ImageEnhance.Color(image).enhance(jitter.saturation)
    if jitter.hue:
        h, s, v = image.convert("HSV").split()
        shift = round(jitter.hue * 256) % 256
        h = h.point(lambda x: (x + shift) % 256)
        image = Image.merge("HSV", (h, s, v)).convert("RGB")
    return image
