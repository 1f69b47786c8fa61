"""The CPU thread policy (issue 17): the tuner keeps all threads on an idle machine, drops one when a core is
busy, follows the load as it changes; LORA_STUDIO_CPU_THREADS fixes the count; training restores it.

The tuner is driven by a simulated clock whose step times are the ones bench/busy_core.py measured on
2 cores (demo preset): idle 0.275 s at 2 threads and 0.36 s at 1; one core busy 1.15 s at 2, 0.45 s at 1.
"""

import torch

from lora_studio.cpu_threads import THREADS_ENV, CpuPolicy, ThreadTuner

IDLE = {2: 0.275, 1: 0.36}
BUSY = {2: 1.15, 1: 0.45}


class Machine:
    """A fake clock that advances by the step time of the current thread count under the current load, plus
    `switch_cost` on the first step after the count changed (oneDNN builds its kernels again)."""

    def __init__(self, load: dict[int, float], threads: int = 2, switch_cost: float = 0.0):
        self.load, self.threads, self.now, self.used = load, threads, 0.0, []
        self.switch_cost, self.switched, self.switches = switch_cost, False, 0

    def set_threads(self, n: int) -> None:
        self.threads, self.switched, self.switches = n, True, self.switches + 1

    def clock(self) -> float:
        return self.now

    def run(self, tuner: ThreadTuner, steps: int) -> float:
        spent = 0.0
        for _ in range(steps):
            tuner.step_started()
            self.used.append(self.threads)
            cost = self.load[self.threads] + (self.switch_cost if self.switched else 0.0)
            self.switched = False
            self.now += cost
            spent += cost
            tuner.step_finished()
        return spent


def test_an_idle_machine_keeps_every_thread_and_loses_under_2_percent():
    machine = Machine(IDLE)
    tuner = ThreadTuner(2, machine.set_threads, machine.clock)
    spent = machine.run(tuner, 700)
    assert tuner.chosen == 2 and machine.threads == 2
    assert spent / (700 * IDLE[2]) < 1.02  # the checks' slower steps cost under 2%


def test_checks_switch_rarely_so_a_costly_switch_stays_cheap_on_an_idle_machine():
    """A first interleaved version switched every step of a check and made the idle demo 29% slower."""
    machine = Machine(IDLE, switch_cost=0.1)
    tuner = ThreadTuner(2, machine.set_threads, machine.clock)
    spent = machine.run(tuner, 350)
    assert tuner.chosen == 2 and machine.switches <= 8  # two per check: to the other count and back
    assert spent / (350 * IDLE[2]) < 1.05  # issue 17: idle at most 5% slower


def test_a_busy_core_drops_to_one_thread_at_once_and_keeps_most_of_the_speed():
    machine = Machine(BUSY)
    tuner = ThreadTuner(2, machine.set_threads, machine.clock)
    spent = machine.run(tuner, 700)
    # 2 warm-up and 4 timed steps at 2 threads, then per check one untimed and one timed step at 2, at most.
    assert tuner.chosen == 1 and machine.used[6:].count(2) <= 8
    assert 700 / spent >= 0.95 / BUSY[1]  # within 5% of the best a fixed single thread would do


def test_the_tuner_follows_the_load_when_it_changes():
    machine = Machine(IDLE)
    tuner = ThreadTuner(2, machine.set_threads, machine.clock)
    machine.run(tuner, 400)
    assert tuner.chosen == 2
    machine.load = BUSY  # a browser starts rendering
    machine.run(tuner, 20)
    assert tuner.chosen == 1 and machine.used[-10:] == [1] * 10
    machine.load = IDLE  # and stops; the next scheduled check (at most 320 steps later) finds out
    machine.run(tuner, 400)
    assert tuner.chosen == 2 and machine.used[-40:].count(2) >= 35


def test_a_fixed_count_is_applied_and_not_tuned_and_training_restores_the_count(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(THREADS_ENV, "1")
    threads = CpuPolicy("cpu")
    try:
        assert threads.tuner is None and torch.get_num_threads() == 1
    finally:
        threads.restore()
    assert torch.get_num_threads() == before
    monkeypatch.setenv(THREADS_ENV, "")
    assert (CpuPolicy("cpu").tuner is not None) == (before >= 2)
    assert CpuPolicy("cuda").tuner is None  # a GPU step does not depend on CPU threads
    assert CpuPolicy("cpu", processes=2).tuner is None  # several processes share the cores already


def test_training_runs_under_the_policy_and_puts_the_count_back(tmp_path, monkeypatch):
    """A real demo training: LORA_STUDIO_CPU_THREADS reaches the steps, and the count is restored after."""
    from lora_studio import step as step_module
    from lora_studio.config import load_preset
    from lora_studio.train import run_training

    seen = []
    real = step_module.training_step

    def recording(session, indices, micro=0):
        seen.append(torch.get_num_threads())
        return real(session, indices, micro)

    monkeypatch.setattr("lora_studio.train.training_step", recording)
    monkeypatch.setenv(THREADS_ENV, "1")
    before = torch.get_num_threads()
    config = load_preset("demo-cpu").model_copy(deep=True)
    config.optimizer.max_train_steps, config.sample.every_n_steps, config.save.every_n_steps = 3, 0, 0
    config.output_dir, config.dataset.cache_dir = str(tmp_path), str(tmp_path / "cache")
    run_training(config)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
