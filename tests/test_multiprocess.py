"""The multi-process path: two CPU processes (gloo), launched as `accelerate launch` would, split each batch.

Both ranks must end with identical LoRA weights, equal (within float tolerance) to one process
training on the combined batch, with the same rate at every step; a run stopped on two processes
resumes on one; and the CLI itself runs under the launcher.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_studio.config import TrainConfig, save_config
from lora_studio.resume import lora_state_dicts
from lora_studio.state import load_state
from lora_studio.train import prepare, run_training, train

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from safetensors.torch import save_file
    from lora_studio.config import TrainConfig
    from lora_studio.events import Commands, ProgressEvent
    from lora_studio.resume import lora_state_dicts
    from lora_studio.train import prepare, train

    for job in json.loads(open(sys.argv[1]).read()):  # one training after another in the same two processes
        config = TrainConfig.model_validate(job["config"])
        commands = Commands()

        def on_event(event, stop_at=job["stop_at"], commands=commands):  # events reach the main process; the stop
            if isinstance(event, ProgressEvent) and event.step == stop_at:  # is then agreed by all
                commands.request_stop()

        session = prepare(config, on_event, commands)
        train(session)
        flat = {f"{part}/{k}": v.contiguous() for part, sd in lora_state_dicts(session).items() for k, v in sd.items()}
        save_file(flat, job["out"].format(rank=session.accelerator.process_index))
    """
)


def run_two_processes(folder, jobs: list[tuple[TrainConfig, int | None]]) -> list[tuple[dict, dict]]:
    """Train each (config, step to stop after or None) in turn in two CPU processes, as `accelerate launch` would,
    in one launch (starting two processes costs ~9 s here); the LoRA tensors of each rank, per job."""
    outs = [str(folder / f"job{n}-rank{{rank}}.safetensors") for n in range(len(jobs))]
    plan = [{"config": config.model_dump(mode="json"), "stop_at": stop_at, "out": out}
            for (config, stop_at), out in zip(jobs, outs, strict=True)]  # fmt: skip
    (folder / "jobs.json").write_text(json.dumps(plan))
    (folder / "run.py").write_text(SCRIPT)
    torchrun(str(folder / "run.py"), str(folder / "jobs.json"))
    return [(load_file(out.format(rank=0)), load_file(out.format(rank=1))) for out in outs]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two processes of `args` under torchrun, the launcher `accelerate launch --multi_gpu` runs; without
    a GPU accelerate then uses gloo. One thread each, as the 2 cores hold both."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def four_images(folder):
    folder.mkdir()
    for i in range(4):
        image = Image.new("RGB", (32, 32), (50 * i, 200 - 40 * i, 90))
        image.paste((255, 255, 255), (0, 0, 8 + 4 * i, 8))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    return folder


def lora_of(session) -> dict:
    return {f"{part}/{k}": v for part, sd in lora_state_dicts(session).items() for k, v in sd.items()}


