"""A queue that survives the app being killed: SIGKILL the app's process while one job trains and another waits,
start it again, and both are offered; resumed, the first run ends with the weights of an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import torch
from gradio_http import GradioHTTP
from safetensors.torch import load_file
from test_app import free_port

from lora_studio.ui.config_form import KEYS


def start_app(env: dict, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lora_studio.cli", "app", "--port", str(port), "--no-browser"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the app did not come up within 90 s"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


def records(home) -> list[dict]:
    folder = home / "runs" / ".queue"
    found = []
    for path in sorted(folder.glob("job-*.json")) if folder.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # caught between the temp file and the rename: read again next time
            continue
    return sorted(found, key=lambda r: r["created"])


def form(client: GradioHTTP, **changes) -> list:
    ok, values = client.call("preset_values", ["demo-cpu", "demo"])
    assert ok, values
    values = dict(zip(KEYS, values, strict=True))
    values.update({key.replace("__", "."): value for key, value in changes.items()})
    return list(values.values())


def test_a_killed_app_offers_its_queue_again_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "uploads").mkdir()
    env = {**os.environ, "LORA_STUDIO_HOME": str(home), "LORA_STUDIO_CPU_THREADS": "1", "PYTHONPATH": os.getcwd(),
           "GRADIO_TEMP_DIR": str(tmp_path / "uploads")}  # fmt: skip
    env.pop("LORA_STUDIO_MODELS", None)
    quick = {"sample__every_n_steps": 0, "validation__path": "", "save__every_n_steps": 4}
    port = free_port()
    app = start_app(env, port)
    try:
        client = GradioHTTP(f"http://127.0.0.1:{port}")
        assert client.call("start", form(client, name="first", optimizer__max_train_steps=12, **quick))[0]
        assert client.call("start", form(client, name="second", optimizer__max_train_steps=2, **quick))[0]
        deadline = time.monotonic() + 120
        while not (found := records(home)) or found[0]["saved_step"] < 4:
            assert time.monotonic() < deadline and app.poll() is None, "no state was saved within 120 s"
            time.sleep(0.1)
        app.send_signal(signal.SIGKILL)
        app.wait(timeout=30)
    finally:
        app.kill()
    running, queued = records(home)
    assert (running["name"], running["state"], queued["name"], queued["state"]) == (
        "first", "running", "second", "queued")  # fmt: skip

    port = free_port()
    app = start_app(env, port)
    try:
        client = GradioHTTP(f"http://127.0.0.1:{port}")
        ok, (picker,) = client.call("recovered_choices", [])
        labels = [label for label, _key in picker["choices"]]
        assert ok and labels[0].startswith("first · was running: resume from step ") and labels[1] == (
            "second · was queued")  # fmt: skip
        ok, (message, _picker) = client.call("start_all_recovered", [])
        assert ok and message == "Queued 2 job(s) from before the restart.", message
        deadline = time.monotonic() + 120
        while records(home) or len(list((home / "runs").glob("second-*/second.safetensors"))) != 1:
            assert time.monotonic() < deadline and app.poll() is None, "the queue did not finish within 120 s"
            time.sleep(0.2)
    finally:
        app.kill()
    (first_run,) = (home / "runs").glob("first-*")
    assert len(list((home / "runs").glob("first-*"))) == 1  # resumed in its own run, not run a second time
    metrics = [json.loads(line) for line in (first_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 12

    # The same run, never interrupted, in this process with the same thread count.
    from lora_studio.config import load_config
    from lora_studio.train import run_training

    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    monkeypatch.setenv("LORA_STUDIO_CPU_THREADS", "1")
    config = load_config(first_run / "config.toml", [f"output_dir={json.dumps(str(tmp_path / 'straight'))}"])
    straight = load_file(str(run_training(config).lora_path))
    resumed = load_file(str(first_run / "first.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
