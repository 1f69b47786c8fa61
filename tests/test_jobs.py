"""The app's job queue: one training at a time, progress recorded, stop then resume, failures as sentences."""

import threading
import time

import pytest
import torch
from test_train import tiny_config
from tiny_models import caption_images

from lora_studio.errors import LoraStudioError
from lora_studio.jobs import JobManager


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return caption_images(tmp_path_factory.mktemp("data"))


def test_jobs_run_one_at_a_time_and_record_progress(tmp_path, tiny_folders, images):
    manager = JobManager()
    first = manager.submit(tiny_config(tmp_path / "a", tiny_folders, images, sample={"every_n_steps": 4,
                                       "num_inference_steps": 2, "width": 32, "height": 32}))  # fmt: skip
    second = manager.submit(tiny_config(tmp_path / "b", tiny_folders, images))
    queued = manager.queued()
    assert [q.id for q in queued] in ([second], [first, second])  # the first may already be running
    done = manager.wait(first)
    assert done.state == "done" and done.step == done.total_steps == 8
    assert [s for s, _ in done.losses] == list(range(1, 9)) and done.sample_step == 8 and done.samples
    assert done.lora_path.is_file()
    assert manager.wait(second).state == "done"
    assert manager.current().id == second  # a reopened page sees the newest job


@pytest.mark.slow  # 8 s; test_train_tab's test_start_poll_stop_resume stops and resumes a job through the manager
def test_stop_then_resume(tmp_path, tiny_folders, images):
    manager = JobManager()
    config = tiny_config(tmp_path, tiny_folders, images, optimizer={"max_train_steps": 40})
    job = manager.submit(config)
    while (status := manager.current()) is None or status.step < 3:
        time.sleep(0.05)
    assert manager.stop()
    stopped = manager.wait(job)
    assert stopped.state == "stopped" and 3 <= stopped.step < 40
    resumed = manager.wait(manager.submit(config, resume_from=stopped.run_dir))
    assert resumed.state == "done" and resumed.step == 40 and resumed.run_dir == stopped.run_dir


def test_a_failing_job_reports_a_sentence_and_the_queue_goes_on(tmp_path, tiny_folders, images):
    manager = JobManager()
    bad = tiny_config(tmp_path, tiny_folders, images, base_model=str(tmp_path / "missing.safetensors"))
    failed = manager.wait(manager.submit(bad))
    assert failed.state == "failed" and "missing.safetensors" in failed.message
    assert manager.wait(manager.submit(tiny_config(tmp_path / "ok", tiny_folders, images))).state == "done"


def test_each_job_runs_on_its_own_thread_which_ends_with_it(tmp_path, tiny_folders, images):
    """A live thread that ran torch keeps an OpenMP team; a second live team made every later training in
    the process ~1.8x slower. So the worker starts a thread per job and the thread is gone afterwards."""
    seen = []
    manager = JobManager()
    original = manager._run_one

    def recording(job):
        seen.append(threading.current_thread())
        original(job)

    manager._run_one = recording
    first = manager.wait(manager.submit(tiny_config(tmp_path / "a", tiny_folders, images)))
    second = manager.wait(manager.submit(tiny_config(tmp_path / "b", tiny_folders, images)))
    assert first.state == second.state == "done"
    assert [t.name for t in seen] == ["lora-studio-job-1", "lora-studio-job-2"]
    assert not any(t.is_alive() for t in seen) and manager._worker.is_alive()


def test_run_on_fresh_thread_returns_raises_and_ends():
    from lora_studio.errors import LoraStudioError
    from lora_studio.jobs import run_on_fresh_thread

    threads = []

    def work(x):
        threads.append(threading.current_thread())
        if x < 0:
            raise LoraStudioError("negative")
        return x * 2

    assert run_on_fresh_thread(work, 21, name="t-1") == 42
    with pytest.raises(LoraStudioError, match="negative"):
        run_on_fresh_thread(work, -1)
    assert threading.current_thread() not in threads and not any(t.is_alive() for t in threads)


def test_queued_and_running_jobs_are_recorded_on_disk_until_they_end(tmp_path, tiny_folders, images):
    from lora_studio.job_store import JobStore

    store = JobStore(tmp_path / "runs" / ".queue")
    manager = JobManager(store)
    long = tiny_config(tmp_path / "a", tiny_folders, images, optimizer={"max_train_steps": 60},
                       save={"every_n_steps": 3, "save_state": True})  # fmt: skip
    first = manager.submit(long)
    second = manager.submit(tiny_config(tmp_path / "b", tiny_folders, images))
    while not (records := store.load()) or records[0].saved_step < 3:
        time.sleep(0.05)
    running, queued = records
    assert (running.state, queued.state) == ("running", "queued") and running.run_dir and queued.run_dir is None
    assert running.train_config() == long and running.name == long.name
    manager.stop()
    assert manager.wait(first).state == "stopped" and manager.wait(second).state == "done"
    assert store.load() == [] and list(store.folder.iterdir()) == []  # ended jobs leave nothing to pick up