def assert_close_loras(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        # Sums split across processes round differently (~1e-7); Adam's first steps, which divide by
        # sqrt(v), can magnify that to ~1e-5 in a weight, far below any visible effect.
        torch.testing.assert_close(actual[key], value, rtol=1e-3, atol=1e-4)
    assert any(v.abs().sum() > 0 for k, v in expected.items() if "lora_B" in k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(tmp_path, tiny_folders, data, batch_size, name):
    return TrainConfig.model_validate(
        {
            "name": name,
            "base_model": str(tiny_folders["sd1"]),
            "output_dir": str(tmp_path / "runs"),
            "mixed_precision": "no",
            "seed": 3,
            "dataset": {
                "path": str(data),
                "resolution": 32,
                "min_bucket_reso": 32,
                "max_bucket_reso": 32,
                "enable_bucket": False,
                "batch_size": batch_size,
                "cache_dir": str(tmp_path / "cache"),
                "trigger_word": "zkz",
            },
            "lora": {"rank": 4, "alpha": 4.0},
            "optimizer": {
                # Epochs, not steps: each step of two processes consumes two batches of the global order.
                "max_train_steps": None,
                "max_train_epochs": 3,
                "learning_rate": 1e-2,
                "text_encoder_lr": 1e-2,
                # A decaying rate: accelerate steps a prepared scheduler once per process per step unless
                # the schedule is stretched to match, which a constant rate would not reveal.
                "lr_scheduler": "linear",
            },
            "save": {"every_n_epochs": 0, "save_state": False},
            "sample": {"every_n_steps": 0},
        }
    )


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_folders) -> dict:
    """The two-process trainings the tests below check, in one launch: a whole run (batch 2 on each process) and
    one stopped after step 1 of 3 with its state saved."""
    root = tmp_path_factory.mktemp("two-processes")
    data = four_images(root / "data")
    whole = config_for(root / "whole", tiny_folders, data, 2, "two")
    stopped = config_for(root / "stopped", tiny_folders, data, 2, "two").model_copy(deep=True)
    stopped.save.save_state = True
    (whole_ranks, _) = run_two_processes(root, [(whole, None), (stopped, 1)])
    return {"data": data, "whole": root / "whole" / "runs", "ranks": whole_ranks, "stopped": root / "stopped" / "runs"}


def test_two_processes_equal_one_process_with_the_combined_batch(tmp_path, tiny_folders, two_process_runs):
    single = prepare(config_for(tmp_path, tiny_folders, two_process_runs["data"], 4, "one"))
    train(single)

    rank0, rank1 = two_process_runs["ranks"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "both ranks hold identical weights"
    assert_close_loras(rank0, lora_of(single))
    rates = {"one": logged_rates(tmp_path / "runs"), "two": logged_rates(two_process_runs["whole"])}
    assert rates["two"] == rates["one"] and rates["one"][0] > rates["one"][-1]
    assert len(rates["one"]) == 3  # 3 epochs of one batch of 4 (one process) or two of 2 (two processes)


def test_a_two_process_run_resumes_on_one_process(tmp_path, tiny_folders, two_process_runs):
    """Stopped after 1 of 3 steps on two processes (batch 2 each), finished on one (batch 4): the same
    weights and rate at every step as one process throughout, though the saved schedule counted 2 a step.
    (A step uses the rate the schedule set after the step before, so the stop leaves two steps to see it.)"""
    one = config_for(tmp_path, tiny_folders, two_process_runs["data"], 4, "one").model_copy(deep=True)
    one.save.save_state = True
    single = prepare(one)
    train(single)

    (run_dir,) = two_process_runs["stopped"].iterdir()
    assert len(logged_rates(two_process_runs["stopped"])) == 1  # stopped after step 1
    resumed = run_training(one, resume_from=run_dir)

    assert resumed.step == 3
    assert_close_loras(load_state(run_dir / "state" / "trainer.safetensors")["lora"], lora_of(single))
    assert logged_rates(two_process_runs["stopped"]) == logged_rates(tmp_path / "runs")


def logged_rates(runs) -> list[float]:
    (metrics,) = runs.glob("*/metrics.jsonl")
    return [json.loads(line)["lr"] for line in metrics.read_text().splitlines()]


@pytest.mark.slow  # 20 s; the two-process trainer itself is run by the two tests above on every run
def test_the_cli_under_a_two_process_launch(tmp_path, tiny_folders):
    """`accelerate launch -m lora_studio.cli train CONFIG` (torchrun here): one run folder, one report."""
    config = config_for(tmp_path, tiny_folders, four_images(tmp_path / "data"), 2, "cli")
    save_config(config, tmp_path / "cli.toml")
    result = torchrun("-m", "lora_studio.cli", "train", str(tmp_path / "cli.toml"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(logged_rates(tmp_path / "runs")) == 3 and (run_dir / "cli.safetensors").is_file()
    assert result.stdout.count("finished at step 3") == 1, result.stdout  # the main process reports
    assert "0step [" not in result.stderr  # and no process draws an idle bar (the other rank gets no progress)
