"""The run folder: the one owner of its layout. Everything else asks `RunFolder` for a path.

    runs/<name>-<YYYYmmdd-HHMMSS>/
        config.toml                      the resolved config
        metrics.jsonl                    one JSON line per logged step (and one per validation pass)
        validation.json                  the validation loss of each LoRA file, and the best one
        image_losses.json                each image's loss: training (last epoch) and validation (last pass)
        log.txt                          the run's log, tracebacks included
        samples/step-000100/s0.50-seed42.png
        checkpoints/<name>-step000100.safetensors
        state/trainer.safetensors        everything a resume needs, in one file
        <name>.safetensors               the final LoRA
        exports/                         copies the Library wrote (other formats, resized, merged)
        tensorboard/
        .lock                            held (an OS lock) while the run is being trained

Runs live in one root, `runs/` under the home (paths.home()), never under the working directory.
A run being trained holds an OS lock on its `.lock` file, so a second trainer, a second resume and a
delete are refused in one sentence, and a crashed trainer leaves no stale lock (the OS drops it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import LoraStudioError
from .fsutil import WriteError, write_text_atomic
from .paths import home, in_home, is_within

log = logging.getLogger(__name__)
STATE_FILE = "trainer.safetensors"  # in the run's state/ folder: everything a resume needs
LEGACY_LORA_STATE = "lora.safetensors"  # where runs before 2026-11-28 kept the LoRA beside the state
APP_LOG = "log.txt"  # the app's and the CLI's own log, in the runs root (each run also has its own)
STEP_FOLDER = re.compile(r"^step-(\d{6,})$")
STEP_IN_NAME = re.compile(r"-step(\d+)$")  # a checkpoint file's stem: NAME-step000200


class RunError(LoraStudioError):
    """A run folder that cannot be used as asked: missing, not a run, or in use."""


def runs_root() -> Path:
    return home() / "runs"


def compile_cache_folder() -> Path:
    """Where torch.compile keeps what it compiled (inductor's kernels and graphs) between runs and restarts."""
    return runs_root() / ".cache" / "torch-compile"


def thumbnail_folder() -> Path:
    """Where the Dataset tab keeps the gallery's small copies of large images (`dataset_edit.gallery_picture`)."""
    return runs_root() / ".cache" / "thumbnails"


def queue_folder(root: Path) -> Path:
    """Where the app records its queued and running jobs, one small file each, so a restart finds them."""
    return root / ".queue"


def output_root(output_dir: str) -> Path:
    """The folder new runs go in: a config's `output_dir` under the home, or the runs root when empty."""
    return in_home(output_dir) if output_dir.strip() else runs_root()


def app_log_path() -> Path:
    return runs_root() / APP_LOG


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # --- making, opening, listing ---------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, name: str) -> RunFolder:
        """A new, empty run folder `<root>/<name>-<timestamp>` (a suffix when two start in one second)."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path, suffix = root / f"{name}-{stamp}", 1
        while path.exists():
            path, suffix = root / f"{name}-{stamp}-{suffix}", suffix + 1
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunFolder:
        """An existing run; a folder without config.toml is refused with what to give instead."""
        run = cls(Path(path))
        if not run.config.is_file():
            raise RunError(
                f"{path} is not a run folder (it has no config.toml); give the folder of the run to continue, "
                "e.g. runs/my-lora-20260101-120000"
            )
        return run

    @property
    def name(self) -> str:
        return self.path.name

    # --- the layout ------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def validation_record(self) -> Path:
        return self.path / "validation.json"

    @property
    def image_losses(self) -> Path:
        return self.path / "image_losses.json"

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def legacy_lora_state(self) -> Path:
        return self.state_dir / LEGACY_LORA_STATE

    @property
    def exports(self) -> Path:
        return self.path / "exports"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    def sample_folder(self, step: int) -> Path:
        return self.samples / f"step-{step:06d}"

    def sample_path(self, step: int, strength: float, seed: int, prompt_index: int | None = None) -> Path:
        prefix = f"p{prompt_index}-" if prompt_index is not None else ""
        return self.sample_folder(step) / f"{prefix}s{strength:.2f}-seed{seed}.png"

    def checkpoint(self, name: str, step: int) -> Path:
        return self.checkpoints / f"{name}-step{step:06d}.safetensors"

    @staticmethod
    def checkpoint_step(path: Path) -> int | None:
        """The step a checkpoint file was saved at, from its name; None for a run's final file (or another)."""
        found = STEP_IN_NAME.search(path.stem)
        return int(found.group(1)) if found else None

    def final_lora(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    # --- what is in it -------------------------------------------------------------------------------

    def checkpoint_files(self) -> list[Path]:
        """Checkpoint LoRA files, oldest step first (the step is zero-padded in the name)."""
        return sorted(self.checkpoints.glob("*-step*.safetensors")) if self.checkpoints.is_dir() else []

    def final_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def lora_files(self) -> list[Path]:
        """Every LoRA file the run wrote: the final file(s), then its checkpoints by step."""
        return self.final_files() + self.checkpoint_files()

    def newest_samples(self) -> tuple[int, list[Path]]:
        """The newest sample step and its images (0 and [] when none were rendered)."""
        steps = sorted(
            (int(m.group(1)), p)
            for p in (self.samples.iterdir() if self.samples.is_dir() else [])
            if (m := STEP_FOLDER.match(p.name))
        )
        if not steps:
            return 0, []
        step, folder = steps[-1]
        return step, sorted(folder.glob("*.png"))

    def read_metrics(self) -> list[dict]:
        """Every whole line of metrics.jsonl; a cut-off or damaged line (a kill mid-write) is skipped."""
        if not self.metrics.is_file():
            return []
        rows = []
        with open(self.metrics, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def last_metrics(self) -> dict:
        """The newest training step's line (validation lines are left out: they have no training loss)."""
        rows = [row for row in self.read_metrics() if "loss" in row]
        return rows[-1] if rows else {}

    def validation_metrics(self) -> list[dict]:
        """The validation passes' lines: {"step", "epoch", "validation_loss", "time"}."""
        return [row for row in self.read_metrics() if "validation_loss" in row]

    def append_metrics(self, row: dict) -> None:
        """One line per step, appended: the log grows with the run and is never rewritten."""
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    # --- validation losses of the LoRA files -------------------------------------------------------------

    def read_json(self, path: Path) -> dict:
        """A JSON record of the run; {} when missing or damaged (a record is a help, never a reason to fail)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def record_validation(self, lora_file: Path, step: int, loss: float) -> None:
        """Remember the validation loss of a LoRA file the run wrote (kept across resumes in validation.json)."""
        files = self.read_json(self.validation_record).get("files", {})
        files = files if isinstance(files, dict) else {}
        files[lora_file.relative_to(self.path).as_posix()] = {"step": step, "validation_loss": loss}
        existing = {name: entry for name, entry in files.items() if (self.path / name).is_file()}
        self.write_record(self.validation_record, {"files": files, "best": lowest_loss(existing)})

    def validation_losses(self) -> dict[Path, dict]:
        """{LoRA file: {"step", "validation_loss"}} for the run's files that still exist and were validated (entries
        of a hand-edited record without a finite loss are left out)."""
        files = self.read_json(self.validation_record).get("files", {})
        if not isinstance(files, dict):
            return {}
        found = {self.path / name: {"step": step_of(entry), "validation_loss": entry["validation_loss"]}
                 for name, entry in files.items()
                 if isinstance(entry, dict) and is_finite_number(entry.get("validation_loss"))}  # fmt: skip
        return {path: entry for path, entry in found.items() if path.is_file() and is_within(path, self.path)}

    def best_lora(self) -> Path | None:
        """The LoRA file with the lowest validation loss (the earliest step on a tie), None without validation."""
        return lowest_loss(self.validation_losses())

    def record_image_losses(self, kind: str, step: int, losses: dict[str, float], epoch: int | None = None) -> None:
        """Each image's loss, highest first, under `kind` ("training": the last finished epoch's mean per image;
        "validation": the last pass), replacing what was there."""
        record = self.read_json(self.image_losses)
        ranked = dict(sorted(losses.items(), key=lambda pair: pair[1], reverse=True))
        record[kind] = {"step": step, **({"epoch": epoch} if epoch is not None else {}), "images": ranked}
        self.write_record(self.image_losses, record)

    def write_record(self, path: Path, record: dict) -> None:
        """Write a JSON record whole (temp file, rename). A record is a help: a failed write (a full disk) is logged
        and training goes on; the next checkpoint's save says what to do, and the old record stays whole."""
        try:
            write_text_atomic(path, json.dumps(record, indent=1))
        except WriteError as exc:
            log.warning("%s; training goes on without it", exc)

    def read_image_losses(self) -> dict[str, dict]:
        """{kind: {"step", "images": {path: loss}}} as record_image_losses wrote it ({} when none)."""
        record = self.read_json(self.image_losses)
        kept = {}
        for kind, part in record.items():
            if isinstance(part, dict) and isinstance(part.get("images"), dict):
                images = {path: loss for path, loss in part["images"].items() if is_finite_number(loss)}
                kept[kind] = {**part, "images": images}  # a hand-edited entry without a real loss is left out
        return kept

    # --- the lock ----------------------------------------------------------------------------------

    def lock(self) -> RunLock:
        """Take the run's lock for a training; refused in one sentence while another process trains it."""
        return RunLock.acquire(self)

    def is_locked(self) -> bool:
        if not self.lock_file.is_file():
            return False
        try:
            RunLock.acquire(self).release()
        except RunError:
            return True
        return False

    def delete(self) -> None:
        """Remove the whole folder, unless a trainer holds it (the lock is held while deleting)."""
        held = RunLock.acquire(self, doing="delete it")
        try:
            shutil.rmtree(self.path)
        finally:
            held.release()


class RunLock:
    """An OS lock (flock / msvcrt) on the run's .lock file: released when the holder exits, even killed."""

    def __init__(self, run: RunFolder, handle):
        self.run, self._handle = run, handle

    @classmethod
    def acquire(cls, run: RunFolder, doing: str = "train it") -> RunLock:
        handle = open(run.lock_file, "a+")  # noqa: SIM115 - held open for the life of the lock
        try:
            _lock_file(handle)
        except OSError:
            handle.close()
            raise RunError(
                f"{run.path} is being trained right now (another job or process holds it), so LoRA Studio will "
                f"not {doing}; stop that training first, or wait for it to finish"
            ) from None
        return cls(run, handle)

    def release(self) -> None:
        if self._handle is not None and not self._handle.closed:
            _unlock_file(self._handle)
            self._handle.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


if sys.platform == "win32":  # pragma: no cover - the tests run on Linux
    import msvcrt

    def _lock_file(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock_file(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock_file(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_file(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lowest_loss(entries: dict) -> Any | None:
    """The key whose entry has the lowest "validation_loss" (the earliest "step" on a tie), None if none has one."""
    scored = [(entry["validation_loss"], step_of(entry), str(key), key) for key, entry in entries.items()
              if isinstance(entry, dict) and is_finite_number(entry.get("validation_loss"))]  # fmt: skip
    return min(scored)[3] if scored else None


def is_finite_number(value: Any) -> bool:
    """A real loss: NaN would win or lose every comparison at random, and a hand-edited record may hold anything."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def step_of(entry: dict) -> int:
    step = entry.get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else 0


def list_runs(root: Path | None = None) -> list[RunFolder]:
    """Runs directly in `root` (default: the runs root), newest name first; folders without config.toml are
    not runs (uploads/, .cache/) and are left out."""
    root = root or runs_root()
    if not root.is_dir():
        return []
    runs = [RunFolder(p) for p in root.iterdir() if p.is_dir() and (p / "config.toml").is_file()]
    return sorted(runs, key=lambda r: r.name, reverse=True)


def run_of_lora_file(path: Path) -> RunFolder:
    """The run a final or checkpoint LoRA file belongs to."""
    return RunFolder(path.parent.parent if path.parent.name == "checkpoints" else path.parent)
