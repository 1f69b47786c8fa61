"""The run folder: one owner of its layout, one root, and an OS lock while a run is trained."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lora_studio.runs import RunError, RunFolder, list_runs, output_root, runs_root


def make_run(root, name="r") -> RunFolder:
    run = RunFolder.create(root, name)
    run.config.write_text('name = "r"\n')
    return run


def test_runs_live_under_the_home_never_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert runs_root() == (tmp_path / "home" / "runs").resolve()
    assert output_root("") == runs_root()
    assert output_root("elsewhere") == (tmp_path / "home" / "elsewhere").resolve()
    assert output_root(str(tmp_path / "abs")) == tmp_path / "abs"


def test_two_runs_started_in_one_second_get_two_folders(tmp_path):
    a, b = RunFolder.create(tmp_path, "x"), RunFolder.create(tmp_path, "x")
    assert a.path != b.path and a.path.is_dir() and b.path.is_dir()


def test_the_layout(tmp_path):
    run = RunFolder(tmp_path / "r-1")
    assert run.checkpoint("r", 100).relative_to(run.path).as_posix() == "checkpoints/r-step000100.safetensors"
    assert run.sample_path(100, 0.5, 42).relative_to(run.path).as_posix() == "samples/step-000100/s0.50-seed42.png"
    assert run.sample_path(7, 1, 1, prompt_index=2).name == "p2-s1.00-seed1.png"
    assert run.state_file.relative_to(run.path).as_posix() == "state/trainer.safetensors"
    assert run.final_lora("r").name == "r.safetensors"


def test_open_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(RunError, match="is not a run folder .* no config.toml"):
        RunFolder.open(tmp_path)


def test_a_cut_off_last_metrics_line_is_skipped(tmp_path):
    run = make_run(tmp_path)
    run.append_metrics({"step": 1, "loss": 0.5})
    run.append_metrics({"step": 2, "loss": 0.4})
    with open(run.metrics, "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    assert [row["step"] for row in run.read_metrics()] == [1, 2]
    assert run.last_metrics() == {"step": 2, "loss": 0.4}


def test_list_runs_leaves_out_folders_that_are_not_runs(tmp_path):
    make_run(tmp_path, "a")
    (tmp_path / "uploads").mkdir()
    (tmp_path / ".cache").mkdir()
    assert [r.name.split("-")[0] for r in list_runs(tmp_path)] == ["a"]


def test_a_locked_run_refuses_a_second_trainer_and_a_delete(tmp_path):
    run = make_run(tmp_path)
    held = run.lock()
    assert run.is_locked()
    with pytest.raises(RunError, match="is being trained right now .* will not train it"):
        run.lock()
    with pytest.raises(RunError, match="will not delete it"):
        run.delete()
    assert run.path.is_dir()
    held.release()
    assert not run.is_locked()
    run.delete()
    assert not run.path.exists()


def test_a_killed_trainer_leaves_no_stale_lock(tmp_path):
    """The OS drops the lock with the process: a crash never blocks the next resume."""
    run = make_run(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from lora_studio.runs import RunFolder; l = RunFolder({str(run.path)!r}).lock(); "
         "print('held', flush=True); import time; time.sleep(60)"],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run.is_locked()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 5
        while run.is_locked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not run.is_locked()
    finally:
        holder.kill()


def test_metrics_lines_are_json(tmp_path):
    run = make_run(tmp_path)
    run.append_metrics({"step": 1, "loss": float("0.25")})
    assert json.loads(run.metrics.read_text()) == {"step": 1, "loss": 0.25}
