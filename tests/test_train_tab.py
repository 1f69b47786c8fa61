"""The Train tab's handlers: the form becomes a config, a job runs in the background, the page polls it."""

import time

import pytest

from lora_studio.errors import ConfigError, LoraStudioError
from lora_studio.ui import train_tab


@pytest.fixture
def fresh_manager(monkeypatch):
    monkeypatch.setattr(train_tab, "_manager", None)
    return train_tab


def test_form_to_config_reports_every_bad_field():
    config = train_tab.build_config("demo-cpu", "demo", "demo", 12, 2e-3, 4, "lora.alpha=2\n# a comment\n")
    assert (config.optimizer.max_train_steps, config.optimizer.learning_rate, config.lora.rank) == (12, 2e-3, 4)
    assert config.lora.alpha == 2 and config.base_model == "demo"
    with pytest.raises(ConfigError) as caught:
        train_tab.build_config("demo-cpu", "demo", "demo", 0, 1e-3, 0, "lora.alpah=2")
    problems = "\n".join(caught.value.problems)
    assert "max_train_steps" in problems and "lora.rank" in problems and "alpah" in problems


def test_start_poll_stop_resume(fresh_manager, tmp_path):
    tab = fresh_manager
    assert tab.stop() == "Nothing is running."
    assert tab.poll()[0].startswith("No training yet")
    advanced = f"output_dir='{tmp_path}'\ndataset.cache_dir='{tmp_path / 'cache'}'\nsample.every_n_steps=5\n"
    advanced += "sample.num_inference_steps=2\nsave.every_n_steps=0"
    form = ("demo-cpu", "demo", "demo", 400, 1e-3, 8, advanced)
    assert tab.start(*form).startswith("Job 1 (demo) started")
    manager = tab.manager()
    while (status := manager.current()) is None or status.step < 6:
        time.sleep(0.05)  # a busy loop would hold the GIL and starve the training thread
    assert tab.stop().startswith("Stopping")
    stopped = manager.wait(1)
    assert stopped.state == "stopped"
    line, losses, samples, log = tab.poll()
    assert "**stopped**" in line and len(losses) == stopped.step and samples and "prepared" in log
    assert tab.resume(*form).startswith(f"Job 2 resumes {stopped.run_dir.name} from step {stopped.step}")
    while (status := manager.current()) is None or status.id != 2 or status.step < stopped.step + 2:
        time.sleep(0.05)
    tab.stop()
    assert manager.wait(2).state == "stopped"


def test_resume_without_a_stopped_run_is_a_sentence(fresh_manager):
    with pytest.raises(LoraStudioError, match="no stopped run to resume"):
        fresh_manager.resume("demo-cpu", "demo", "demo", 10, 1e-3, 8, "")
