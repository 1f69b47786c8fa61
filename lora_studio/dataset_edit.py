"""Changing a dataset folder from the app: importing uploads, editing captions one by one or in bulk.

Every name that arrives from outside (an upload's file name, an image picked in the gallery) is
reduced to a plain file name and checked to resolve inside the dataset folder, so nothing can be
written elsewhere (`../../x.png`, absolute paths, symlinks out of the folder). Every write goes to a
temp file first and is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .data import (
    IMAGE_SUFFIXES,
    MAX_CAPTION_BYTES,
    PROBE_THREADS,
    file_identity,
    is_training_image,
    mask_file,
    open_image,
    read_caption,
    settled,
    to_rgb,
)
from .errors import LoraStudioError
from .fsutil import WriteError, atomic_path, write_text_atomic
from .runs import thumbnail_folder

CAPTION_SUFFIXES = {".txt", ".caption"}
MAX_NAME = 120
# The gallery's cells are ~170 px at 8 columns; twice that stays sharp on a high-density screen. An image up to
# twice this side is shown as it is.
THUMBNAIL_SIDE = 384
THUMBNAIL_DAYS = 30  # copies older than this are let go (prune_thumbnails)
PRUNE_EVERY_S = 3600.0
_pruned_at = -PRUNE_EVERY_S  # monotonic time of this process's last prune


class DatasetEditError(LoraStudioError):
    """An upload or an edit that cannot be done; the message says which file and why."""


def safe_name(name: str) -> str:
    """A plain, portable file name from whatever a browser sent: no folders, no leading dots, no control
    or shell-special characters, at most 120 characters, the extension kept."""
    base = re.split(r"[\\/]", name)[-1]  # both separators: a Windows path arrives with backslashes
    base = unicodedata.normalize("NFKC", base).lstrip(". ")  # no hidden files, no ".." at all
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    stem = re.sub(r"[^\w\-. ]", "_", stem).strip(" .")
    stem = re.sub(r"\s+", "_", stem)[: MAX_NAME - len(suffix) - 1] or "file"
    suffix = re.sub(r"[^A-Za-z0-9]", "", suffix).lower()
    return f"{stem}.{suffix}" if suffix else stem


def inside(folder: Path, name: str) -> Path:
    """`folder / name` after sanitizing, refused if it would resolve outside `folder`."""
    target = (folder / safe_name(name)).resolve()
    root = folder.resolve()
    if target.parent != root:
        raise DatasetEditError(f"{name!r} would be written outside the dataset folder {folder}; refused.")
    return target


@dataclass
class ImportReport:
    images: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name: why"


def import_files(folder: Path, files: list[Path], original_names: list[str] | None = None) -> ImportReport:
    """Copy uploaded images and captions into `folder` under sanitized names.

    `files` are where the upload landed (Gradio's temp files); `original_names` are the names the user's
    browser sent (default: the files' own names). An image that does not open is skipped with the reason;
    a caption travels with the image of the same stem. An existing file of the same name is replaced
    atomically, as a re-upload should do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = original_names or [f.name for f in files]
    report = ImportReport()
    for source, name in zip(files, names, strict=True):
        clean = safe_name(name)
        suffix = Path(clean).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            try:
                open_image(Path(source))
            except Exception as exc:  # Pillow raises many types for damaged files; the reason is what matters
                report.skipped.append(f"{name}: not a readable image ({exc.__class__.__name__}); re-export it")
                continue
            _copy_atomic(Path(source), inside(folder, clean))
            report.images.append(clean)
        elif suffix in CAPTION_SUFFIXES:
            if Path(source).stat().st_size > MAX_CAPTION_BYTES:
                report.skipped.append(f"{name}: over the {MAX_CAPTION_BYTES // 1024} KB a caption may have")
                continue
            _copy_atomic(Path(source), inside(folder, clean))
            report.captions.append(clean)
        else:
            report.skipped.append(f"{name}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or a .txt caption")
    return report


def _copy_atomic(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def caption_file_text(text: str, path: Path) -> str:
    """The file text of a caption: each line's spaces evened out, empty lines dropped (a caption of several lines
    is one caption a line, kohya's enable_wildcard), refused (naming the file) if it is over what the dataset scan
    reads, so the app never writes a caption that training would then refuse."""
    line = "\n".join(" ".join(part.split()) for part in text.splitlines() if part.strip()) + "\n"
    size = len(line.encode())
    if size > MAX_CAPTION_BYTES:
        raise DatasetEditError(
            f"The caption for {path.name} would be {size / 1024:,.0f} KB, over the {MAX_CAPTION_BYTES // 1024} KB a "
            "caption may have; shorten it. Nothing was saved."
        )
    return line


def write_caption(folder: Path, image_name: str, text: str, extension: str = ".txt") -> Path:
    """Save one image's caption (UTF-8; its lines kept), atomically."""
    image = inside(folder, image_name)
    if image.suffix.lower() not in IMAGE_SUFFIXES or not image.is_file():
        raise DatasetEditError(f"{image_name!r} is not an image in {folder}; reload the dataset.")
    path = image.with_suffix(extension)
    write_text_atomic(path, caption_file_text(text, path))
    return path


@dataclass(frozen=True)
class BulkEdit:
    """Edits applied to every caption: find/replace first, then prefix/suffix, then the trigger word."""

    find: str = ""
    replace: str = ""
    prefix: str = ""
    suffix: str = ""
    trigger_word: str = ""

    def apply(self, caption: str) -> str:
        text = caption.replace(self.find, self.replace) if self.find else caption
        if self.prefix and not text.startswith(self.prefix):
            text = f"{self.prefix}{text}"
        if self.suffix and not text.endswith(self.suffix):
            text = f"{text}{self.suffix}"
        trigger = self.trigger_word.strip()
        if trigger and trigger not in [t.strip() for t in text.split(",")]:
            text = f"{trigger}, {text}"
        # Empty tags (from a prefix or suffix on an empty caption) would read as ", ," to the trainer.
        return ", ".join(" ".join(t.split()) for t in text.split(",") if t.strip())


def bulk_edit(folder: Path, edit: BulkEdit, extension: str = ".txt") -> list[str]:
    """Apply `edit` to the caption of every image in `folder` (missing captions start empty); returns the
    names of the captions that changed. Every new caption is checked before the first is written (an edit that
    makes one too long changes none); each file is replaced atomically."""
    edits = {}
    for image in sorted(p for p in folder.iterdir() if is_training_image(p)):
        caption, _notes = read_caption(image, extension, lines=True)
        new = "\n".join(edit.apply(line) for line in (caption or "").split("\n"))  # each line a caption of its own
        if new != (caption or ""):
            path = image.with_suffix(extension)
            edits[path] = caption_file_text(new, path)
    for path, text in edits.items():
        write_text_atomic(path, text)
    return [path.name for path in edits]


# --- masks (masked loss) --------------------------------------------------------------------------------------

MASK_TINT = (220, 38, 38)  # how the Dataset tab shows the ignored area over an image
MAX_LAYERS = 16  # painted layers taken from one request (the editor sends one per layer the person made)


def dataset_image(folder: Path, image_name: str) -> Path:
    """An image of the dataset by name (from the page), refused unless it is a training image inside `folder`."""
    image = inside(folder, image_name)
    if not is_training_image(image) or not image.is_file():
        raise DatasetEditError(f"{image_name!r} is not an image in {folder}; reload the dataset.")
    return image


def mask_overlay(folder: Path, image_name: str) -> Image.Image:
    """The image with the area its mask ignores tinted red (half-weight areas half tinted); as is without a mask."""
    image = dataset_image(folder, image_name)
    picture = to_rgb(open_image(image), (255, 255, 255))
    mask_path = mask_file(image)
    if not mask_path.is_file():
        return picture
    mask = open_image(mask_path).convert("L")
    if mask.size != picture.size:
        raise DatasetEditError(f"{mask_path.name} is not the size of {image.name}; paint a new mask and save it.")
    ignored = ImageOps.invert(mask).point(lambda v: v * 6 // 10)  # at most 60% tint, so the image shows through
    return Image.composite(Image.new("RGB", picture.size, MASK_TINT), picture, ignored)


def painted_mask(image_size: tuple[int, int], layers: list[np.ndarray], current: Image.Image | None) -> Image.Image:
    """The mask after painting: every stroke (any pixel a layer covers) becomes ignored (black) on top of the
    current mask (or an all-white one)."""
    width, height = image_size
    if len(layers) > MAX_LAYERS:
        raise DatasetEditError(f"{len(layers)} painted layers; at most {MAX_LAYERS} are taken, merge some first")
    mask = np.asarray(current.convert("L"), dtype=np.uint8).copy() if current is not None else None
    mask = mask if mask is not None else np.full((height, width), 255, dtype=np.uint8)
    for layer in map(np.asarray, layers):
        if layer.shape[:2] != mask.shape:
            raise DatasetEditError(f"a painted layer is {layer.shape[1]}x{layer.shape[0]}, not the image's "
                                   f"{width}x{height}; reload the image and paint again")  # fmt: skip
        with_alpha = layer.ndim == 3 and layer.shape[2] == 4
        mask[layer[..., 3] > 0 if with_alpha else layer.reshape(*mask.shape, -1).any(-1)] = 0
    return Image.fromarray(mask, "L")


def save_painted_mask(folder: Path, image_name: str, layers: list[np.ndarray]) -> Path:
    """Paint strokes into the image's mask (`name.mask.png` beside it), written atomically."""
    image = dataset_image(folder, image_name)
    size = open_image(image).size
    target = mask_file(image)
    current = open_image(target) if target.is_file() else None
    if current is not None and current.size != size:
        current = None  # a mask of another size is replaced, not combined
    mask = painted_mask(size, layers, current)
    with atomic_path(target) as partial:
        mask.save(partial, format="PNG")
    return target


def clear_mask(folder: Path, image_name: str) -> bool:
    """Remove an image's mask (the whole image is learned again); False when it had none."""
    target = mask_file(dataset_image(folder, image_name))
    if not target.is_file():
        return False
    target.unlink()
    return True


def gallery_picture(image: Path) -> Path:
    """What the gallery shows for `image`: the file itself when it is small, else a copy at most THUMBNAIL_SIDE a
    side, made once per version of the file (its identity: path, inode, size, modification and change times) and
    kept under the runs folder's cache. The copy has the image's own name, so a pick in the gallery still names the
    image (every handler takes only the name, inside the open folder). A phone photo is 12-48 MP: the browser
    decoded each in full (~4 s of its CPU to show 100 of 12 MP, a tab's memory for 48 MP ones) and Gradio copied
    each whole into its temp folder at every refresh. An image that cannot be read is shown as it is (the report
    says what is wrong with it)."""
    try:
        stat = image.stat()
        with Image.open(image) as opened:
            if max(opened.size) <= 2 * THUMBNAIL_SIDE:
                return image
            identity = "|".join(map(str, file_identity(image.resolve(), stat)))
            thumbnail = thumbnail_folder() / hashlib.sha256(identity.encode()).hexdigest()[:32] / image.name
            if thumbnail.is_file() and settled(stat):  # a file written a moment ago is copied again each time
                return thumbnail
            # A JPEG decodes at 1/2-1/8 scale, still at least half the copy's side: 13 ms for 12 MP, not 90
            opened.draft("RGB", (THUMBNAIL_SIDE // 2, THUMBNAIL_SIDE // 2))
            small = ImageOps.exif_transpose(opened)
            small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
            kind = Image.registered_extensions()[image.suffix.lower()]
            if kind == "JPEG" and small.mode not in ("RGB", "L"):
                small = small.convert("RGB")
            with atomic_path(thumbnail) as temp:
                small.save(temp, format=kind)
            return thumbnail
    except (OSError, ValueError, SyntaxError, KeyError, WriteError, Image.DecompressionBombError):
        return image


def gallery_pictures(images: list[Path]) -> list[Path]:
    """gallery_picture of each image, several at once (as data.probe_images: decoding lets go of the GIL); copies
    made long ago are let go first, at most once an hour (prune_thumbnails)."""
    global _pruned_at
    if time.monotonic() - _pruned_at > PRUNE_EVERY_S:
        _pruned_at = time.monotonic()
        prune_thumbnails()
    if len(images) < 2:
        return [gallery_picture(image) for image in images]
    with ThreadPoolExecutor(max_workers=min(PROBE_THREADS, os.cpu_count() or 1)) as pool:
        return list(pool.map(gallery_picture, images))


def prune_thumbnails(older_than_days: float = THUMBNAIL_DAYS) -> int:
    """Remove the gallery's copies made more than `older_than_days` ago, so the cache does not grow with every
    version of every photo ever shown (~30 KB each); a photo still shown gets a new copy in ~13 ms. Returns how many
    went. Anything else in the folder, or a copy another request removes first, is left alone."""
    folder, removed = thumbnail_folder(), 0
    cutoff = time.time() - older_than_days * 86400
    for entry in folder.glob("*/*") if folder.is_dir() else ():
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                entry.unlink()
                entry.parent.rmdir()
                removed += 1
        except OSError:
            continue
    return removed
