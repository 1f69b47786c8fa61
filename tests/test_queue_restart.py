"""Issue 19's walk in a real browser against the app as its own process: caption the demo dataset with a tiny
captioner, save a preset, queue two jobs, SIGKILL the app while the first trains, start it again, see both, start
them; the first resumes from its saved state and ends with the weights of a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file
from test_app import ARTIFACTS, browser_page, free_port, wait_for_text  # noqa: F401 - browser_page: a fixture
from tiny_captioners import save_tiny_tagger


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
        except (OSError, ValueError):  # read between the temp file and the rename: read again next time
            continue
    return sorted(found, key=lambda r: r["created"])


def fill(page, key: str, value) -> None:
    """A form field by its config key (cfg-<section>-<field>): a textbox or a number box."""
    field = page.locator(f"#cfg-{key.replace('.', '-')}").locator("textarea, input").first
    field.fill(str(value))
    field.press("Tab")  # Gradio takes the value on blur


# 50-80 s; faster, every run: test_jobs' restart tests (a killed run resumes bit-exactly, the queue waits),
# test_captioner's Dataset-tab captioning, test_user_presets' form-to-preset round trip
@pytest.mark.slow
@pytest.mark.browser
def test_caption_save_a_preset_queue_two_kill_the_app_restart_and_resume(browser_page, tmp_path, monkeypatch):  # noqa: F811
    home = tmp_path / "home"
    save_tiny_tagger(home / "models" / "captioners" / "tiny-wd14")
    (tmp_path / "uploads").mkdir()
    env = {**os.environ, "LORA_STUDIO_HOME": str(home), "LORA_STUDIO_CPU_THREADS": "1", "PYTHONPATH": os.getcwd(),
           "GRADIO_TEMP_DIR": str(tmp_path / "uploads")}  # fmt: skip
    env.pop("LORA_STUDIO_MODELS", None)
    port = free_port()
    app = start_app(env, port)
    page = browser_page
    try:
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
        # 1. Caption the demo dataset (its editable copy) with the tiny tagger: tags appended after the captions.
        wait_for_text(page, "#dataset-report", "24 images")
        page.locator("#dataset-caption-section > button").first.click()
        wait_for_text(page, "#dataset-captioner input", "tiny-wd14")
        page.locator("#dataset-caption-section").get_by_label("append").check()
        page.locator("#caption-all").click()
        wait_for_text(page, "#dataset-status", "Wrote 24 captions (24 images, mode append).")
        caption = sorted((home / "datasets" / "demo").glob("*.txt"))[0].read_text()
        assert caption.startswith("zkz") and caption.rstrip().endswith("^_^")
        # 2. Save the form as a preset, then queue two short jobs on the captioned dataset.
        page.get_by_role("tab", name="Train").click()
        wait_for_text(page, "#cfg-dataset-path textarea", str(home / "datasets" / "demo"))
        page.locator("#train-advanced > button").first.click()
        for section in ("general", "sample", "save", "validation"):
            page.locator(f"#train-section-{section} > button").first.click()
        for key, value in (("name", "first"), ("optimizer.max_train_steps", 12), ("sample.every_n_steps", 0),
                           ("save.every_n_steps", 4), ("validation.path", "")):  # fmt: skip
            fill(page, key, value)
        page.locator("#train-your-presets > button").first.click()
        page.locator("#train-preset-name").locator("textarea, input").first.fill("walk")
        page.locator("#train-save-preset").click()
        wait_for_text(page, "#train-preset-message", "Saved your preset")
        assert (home / "user-presets" / "walk.toml").is_file()
        page.locator("#train-start").click()
        wait_for_text(page, "#train-message", "(first) started")
        fill(page, "name", "second")
        fill(page, "optimizer.max_train_steps", 2)
        page.locator("#train-start").click()
        wait_for_text(page, "#train-message", "(second) queued")
        deadline = time.monotonic() + 120
        while not (found := records(home)) or found[0]["saved_step"] < 4:
            assert time.monotonic() < deadline and app.poll() is None, "no state was saved within 120 s"
            time.sleep(0.1)
        app.send_signal(signal.SIGKILL)  # 3. The app dies mid-job.
        app.wait(timeout=30)
    finally:
        app.kill()
    assert [(r["name"], r["state"]) for r in records(home)] == [("first", "running"), ("second", "queued")]

    port = free_port()
    app = start_app(env, port)  # 4. Started again: both jobs are offered.
    try:
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
        page.get_by_role("tab", name="Train").click()
        wait_for_text(page, "#train-status", "2 job(s) from before the restart wait")
        wait_for_text(page, "#train-recovered-jobs input", "first · was running: resume from step")
        page.screenshot(path=str(ARTIFACTS / "train-tab-after-restart.png"), full_page=True)
        page.locator("#train-recovered-jobs input").click()
        page.get_by_role("option", name="second · was queued").wait_for(timeout=10_000)
        page.keyboard.press("Escape")
        page.locator("#train-recovered-all").click()
        wait_for_text(page, "#train-message", "Queued 2 job(s) from before the restart.")
        page.locator("#train-recovered").wait_for(state="hidden", timeout=10_000)  # none waits now
        deadline = time.monotonic() + 120
        while records(home) or len(list((home / "runs").glob("second-*/second.safetensors"))) != 1:
            assert time.monotonic() < deadline and app.poll() is None, "the queue did not finish within 120 s"
            time.sleep(0.2)
        wait_for_text(page, "#train-status", "done")
    finally:
        app.kill()
    (first_run,) = (home / "runs").glob("first-*")  # resumed in its own run folder, not run a second time
    metrics = [json.loads(line) for line in (first_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 12

    # 5. The same run, never interrupted, in this process with the same thread count: equal weights.
    from lora_studio.config import load_config
    from lora_studio.train import run_training

    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    monkeypatch.setenv("LORA_STUDIO_CPU_THREADS", "1")
    config = load_config(first_run / "config.toml", [f"output_dir={json.dumps(str(tmp_path / 'straight'))}"])
    straight = load_file(str(run_training(config).lora_path))
    resumed = load_file(str(first_run / "first.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
