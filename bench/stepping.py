"""The one way the benchmarks time our trainer: real `training_step` calls on a prepared session."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lora_studio import buckets
from lora_studio.cpu_threads import CpuPolicy
from lora_studio.session import Session
from lora_studio.step import training_step
from lora_studio.train import run_steps


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_training_steps(session: Session, steps: int, warmup_steps: int = 2) -> tuple[float, list[float]]:
    """Warm-up seconds (a torch.compile happens there), then the seconds of each of `steps` timed steps.

    Steps walk the data order the trainer would, advancing the session's step and position. Each step
    has finished when timed: the GPU is synchronised after it (`training_step` leaves its loss on the device,
    and the trainer's loop reads losses in batches, so a real run waits less than this).
    """
    batches = buckets.iterate_batches(session.buckets, [1] * len(session.items), session.config.dataset.batch_size, 0)
    warm = time.perf_counter()
    for _ in range(warmup_steps):
        training_step(session, next(batches)[1])
    synchronize()
    warmup_s = time.perf_counter() - warm
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak of the timed steps, not of the compile

    def one_step() -> None:
        session.position, indices = next(batches)
        training_step(session, indices)
        synchronize()
        session.step += 1

    return warmup_s, time_each(one_step, steps)


def time_each(step: Callable[[], object], steps: int) -> list[float]:
    """The seconds each of `steps` calls of `step` took."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def time_run_steps(session: Session, steps: int) -> float:
    """Seconds per step of `steps` steps of the trainer's own loop (`train.run_steps`), as a run takes them:
    metrics written, commands polled, losses read in batches on a GPU; the GPU is synchronised once, at the end.
    The session should save, sample and validate nothing in that span (the benches' configs don't)."""
    batches = buckets.iterate_batches(session.buckets, [1] * len(session.items), session.config.dataset.batch_size,
                                      session.config.seed, session.position)  # fmt: skip
    session.total_steps = session.step + steps
    cpu_policy = CpuPolicy(session.device.type, session.accelerator.num_processes)
    synchronize()
    start = time.perf_counter()
    try:
        run_steps(session, batches, next(batches), start, session.step, cpu_policy)
        synchronize()
    finally:
        cpu_policy.restore()
    return (time.perf_counter() - start) / steps