def test_after_a_restart_the_jobs_wait_and_a_running_one_resumes_bit_exactly(tmp_path, tiny_folders, images):
    """As the app finds them after it was killed: one job was running (its run saved a state at step 5), one was
    queued, one had saved nothing yet; a damaged record is skipped. Resumed, the first ends with the weights of a
    run that was never interrupted."""
    from test_train import lora_tensors, stopper

    from lora_studio.job_store import JobStore
    from lora_studio.train import run_training

    config = tiny_config(tmp_path / "k", tiny_folders, images, optimizer={"max_train_steps": 12})
    straight = run_training(tiny_config(tmp_path / "s", tiny_folders, images, optimizer={"max_train_steps": 12}))
    commands, stop_at_5 = stopper(5)
    killed = run_training(config, on_event=stop_at_5, commands=commands)  # its state/ is what a kill leaves
    store = JobStore(tmp_path / "runs" / ".queue")
    running = store.new_record(config, "train", config.name, None)
    running.state, running.run_dir, running.saved_step = "running", str(killed.run_dir), 5
    queued = store.new_record(tiny_config(tmp_path / "q", tiny_folders, images), "train", "queued one", None)
    fresh = store.new_record(config, "train", "never saved", None)
    fresh.state = "running"
    for record in (running, queued, fresh):
        store.write(record)
        time.sleep(0.001)  # distinct keys and creation times
    (store.folder / "job-garbled.json").write_text("{not json")
    manager = JobManager(store)
    found = manager.recover()
    assert [r.key for r in found] == [running.key, queued.key, fresh.key]
    assert [(r.interrupted, r.resumable) for r in found] == [(True, True), (False, False), (True, False)]
    resumed = manager.wait(manager.start_recovered(running.key))
    assert resumed.state == "done" and resumed.run_dir == killed.run_dir and resumed.step == 12
    straight_weights, resumed_weights = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)
    assert manager.wait(manager.start_recovered(queued.key)).state == "done"
    assert manager.discard_recovered(fresh.key).name == "never saved"
    assert [p.name for p in store.folder.iterdir()] == ["job-garbled.json"]  # left alone, never fatal
    with pytest.raises(LoraStudioError, match="no longer waiting"):
        manager.start_recovered(running.key)
    assert JobManager(JobStore(tmp_path / "runs" / ".queue")).recover() == []


def test_resume_queue_starts_what_still_fits_the_app_folders_and_leaves_the_rest_offered(app_state, caplog):
    """`--resume-queue`: a recorded job whose dataset now lies outside the app's folders is not started (the log
    says why) and stays offered; the app starts either way."""
    from lora_studio.config import load_preset
    from lora_studio.job_store import JobStore
    from lora_studio.runs import queue_folder
    from lora_studio.ui.app import start_recovered_jobs
    from lora_studio.ui.state import confined_config

    store = JobStore(queue_folder(app_state.roots.runs))
    good = confined_config(app_state.roots, load_preset("demo-cpu", ["optimizer.max_train_steps=2",
                                                                     "sample.every_n_steps=0", "validation.path=''"]))
    outside = good.model_copy(update={"dataset": good.dataset.model_copy(update={"path": "/etc"})})
    for config, name in ((good, "good"), (outside, "moved")):
        store.write(store.new_record(config, "train", name, None))
        time.sleep(0.001)
    app_state.jobs.recover()
    with caplog.at_level("WARNING"):
        start_recovered_jobs(app_state)
    assert "not resuming the queued job moved" in caplog.text and "lies outside" in caplog.text
    assert app_state.jobs.wait(1).state == "done"
    assert [r.name for r in app_state.jobs.recovered()] == ["moved"]


def test_the_train_tabs_restart_section_keeps_the_picked_job_and_hides_when_none_waits(app_state):
    from lora_studio.config import load_preset
    from lora_studio.job_store import JobStore
    from lora_studio.runs import queue_folder
    from lora_studio.ui import train_tab

    store = JobStore(queue_folder(app_state.roots.runs))
    config = load_preset("demo-cpu", ["optimizer.max_train_steps=2"])
    for name in ("first", "second"):
        store.write(store.new_record(config, "train", name, None))
        time.sleep(0.001)
    app_state.jobs.recover()
    first, second = (r.key for r in app_state.jobs.recovered())
    section, picker = train_tab.recovered_view(app_state, second)  # a tab select with the second job picked
    assert section.visible and picker.value == second and len(picker.choices) == 2
    assert train_tab.recovered_view(app_state, "a key of nothing")[1].value == first
    for key in (first, second):
        app_state.jobs.discard_recovered(key)
    section, picker = train_tab.recovered_view(app_state, second)
    assert not section.visible and picker.choices == [] and picker.value is None
