"""Changing a dataset folder from the app: importing uploads, editing captions one by one or in bulk.

Every name that arrives from outside (an upload's file name, an image picked in the gallery) is
reduced to a plain file name and checked to resolve inside the dataset folder, so nothing can be
written elsewhere (`../../x.png`, absolute paths, symlinks out of the folder). Every write goes to a
temp file first and is renamed into place.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .data import IMAGE_SUFFIXES, MAX_CAPTION_BYTES, open_image, read_caption
from .errors import LoraStudioError
from .fsutil import atomic_path, write_text_atomic

CAPTION_SUFFIXES = {".txt", ".caption"}
MAX_NAME = 120


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


def write_caption(folder: Path, image_name: str, text: str, extension: str = ".txt") -> Path:
    """Save one image's caption (UTF-8, one line), atomically."""
    image = inside(folder, image_name)
    if image.suffix.lower() not in IMAGE_SUFFIXES or not image.is_file():
        raise DatasetEditError(f"{image_name!r} is not an image in {folder}; reload the dataset.")
    path = image.with_suffix(extension)
    write_text_atomic(path, " ".join(text.split()) + "\n")
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
    names of the captions that changed. Each file is replaced atomically."""
    changed = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption, _notes = read_caption(image, extension)
        new = edit.apply(caption or "")
        if new != (caption or ""):
            write_text_atomic(image.with_suffix(extension), new + "\n")
            changed.append(image.with_suffix(extension).name)
    return changed
