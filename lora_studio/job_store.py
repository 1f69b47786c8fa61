"""The app's jobs on disk: one small JSON file per queued or running job in the runs root's `.queue/`, written
through a temp file and a rename, so that a queue survives the app closing, being killed or the machine restarting.

A record holds the job's config, what it resumes, its run folder once known and the last step whose whole state was
saved. The job manager writes it when the job is queued, starts, learns its run folder and saves a state, and removes
it when the job ends however it ends; what is left at the next start is what was queued or running when the app died.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import TrainConfig, validate_config
from .fsutil import write_text_atomic

log = logging.getLogger(__name__)
RECORD_PREFIX = "job-"


@dataclass
class JobRecord:
    key: str  # the file's name part: creation time and process, unique across restarts
    name: str
    work: str  # "train" or "regularization images"
    state: str  # "queued" or "running"
    config: dict  # TrainConfig as plain data
    run_dir: str | None = None  # known from the start for a resume, else from the first step
    saved_step: int = 0  # the last step whose whole state lies in the run's state/ folder
    created: float = field(default_factory=time.time)

    def train_config(self) -> TrainConfig:
        return validate_config(self.config, f"queued job {self.name!r}")

    @property
    def interrupted(self) -> bool:
        """It was running when the app died."""
        return self.state == "running"

    @property
    def resumable(self) -> bool:
        """It can go on from its run's saved state rather than start over (resuming is bit-exact)."""
        from .runs import RunFolder

        return self.run_dir is not None and RunFolder(Path(self.run_dir)).state_file.is_file()


class JobStore:
    """The records of one runs root; a file that cannot be read is left alone and logged, never fatal."""

    def __init__(self, folder: Path):
        self.folder = folder

    def new_record(self, config: TrainConfig, work: str, name: str, resume_from: Path | None) -> JobRecord:
        key = f"{time.time_ns()}-{os.getpid()}"
        run = str(resume_from) if resume_from else None
        return JobRecord(key, name, work, "queued", config.model_dump(mode="json"), run)

    def path(self, key: str) -> Path:
        return self.folder / f"{RECORD_PREFIX}{key}.json"

    def write(self, record: JobRecord) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path(record.key), json.dumps(asdict(record), indent=1))
        except OSError as exc:  # a full disk must not stop the training it records
            log.warning("could not record job %s in %s: %s", record.name, self.folder, exc)

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def load(self) -> list[JobRecord]:
        """Every readable record, oldest first."""
        records = []
        for path in sorted(self.folder.glob(f"{RECORD_PREFIX}*.json")) if self.folder.is_dir() else []:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                record = JobRecord(**data)
                if record.key != path.stem.removeprefix(RECORD_PREFIX) or record.state not in ("queued", "running"):
                    raise ValueError("its key or state does not match")
                record.train_config()  # a config that no longer validates is reported here, not at start
            except Exception as exc:  # any damage: JSON, fields, config
                log.warning("skipping the job record %s: it cannot be used (%s: %s)", path, type(exc).__name__, exc)
                continue
            records.append(record)
        return sorted(records, key=lambda r: r.created)
