"""What training tells its caller (events) and what the caller may ask of it (commands).

Training calls one `on_event(event)` callback; the UI, the CLI and the tests each pass their own.
Between steps it polls a `Commands` object, which another thread may set at any time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total_steps: int
    epoch: int
    loss: float
    smoothed_loss: float
    lr: float
    it_per_s: float
    eta_s: float
    run_dir: Path | None = None  # so a watcher (the app) can show the run's log from the first step


@dataclass(frozen=True)
class PreparingEvent:
    """Work before the first step that takes minutes (rendering regularization images), for a progress bar."""

    stage: str  # what is being done, as the page says it: "rendering regularization images"
    done: int
    total: int


@dataclass(frozen=True)
class SampleEvent:
    step: int
    images: list[Path]  # one file per (prompt, strength, seed)
    strengths: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationEvent:
    step: int
    loss: float  # the mean over held-out images and fixed timesteps
    per_image: dict[str, float]  # image path -> its loss


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    lora_path: Path
    state_dir: Path | None


@dataclass(frozen=True)
class DoneEvent:
    step: int
    run_dir: Path
    lora_path: Path
    stopped_early: bool


@dataclass(frozen=True)
class ErrorEvent:
    step: int
    message: str


Event = ProgressEvent | PreparingEvent | SampleEvent | ValidationEvent | CheckpointEvent | DoneEvent | ErrorEvent


class Commands:
    """Thread-safe requests: stop (after the current step, saving first), save now, sample now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[str] = set()

    def _request(self, name: str) -> None:
        with self._lock:
            self._pending.add(name)

    def _take(self, name: str) -> bool:
        with self._lock:
            if name in self._pending:
                self._pending.discard(name)
                return True
            return False

    def request_stop(self) -> None:
        self._request("stop")

    def request_save(self) -> None:
        self._request("save")

    def request_sample(self) -> None:
        self._request("sample")

    def take_stop(self) -> bool:
        return self._take("stop")

    def take_save(self) -> bool:
        return self._take("save")

    def take_sample(self) -> bool:
        return self._take("sample")
