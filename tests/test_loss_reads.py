"""Losses read from the device in batches (issue 17): the same numbers, files and weights as reading every step,
fewer waits, and a NaN still stops the run before a checkpoint holds its weights."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import loss_nan_at, tiny_config

from lora_studio import loss_reads
from lora_studio import train as train_module
from lora_studio.events import ErrorEvent, ProgressEvent
from lora_studio.loss_reads import MOST_PENDING, READ_EVERY_S, LossNotFinite, PendingLosses, QueuedStep, check_finite
from lora_studio.runs import RunFolder
from lora_studio.train import TrainingError, run_training


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """6 images of one size: with batches of 2, epochs end at steps 3, 6, 9..."""
    folder = tmp_path_factory.mktemp("six")
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a thing number {i}")
    return folder


def queued(step: int, loss: float, samples: list[tuple[list[int], list[float]]]) -> QueuedStep:
    return QueuedStep(step, 0, 1e-3, torch.tensor(loss), [(i, torch.tensor(v)) for i, v in samples])


def test_pending_losses_read_every_step_on_the_cpu_and_about_once_a_second_elsewhere():
    now = [0.0]
    cpu, gpu = PendingLosses(False, clock=lambda: now[0]), PendingLosses(True, clock=lambda: now[0])
    assert not cpu.due() and not gpu.due()  # nothing queued
    for pending in (cpu, gpu):
        pending.add(queued(1, 0.5, [([0, 1], [0.25, 0.75])]))
    assert cpu.due() and not gpu.due()
    now[0] = READ_EVERY_S
    assert gpu.due()
    read = gpu.read()
    assert not gpu.due() and gpu.read() == []
    assert [(r.step, r.loss, r.samples) for r in read] == [(1, 0.5, [([0, 1], [0.25, 0.75])])]
    for step in range(MOST_PENDING - 1):
        gpu.add(queued(step, 0.0, []))
    assert not gpu.due()  # the clock stands still: only the bound can make it due
    gpu.add(queued(MOST_PENDING, 0.0, []))
    assert gpu.due()
    assert loss_reads.reads_deferred(torch.device("cpu")) is False
    assert loss_reads.reads_deferred(torch.device("cuda")) is True  # a device object needs no GPU


def test_one_read_returns_each_steps_micro_batches_in_order():
    pending = PendingLosses(True)
    pending.add(queued(1, 1.0, [([4, 5], [1.0, 2.0]), ([6], [3.0])]))
    pending.add(queued(2, 2.0, [([0], [4.0]), ([1, 2, 3], [5.0, 6.0, 7.0])]))
    read = pending.read()
    assert read[0].samples == [([4, 5], [1.0, 2.0]), ([6], [3.0])]
    assert read[1].samples == [([0], [4.0]), ([1, 2, 3], [5.0, 6.0, 7.0])]
    check_finite(read[0])
    with pytest.raises(LossNotFinite, match="loss became inf at step 2") as raised:
        check_finite(queued_read(2, float("inf")))
    assert raised.value.step == 2
    with pytest.raises(LossNotFinite, match="loss became nan at step 3"):
        check_finite(queued_read(3, float("nan")))


def queued_read(step: int, loss: float) -> loss_reads.ReadStep:
    return loss_reads.ReadStep(step, 0, 1e-3, loss, [])


@pytest.fixture
def deferred(monkeypatch):
    """The CPU run reads losses as a GPU run does, and only when something needs them (the clock never calls)."""
    monkeypatch.setattr(train_module, "reads_deferred", lambda device: True)
    monkeypatch.setattr(loss_reads, "READ_EVERY_S", float("inf"))
    reads = []
    real = PendingLosses.read

    def counted(self):
        steps = real(self)
        if steps:
            reads.append([s.step for s in steps])
        return steps

    monkeypatch.setattr(PendingLosses, "read", counted)
    return reads


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def test_deferred_reads_write_the_same_metrics_image_losses_and_weights(tmp_path, tiny_folders, images, deferred):
    # 6 images in batches of 2: epochs end at steps 3 and 6; a checkpoint at 4 and 8 (the last step)
    per_step_events, deferred_events = [], []
    settings = {"validation": {"path": str(images), "every_n_steps": 0}}  # validation at the checkpoints
    config = tiny_config(tmp_path / "a", tiny_folders, images, **settings)
    with pytest.MonkeyPatch.context() as undo:
        undo.setattr(train_module, "reads_deferred", lambda device: False)
        per_step = run_training(config, on_event=per_step_events.append)
    assert deferred == [[s] for s in range(1, 9)]  # reading at once: each step by itself
    deferred.clear()
    config = tiny_config(tmp_path / "b", tiny_folders, images, **settings)
    batched = run_training(config, on_event=deferred_events.append)
    assert deferred == [[1, 2, 3], [4], [5, 6], [7, 8]]  # epoch ends, the checkpoint (and validation), the last step

    a, b = RunFolder(per_step.run_dir), RunFolder(batched.run_dir)
    assert without_time(a.read_metrics()) == without_time(b.read_metrics())
    assert [r["step"] for r in b.read_metrics() if "loss" in r] == list(range(1, 9))
    assert a.read_image_losses()["training"] == b.read_image_losses()["training"]
    first, second = load_file(str(per_step.lora_path)), load_file(str(batched.lora_path))
    assert all(torch.equal(first[k], second[k]) for k in first)
    progress = [(e.step, e.loss, e.epoch) for e in deferred_events if isinstance(e, ProgressEvent)]
    assert progress == [(e.step, e.loss, e.epoch) for e in per_step_events if isinstance(e, ProgressEvent)]


def test_a_nan_among_deferred_steps_stops_before_the_next_checkpoint(tmp_path, tiny_folders, images, deferred,
                                                                     monkeypatch):  # fmt: skip
    calls = loss_nan_at(monkeypatch, 5)
    events = []
    # no epoch ends before step 12 (12 items an epoch): only the checkpoint at step 6 reads the losses
    config = tiny_config(tmp_path, tiny_folders, images, dataset={"batch_size": 1, "repeats": 2},
                         save={"every_n_steps": 6}, optimizer={"max_train_steps": 12})  # fmt: skip
    with pytest.raises(TrainingError, match="loss became nan at step 5"):
        run_training(config, on_event=events.append)
    assert calls["n"] == 6  # the loop went on past the NaN, as a GPU run does, and caught it before saving
    assert deferred == [[1, 2, 3, 4, 5, 6]]
    assert isinstance(events[-1], ErrorEvent) and events[-1].step == 5
    run = RunFolder(next((tmp_path / "runs").iterdir()))
    assert not list(run.checkpoints.glob("*.safetensors")) and not run.final_lora("tiny").exists()
    assert [e.step for e in events if isinstance(e, ProgressEvent)] == [1, 2, 3, 4]  # the curve up to the NaN
