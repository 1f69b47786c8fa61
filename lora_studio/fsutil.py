"""File writing that never leaves a half-written file where a good one was.

Every file LoRA Studio writes (LoRAs, state, configs, captions, samples, exports, caches) goes through
`atomic_path`: written under a temp name beside the target, flushed to disk, renamed over the target,
and the folder flushed, so a crash or a full disk leaves either the old file or the new one whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LoraStudioError

FULL_DISK = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class WriteError(LoraStudioError):
    """A file could not be written (full disk, read-only folder); the previous file is unchanged."""

    def __init__(self, target: Path, exc: OSError):
        self.target, self.errno, self.strerror = target, exc.errno, exc.strerror or str(exc)
        hint = "free some disk space" if exc.errno in FULL_DISK else "check that you can write to that folder"
        super().__init__(
            f"Could not write {target}: {self.strerror}; {hint} and try again "
            "(the previous file, if any, is unchanged)."
        )

    @property
    def full_disk(self) -> bool:
        return self.errno in FULL_DISK


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; once the caller has written it, it replaces `target` in one rename.

    The temp file is fsynced before the rename and the folder after it, so a power cut cannot leave an
    empty file under the target's name. The new file gets the mode the replaced file had (else the
    umask's), not mkstemp's 0600. Any OSError (a full disk, an interrupted write) removes the temp file,
    leaves the previous `target` untouched and is raised as a `WriteError` naming the target.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise WriteError(target, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _mode_for(target))
        _fsync(tmp_path)
        os.replace(tmp_path, target)
        _fsync(target.parent)
    except OSError as exc:
        raise WriteError(target, exc) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk. Folders cannot be opened on Windows."""
    if path.is_dir() and os.name == "nt":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mode_for(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # pragma: no cover - no /proc (macOS, Windows)
    os.umask(mask)
    return mask
