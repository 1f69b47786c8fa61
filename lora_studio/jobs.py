"""Training jobs for the app: one at a time on the device, later ones queued, progress kept for any page.

The job runs in a worker thread of the app's process, so closing the browser does not stop it and a
reopened page reads the same `JobStatus`. Training reports through events (train.py); this module only
records them.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .config import TrainConfig
from .errors import LoraStudioError, StoppedEarly
from .events import (
    CheckpointEvent,
    Commands,
    DoneEvent,
    ErrorEvent,
    PreparingEvent,
    ProgressEvent,
    SampleEvent,
    ValidationEvent,
)
from .job_store import JobRecord, JobStore

log = logging.getLogger(__name__)
T = TypeVar("T")
REG_IMAGES = "regularization images"


@dataclass
class JobStatus:
    """Everything a page shows about one job; a snapshot is a copy, safe to read from any thread."""

    id: int
    name: str
    state: str = "queued"  # queued, running, stopping, done, stopped, failed
    step: int = 0
    total_steps: int = 0
    it_per_s: float = 0.0
    eta_s: float = 0.0
    preparing: tuple[str, int, int] | None = None  # (what, done, total) before the first step, e.g. reg rendering
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, smoothed loss)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    samples: list[Path] = field(default_factory=list)  # the newest sample images
    sample_step: int = 0
    run_dir: Path | None = None
    lora_path: Path | None = None
    message: str = ""


@dataclass
class _Job:
    status: JobStatus
    config: TrainConfig
    resume_from: Path | None
    commands: Commands = field(default_factory=Commands)
    work: str = "train"  # or "regularization images": render them only, to be looked at before training
    record: JobRecord | None = None  # its file in the runs root's .queue/ (None without a store)


class JobManager:
    """A queue of training jobs served by one worker thread. With a `JobStore`, every queued and running job is
    also on disk, and `recover` finds what was queued or running when the app last died."""

    def __init__(self, store: JobStore | None = None):
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._current: _Job | None = None
        self._finished: list[_Job] = []
        self._recovered: dict[str, JobRecord] = {}  # key -> a job from before the restart, waiting for a click
        self._store = store
        self._ids = itertools.count(1)
        self._wake = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._serve, name="lora-studio-jobs", daemon=True)
        self._worker.start()

    def submit(self, config: TrainConfig, resume_from: Path | None = None) -> int:
        # A resume names its run from the start, so a queued resume's run is known (the Library will not delete it).
        return self._enqueue(_Job(JobStatus(0, config.name, run_dir=resume_from), config, resume_from))

    def submit_regularization_images(self, config: TrainConfig) -> int:
        """Render a config's regularization images (cached) in the queue, on the device training uses."""
        return self._enqueue(_Job(JobStatus(0, f"{config.name} (regularization images)"), config, None,
                                  work=REG_IMAGES))  # fmt: skip

    def _enqueue(self, job: _Job, record: JobRecord | None = None) -> int:
        job.status.id = next(self._ids)
        if self._store is not None:
            job.record = record or self._store.new_record(job.config, job.work, job.status.name, job.resume_from)
            job.record.state = "queued"
            self._store.write(job.record)
        with self._wake:
            self._queue.append(job)
            self._wake.notify()
        return job.status.id

    # --- jobs from before a restart -------------------------------------------------------------------------

    def recover(self) -> list[JobRecord]:
        """The jobs recorded on disk by an app that is gone, oldest first; each waits for `start_recovered` (a
        click, or `--resume-queue`). A job that was running goes on from its run's saved state when there is one,
        else starts over; nothing runs twice and nothing is dropped."""
        records = self._store.load() if self._store is not None else []
        with self._lock:
            self._recovered.update({r.key: r for r in records if r.key not in self._recovered})
        return records

    def recovered(self) -> list[JobRecord]:
        with self._lock:
            return sorted(self._recovered.values(), key=lambda r: r.created)

    def start_recovered(self, key: str) -> int:
        """Queue a job from before the restart: a resume of its run if it was running and saved a state."""
        with self._lock:
            record = self._recovered.pop(key, None)
        if record is None:
            raise LoraStudioError("That job from before the restart is no longer waiting; refresh the list.")
        config = record.train_config()
        resume_from = Path(record.run_dir) if record.resumable else None
        if record.interrupted and not record.resumable:
            log.info("job %s had saved no state before the app stopped: it starts over", record.name)
            record.run_dir = None
        job = _Job(JobStatus(0, record.name, run_dir=resume_from), config, resume_from, work=record.work)
        return self._enqueue(job, record)

    def discard_recovered(self, key: str) -> JobRecord:
        """Forget a job from before the restart (its run folder, if any, stays in the Library)."""
        with self._lock:
            record = self._recovered.pop(key, None)
        if record is None:
            raise LoraStudioError("That job from before the restart is no longer waiting; refresh the list.")
        if self._store is not None:
            self._store.remove(record.key)
        return record

    def stop(self) -> bool:
        """Ask the running job to stop after its current step (it saves its LoRA and state first)."""
        with self._lock:
            if self._current is None:
                return False
            self._current.commands.request_stop()
            self._current.status.state = "stopping"
            return True

    def sample_now(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.commands.request_sample()

    def current(self) -> JobStatus | None:
        """The running job, else the newest finished one (what a reopened page should show)."""
        with self._lock:
            job = self._current or (self._finished[-1] if self._finished else None)
            return _copy(job.status) if job else None

    def queued(self) -> list[JobStatus]:
        with self._lock:
            return [_copy(j.status) for j in self._queue]

    def wait(self, job_id: int, timeout: float = 600.0) -> JobStatus:
        """Block until job `job_id` has finished (tests and scripts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for job in self._finished:
                    if job.status.id == job_id:
                        return _copy(job.status)
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s")

    # --- the worker ---------------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                job = self._queue.popleft()
                self._current = job
                job.status.state = "running"
            self._record(job, state="running")
            try:
                run_on_fresh_thread(self._run_one, job, name=f"lora-studio-job-{job.status.id}")
            finally:
                if self._store is not None and job.record is not None:
                    self._store.remove(job.record.key)  # ended, however it ended: nothing to pick up again
                with self._lock:
                    self._finished.append(job)
                    self._current = None

    def _record(self, job: _Job, **changes) -> None:
        """Update the job's file (the worker's thread and the training thread both call this)."""
        if self._store is None or job.record is None:
            return
        for name, value in changes.items():
            setattr(job.record, name, value)
        self._store.write(job.record)

    def _run_one(self, job: _Job) -> None:
        status = job.status

        def on_event(event) -> None:
            with self._lock:
                if isinstance(event, ProgressEvent):
                    status.step, status.total_steps = event.step, event.total_steps
                    status.it_per_s, status.eta_s = event.it_per_s, event.eta_s
                    status.losses.append((event.step, event.smoothed_loss))
                    if event.run_dir is not None and job.record is not None and job.record.run_dir is None:
                        self._record(job, run_dir=str(event.run_dir))  # where a restart finds its state
                    status.run_dir = event.run_dir or status.run_dir
                    status.preparing = None
                elif isinstance(event, CheckpointEvent):
                    if event.state_dir is not None:
                        self._record(job, saved_step=event.step)
                elif isinstance(event, PreparingEvent):
                    status.preparing = (event.stage, event.done, event.total)
                elif isinstance(event, SampleEvent):
                    status.samples, status.sample_step = list(event.images), event.step
                elif isinstance(event, ValidationEvent):
                    status.validation.append((event.step, event.loss))
                elif isinstance(event, DoneEvent):
                    status.run_dir, status.lora_path = event.run_dir, event.lora_path
                elif isinstance(event, ErrorEvent):
                    status.message = event.message

        try:
            if job.work == REG_IMAGES:
                self._render_regularization(job, on_event)
                return
            from .train import run_training  # torch and diffusers load with the first job, not with the app

            done = run_training(job.config, on_event=on_event, commands=job.commands, resume_from=job.resume_from)
            with self._lock:
                status.state = "stopped" if done.stopped_early else "done"
                status.run_dir, status.lora_path = done.run_dir, done.lora_path
        except StoppedEarly as exc:
            with self._lock:
                status.state, status.message = "stopped", str(exc)
        except LoraStudioError as exc:
            with self._lock:
                status.state, status.message = "failed", str(exc)
        except Exception as exc:  # the worker must survive anything; the traceback goes to the log
            log.exception("training job %s failed", status.name)
            with self._lock:
                status.state = "failed"
                status.message = f"unexpected failure ({type(exc).__name__}: {exc}); details are in the log"

    def _render_regularization(self, job: _Job, on_event) -> None:
        from .reg_images import RENDERING, render_for_config

        def progress(done: int, total: int) -> None:
            on_event(PreparingEvent(RENDERING, done, total))

        folder, items = render_for_config(job.config, progress, job.commands.take_stop)
        with self._lock:
            job.status.state = "done"
            job.status.message = (f"{len(items)} regularization images in `{folder}`: open that folder in the "
                                  "Dataset tab to see them; training with these settings reuses them.")  # fmt: skip


def run_on_fresh_thread(fn: Callable[..., T], *args, name: str = "lora-studio-torch") -> T:
    """Call `fn(*args)` on a new thread that ends with the call; return its result or raise its exception.

    Any long-lived thread that runs torch keeps its OpenMP thread team. With a second live team libgomp
    counts more threads than cores and stops spinning between parallel regions, so every later training
    in the process (a small model's many short ops) ran about 1.8x slower: 7.2 s -> 12.4 s for 40 demo
    steps on 2 cores. Jobs and the app's torch work (previews, exports) therefore run on threads that end.
    """
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # re-raised on the calling thread
            outcome["error"] = exc

    runner = threading.Thread(target=call, name=name)
    runner.start()
    runner.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _copy(status: JobStatus) -> JobStatus:
    lists = {name: list(getattr(status, name)) for name in ("losses", "validation", "samples")}
    return JobStatus(**{**status.__dict__, **lists})
