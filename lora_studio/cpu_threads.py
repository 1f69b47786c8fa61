"""How many CPU threads a training step uses, chosen by measuring, so a busy machine does not stall it.

torch splits each operation across one thread per core. When another program keeps a core busy (a
browser rendering the live page, a `yes > /dev/null` loop), every operation waits for the thread that
shares that core: the demo fell from 3.6 to 0.9 steps/s on 2 cores. One thread fewer avoids the wait
but costs ~20% on an idle machine, and OMP_WAIT_POLICY=PASSIVE halves the idle speed (threads sleep
between the demo's many small operations). So `ThreadTuner` times training steps at n and n-1 threads
now and then and keeps the faster; it checks again on a schedule and whenever steps slow down.
Figures: bench/busy_core.py, in the README.

`LORA_STUDIO_CPU_THREADS=N` fixes the count (no tuning); torch's OMP_NUM_THREADS is honoured the same way.
`CpuPolicy` is what a training holds: the tuner and the kept heap (`cpu_memory.KeptHeap`) together.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

from .cpu_memory import KeptHeap

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
    and sampling would blur the comparison). The steps at the chosen count are timed as they run; a check
    runs up to `trial` steps at the other count and switches when their median is 5% faster. The first
    step after any switch is not timed: oneDNN builds its kernels again for a new thread count, and
    switching every step (an interleaved check) made the idle demo 29% slower. A check ends after one
    timed step when one count is `clear` times faster than the other (the busy case). Then `interval`
    steps run before the next check; the interval doubles while the choice holds (up to `max_interval`),
    and a check comes early when the chosen count's recent median is `slowdown` times what it was.
    `set_threads` and `clock` are torch's and the wall clock unless a test passes its own."""

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
        switch_gain: float = 0.95,
    ):
        self.candidates = [most, most - 1]
        self.set_threads, self.clock = set_threads, clock
        self.trial, self.first_interval, self.max_interval, self.slowdown = trial, interval, max_interval, slowdown
        self.clear, self.switch_gain = clear, switch_gain
        self.interval = interval
        self.chosen = self.current = most
        self.recent: list[float] = []  # the last `trial` timed steps at the chosen count
        self.baseline: float | None = None  # the chosen count's median when it was chosen
        self.probe: list[float] | None = None  # timed steps at the other count during a check
        self.untimed = warmup  # steps not to time: warm-up, and the first after a switch
        self.until_check = 0
        self.started: float | None = None

    def _use(self, threads: int) -> None:
        if threads != self.current:
            self.set_threads(threads)
            self.current = threads
            self.untimed = max(self.untimed, 1)

    def _other(self) -> int:
        return next(c for c in self.candidates if c != self.chosen)

    def step_started(self) -> None:
        if self.probe is None and self.until_check <= 0 and len(self.recent) == self.trial and not self.untimed:
            self.probe = []
            self._use(self._other())
        self.started = self.clock()

    def step_finished(self) -> None:
        if self.started is None:
            return
        seconds, self.started = self.clock() - self.started, None
        if self.untimed:
            self.untimed -= 1
            return
        if self.probe is not None:
            self.probe.append(seconds)
            if len(self.probe) == self.trial or self._clearly_decided():
                self._decide()
            return
        self.recent = (self.recent + [seconds])[-self.trial :]
        self.until_check -= 1
        if len(self.recent) < self.trial:
            return
        if self.baseline is None:
            self.baseline = statistics.median(self.recent)
        elif statistics.median(self.recent) > self.slowdown * self.baseline:
            self.until_check, self.interval = 0, self.first_interval  # the machine got busier

    def _clearly_decided(self) -> bool:
        """One count `clear` times faster than the other, step for step: the busy case, where each step at the
        wrong count costs twice or more, so the check ends at once."""
        return min(self.probe) > self.clear * max(self.recent) or self.clear * max(self.probe) < min(self.recent)

    def _decide(self) -> None:
        probe, self.probe = self.probe, None
        mine, theirs = statistics.median(self.recent), statistics.median(probe)
        if theirs < self.switch_gain * mine:
            log.info("CPU threads: %d (step median %.4f s; %.4f s at %d)", self._other(), theirs, mine, self.chosen)
            self.chosen, self.recent, self.baseline = self._other(), probe[-self.trial :], theirs
            self.interval = self.first_interval
        else:
            self.baseline = mine
            self.interval = min(2 * self.interval, self.max_interval)
        self.until_check = self.interval
        self._use(self.chosen)


class CpuPolicy:
    """The training's CPU policy: a thread tuner when torch has 2+ threads and nobody fixed the count, and freed
    memory kept for the next step (`cpu_memory.KeptHeap`). `restore()` gives back torch's thread count, so
    previews afterwards use every core, and the kept memory."""

    def __init__(self, device_type: str, processes: int = 1):
        import torch

        self.torch = torch
        self.heap = KeptHeap(device_type)
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
        self.heap.release()
