"""Step losses read back from the training device in batches, so that a GPU step never waits for the host.

Reading a number off the GPU (`.item()`, `.tolist()`) waits until every kernel queued so far has run. Done at every
step, it stops the host from queueing step n+1 while the GPU still runs step n, and a step's launches, Python
and GPU work add up instead of overlapping. On an accelerator the losses of finished steps therefore stay on the
device and are read together, about once a second (the Train tab polls once a second) and before anything that
must see them: a checkpoint (so that no file is written from weights a NaN has already spoiled), validation,
samples, an epoch's per-image losses, a stop and the last step. The CPU has nothing to overlap: every step is
read at once there. Either way each step's numbers are the same ones, computed on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .session import TrainingError

READ_EVERY_S = 1.0  # on an accelerator: how often pending losses are read when nothing else asks for them
MOST_PENDING = 64  # ... and a bound on how many steps may wait, whatever their speed


@dataclass
class QueuedStep:
    """A finished optimizer step whose losses are still on the device."""

    step: int  # counted from 1, as the run's metrics and checkpoints count
    epoch: int
    lr: float
    loss: torch.Tensor  # 0-dim: the mean over micro-batches, averaged over processes
    samples: list[tuple[list[int], torch.Tensor]]  # this process's (item indices, per-sample losses) per micro-batch


@dataclass
class ReadStep:
    """A step's losses as numbers."""

    step: int
    epoch: int
    lr: float
    loss: float
    samples: list[tuple[list[int], list[float]]]


def reads_deferred(device: torch.device) -> bool:
    """Whether losses may wait on `device`: everywhere but the CPU, whose tensors are ready when a step returns."""
    return device.type != "cpu"


class PendingLosses:
    """The queued steps of one run, and when to read them."""

    def __init__(self, deferred: bool, clock: Callable[[], float] = time.perf_counter) -> None:
        self.deferred = deferred
        self.clock = clock
        self.queued: list[QueuedStep] = []
        self.last_read = clock()

    def add(self, step: QueuedStep) -> None:
        self.queued.append(step)

    def due(self) -> bool:
        """True when the queue should be read now, though nothing else needs it."""
        if not self.queued:
            return False
        if not self.deferred or len(self.queued) >= MOST_PENDING:
            return True
        return self.clock() - self.last_read >= READ_EVERY_S

    def read(self) -> list[ReadStep]:
        """Every queued step's losses, in one transfer from the device (the only place that waits for it)."""
        queued, self.queued, self.last_read = self.queued, [], self.clock()
        if not queued:
            return []
        parts = [q.loss.reshape(1) for q in queued] + [losses for q in queued for _, losses in q.samples]
        values = torch.cat([p.detach().float() for p in parts]).tolist()
        losses, rest = values[: len(queued)], iter(values[len(queued) :])
        steps = []
        for q, loss in zip(queued, losses, strict=True):
            samples = [(indices, [next(rest) for _ in indices]) for indices, _ in q.samples]
            steps.append(ReadStep(q.step, q.epoch, q.lr, loss, samples))
        return steps


class LossNotFinite(TrainingError):
    """The loss became NaN or infinite; `step` is the step it happened at (the loop may have queued more since)."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(
            f"the loss became {loss} at step {step}; likely causes: a learning rate too high, alpha much larger "
            "than rank, or fp16 overflow (try bf16 or fp32); the last checkpoint is kept"
        )
        self.step = step


def check_finite(step: ReadStep) -> None:
    """Raise LossNotFinite if the step's loss is NaN or infinite."""
    if not math.isfinite(step.loss):
        raise LossNotFinite(step.step, step.loss)
