"""How many CPU threads a training step uses, chosen by measuring, so a busy machine does not stall it.

torch splits each operation across one thread per core. When another program keeps a core busy (a
browser rendering the live page, a `yes > /dev/null` loop), every operation waits for the thread that
shares that core: the demo fell from 3.6 to 0.9 steps/s on 2 cores. One thread fewer avoids the wait
but costs ~20% on an idle machine, and OMP_WAIT_POLICY=PASSIVE halves the idle speed (threads sleep
between the demo's many small operations). So `ThreadTuner` times training steps at n and n-1 threads
now and then and keeps the faster; it checks again on a schedule and whenever steps slow down.
Figures: bench/busy_core.py, in the README.

`LORA_STUDIO_CPU_THREADS=N` fixes the count (no tuning); torch's OMP_NUM_THREADS is honoured the same way.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

THREADS_ENV = "LORA_STUDIO_CPU_THREADS"


def fixed_thread_count() -> int | None:
    """The count the user fixed with LORA_STUDIO_CPU_THREADS (or OMP_NUM_THREADS), else None."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                log.warning("%s=%r is not a whole number; ignored", name, value)
                continue
            if count >= 1:
                return count
    return None


class ThreadTuner:
    """Picks the faster of `most` and `most - 1` intra-op threads from timed steps, and keeps re-checking.

    Call `step_started()` before and `step_finished()` after each training step (only the step: saving
    and sampling would blur the comparison). A check times up to `trial` steps at each count, interleaved,
    and keeps the one with the lower median; it ends early when one count is clearly slower. Then
    `interval` steps run before the next check; the interval doubles while the choice holds (up to
    `max_interval`), and a check comes early when the median of the last `trial` steps is `slowdown`
    times the chosen count's. `set_threads` and `clock` are torch's and the wall clock unless a test
    passes its own."""

    def __init__(
        self,
        most: int,
        set_threads: Callable[[int], None],
        clock: Callable[[], float] = time.perf_counter,
        trial: int = 4,
        interval: int = 40,
        max_interval: int = 320,
        slowdown: float = 1.4,
        warmup: int = 2,
        clear: float = 1.5,
    ):
        self.candidates = [most, most - 1]
        self.set_threads, self.clock = set_threads, clock
        self.trial, self.first_interval, self.max_interval, self.slowdown = trial, interval, max_interval, slowdown
        self.clear = clear
        self.interval = interval
        self.chosen = most
        self.plan: list[int] = []  # thread counts of the steps still to time in this check
        self.timings: dict[int, list[float]] = {}
        self.recent: list[float] = []
        self.chosen_median: float | None = None
        self.until_check = warmup  # the first steps allocate and are slow: the first check comes after them
        self.started: float | None = None
        self.current = most

    def _use(self, threads: int) -> None:
        if threads != self.current:
            self.set_threads(threads)
            self.current = threads

    def step_started(self) -> None:
        if not self.plan and self.until_check <= 0:
            # The chosen count first, so that a clearly slower other count is left after one step.
            order = [self.chosen, *(c for c in self.candidates if c != self.chosen)]
            self.plan = [c for _ in range(self.trial) for c in order]  # interleaved: drift hits both
            self.timings = {c: [] for c in self.candidates}
        self._use(self.plan[0] if self.plan else self.chosen)
        self.started = self.clock()

    def step_finished(self) -> None:
        if self.started is None:
            return
        seconds, self.started = self.clock() - self.started, None
        if self.plan:
            self.timings[self.plan.pop(0)].append(seconds)
            if not self.plan or self._clearly_decided():
                self._decide()
            return
        self.until_check -= 1
        self.recent = (self.recent + [seconds])[-self.trial :]
        if (
            self.chosen_median
            and len(self.recent) == self.trial
            and statistics.median(self.recent) > self.slowdown * self.chosen_median
        ):
            self.until_check, self.interval = 0, self.first_interval  # the machine got busier (or freer)

    def _clearly_decided(self) -> bool:
        """One count's every step slower than `clear` times the other's slowest: the busy case, where
        each step at the wrong count costs twice or more, so the check ends at once."""
        first, second = (self.timings[c] for c in self.candidates)
        if not first or not second:
            return False
        return min(first) > self.clear * max(second) or min(second) > self.clear * max(first)

    def _decide(self) -> None:
        self.plan = []
        medians = {c: statistics.median(t) for c, t in self.timings.items()}
        best = min(medians, key=medians.get)
        self.interval = min(2 * self.interval, self.max_interval) if best == self.chosen else self.first_interval
        if best != self.chosen:
            log.info("CPU threads: %d (step medians %s)", best, {c: round(m, 4) for c, m in medians.items()})
        self.chosen, self.chosen_median = best, medians[best]
        self.until_check, self.recent = self.interval, []
        self._use(best)


class CpuThreads:
    """The training's thread policy on the CPU: a tuner when torch has 2+ threads and nobody fixed the count;
    restores torch's count when the training ends, so previews afterwards use every core."""

    def __init__(self, device_type: str, processes: int = 1):
        import torch

        self.torch = torch
        self.before = torch.get_num_threads()
        fixed = fixed_thread_count()
        if device_type == "cpu" and fixed is not None and fixed != self.before:
            torch.set_num_threads(fixed)
        on_cpu = device_type == "cpu" and processes == 1 and fixed is None and self.before >= 2
        self.tuner = ThreadTuner(self.before, torch.set_num_threads) if on_cpu else None

    def step_started(self) -> None:
        if self.tuner is not None:
            self.tuner.step_started()

    def step_finished(self) -> None:
        if self.tuner is not None:
            self.tuner.step_finished()

    def restore(self) -> None:
        if self.torch.get_num_threads() != self.before:
            self.torch.set_num_threads(self.before)
