"""The command line: exit codes and output of the commands that need no GPU and no app."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from lora_studio.cli import main
from lora_studio.config import load_preset
from lora_studio.errors import LoraStudioError
from lora_studio.state import load_state


def test_dataset_json_and_exit_codes(tmp_path, capsys):
    for i in range(3):
        Image.new("RGB", (320, 256), (i, 50, 50)).save(tmp_path / f"{i}.png")
    assert main(["dataset", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["items"] == 3 and report["errors"] == []
    assert report["buckets"] and set(report["buckets"][0]) == {"width", "height", "count"}
    assert all({"path", "message"} <= set(w) for w in report["warnings"])

    (tmp_path / "broken.png").write_text("not an image")
    assert main(["dataset", str(tmp_path), "--json"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert errors[0]["path"].endswith("broken.png")


def test_dataset_text_report_with_a_preset(capsys):
    assert main(["dataset", "demo", "--config", "demo-cpu"]) == 0
    out = capsys.readouterr().out
    steps = load_preset("demo-cpu").optimizer.max_train_steps
    assert "24 images" in out and "64x64: 24 images" in out and f"Steps: 3 per epoch, {steps} in all" in out


def test_config_prints_resolved_toml_and_reports_bad_fields(capsys):
    assert main(["config", "demo-cpu", "--set", "lora.rank=4"]) == 0
    assert "rank = 4" in capsys.readouterr().out
    assert main(["config", "demo-cpu", "--set", "lora.rank=0"]) == 1
    assert "`lora.rank` = 0" in capsys.readouterr().err


def test_detect_reports_family_or_a_clear_error(tiny_folders, tmp_path, capsys):
    assert main(["detect", str(tiny_folders["sdxl"])]) == 0
    assert "SDXL [sdxl] (diffusers folder)" in capsys.readouterr().out
    assert main(["detect", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "was not found" in err and "Traceback" not in err


def test_app_refuses_network_host_without_auth(capsys, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_AUTH", raising=False)
    assert main(["--host", "0.0.0.0", "--no-browser"]) == 1
    assert "--auth-file FILE (or set LORA_STUDIO_AUTH=user:password)" in capsys.readouterr().err
    assert main(["app", "--listen", "--no-browser"]) == 1
    assert "listening on 0.0.0.0" in capsys.readouterr().err


def test_auth_comes_from_a_file_kept_out_of_ps(tmp_path):
    from lora_studio.ui.app import read_auth_file

    secret = tmp_path / "auth"
    secret.write_text("me:s3cret\n")
    assert read_auth_file(secret) == "me:s3cret"
    secret.write_text("")
    with pytest.raises(LoraStudioError, match="--auth-file .* put user:password on its first line"):
        read_auth_file(secret)


def test_train_and_resume_from_the_command_line(tmp_path, tiny_folders, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 40, 40)).save(data / f"{i}.png")
    settings = [
        f"base_model={json.dumps(str(tiny_folders['sd1']))}",
        f"dataset.path={json.dumps(str(data))}",
        f"output_dir={json.dumps(str(tmp_path / 'runs'))}",
        "dataset.resolution=32",
        "dataset.min_bucket_reso=32",
        "dataset.max_bucket_reso=32",
        "dataset.enable_bucket=false",
        "mixed_precision='no'",
        "optimizer.max_train_steps=2",
        "sample.every_n_steps=0",
        "save.every_n_epochs=0",
        f"dataset.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
        "family='sd1'",
    ]
    args = ["train", "sd15-character"]
    for item in settings:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "finished at step 2" in out and "LoRA file:" in out
    run_dir = next((tmp_path / "runs").iterdir())
    assert (run_dir / "sd15-character.safetensors").is_file()
    assert main(["train", "--resume", str(run_dir), "--set", "optimizer.max_train_steps=3"]) == 0
    resumed = capsys.readouterr()
    assert "finished at step 3" in resumed.out and "3/3" in resumed.err  # the bar starts where the run was
    assert main(["train"]) == 2
    assert "give a config or preset" in capsys.readouterr().err

    # Failures: one sentence each, with what to do, and no empty progress bar drawn before it.
    assert main(["train", "--resume", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} is not a run folder") and "give the folder of the run" in err
    assert main([*args, "--set", f"dataset.path={json.dumps(str(tmp_path / 'none'))}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the dataset has 1 error(s)") and "step" not in err


def test_lora_tools_from_the_command_line(tmp_path, capsys):
    from lora_studio.models import load_base
    from lora_studio.paths import DEMO_MODEL_DIR

    sets = ["optimizer.max_train_steps=4", f"output_dir='{tmp_path}'", "sample.every_n_steps=0",
            f"dataset.cache_dir='{tmp_path / 'cache'}'", "lora.rank=8", "lora.alpha=8"]  # fmt: skip
    assert main(["train", "demo-cpu", *[a for s in sets for a in ("--set", s)]]) == 0
    lora = next(tmp_path.glob("demo-*/demo.safetensors"))
    capsys.readouterr()

    assert main(["inspect", str(lora), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd1" and info["format"] == "kohya" and info["rank"] == 8 and info["alpha"] == 8.0
    assert info["modules"] > 0 and info["metadata"]["ss_output_name"] == "demo"
    assert info["sshs_model_hash"] == info["metadata"]["sshs_model_hash"] and info["hashes_match"] is True

    assert main(["resize", str(lora), "--rank", "2", "-o", str(tmp_path / "r2.safetensors")]) == 0
    assert "total Frobenius error" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "r2.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rank"] == 2

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "demo", str(lora), "-o", str(merged), "--strength", "0.5", "--precision", "fp32"]) == 0
    assert load_base(merged, device="cpu", config=DEMO_MODEL_DIR).family == "sd1"

    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_step_saves_and_the_run_resumes(tmp_path, tiny_folders):
    """The first Ctrl-C (SIGINT) of `lora-studio train` finishes the step, saves the LoRA and the state, and
    exits 0 saying where it stopped; `--resume` then carries on from that step."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 40, 40)).save(data / f"{i}.png")
    sets = [f"base_model={json.dumps(str(tiny_folders['sd1']))}", f"dataset.path={json.dumps(str(data))}",
            f"output_dir={json.dumps(str(tmp_path / 'runs'))}", "dataset.resolution=32", "dataset.enable_bucket=false",
            "mixed_precision='no'", "optimizer.max_train_steps=100000", "sample.every_n_steps=0",
            "save.every_n_epochs=0", f"dataset.cache_dir={json.dumps(str(tmp_path / 'cache'))}"]  # fmt: skip
    command = [sys.executable, "-m", "lora_studio.cli", "train", "sd15-character"]
    command += [a for item in sets for a in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "runs").glob("*/metrics.jsonl")) or len(metrics_lines(tmp_path)) < 3:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err[-2000:]
    assert "stopping after this step and saving" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    stopped_at = load_state(run_dir / "state" / "trainer.safetensors")["step"]
    assert f"stopped at step {stopped_at}\n" in out and stopped_at >= 3
    assert (run_dir / f"checkpoints/sd15-character-step{stopped_at:06d}.safetensors").is_file()

    assert main(["train", "--resume", str(run_dir), "--set", f"optimizer.max_train_steps={stopped_at + 2}"]) == 0
    assert [line["step"] for line in metrics_lines(tmp_path)][-3:] == [stopped_at, stopped_at + 1, stopped_at + 2]


def metrics_lines(tmp_path) -> list[dict]:
    (metrics,) = (tmp_path / "runs").glob("*/metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def test_config_refuses_settings_that_cannot_train_together(capsys):
    """What training would refuse, `lora-studio config` (and the form's Check settings) refuses too."""
    assert main(["config", "demo-cpu", "--set", "dataset.random_crop=true"]) == 1
    assert "`dataset.random_crop` changes every step, so latents cannot be cached" in capsys.readouterr().err
    assert main(["config", "demo-cpu", "--set", "dataset.cache_text_embeddings=true",
                 "--set", "lora.train_text_encoder=true"]) == 1  # fmt: skip
    assert "`dataset.cache_text_embeddings` cannot be used" in capsys.readouterr().err


def test_an_unexpected_failure_names_the_log_that_holds_its_traceback(tmp_path, monkeypatch, capsys):
    """The CLI and the app share one rotating log (runs/log.txt in the home); an unexpected error prints its path."""
    from lora_studio import cli, logs

    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path))
    monkeypatch.setattr(logs, "_attached", None)

    def broken(args):
        raise KeyError("something odd")

    monkeypatch.setitem(cli.COMMANDS, "presets", broken)
    try:
        assert main(["presets"]) == 1
        err = capsys.readouterr().err
        log_file = tmp_path / "runs" / "log.txt"
        assert f"unexpected failure (KeyError: 'something odd'); the details are in {log_file}" in err
        assert "Traceback" not in err and "KeyError: 'something odd'" in log_file.read_text()
    finally:
        import logging

        logging.getLogger("lora_studio").removeHandler(logs._attached)


def test_output_cut_short_by_a_pipe_is_not_an_error():
    """`lora-studio dataset demo --json | head -2`: the reader may leave before the output is written. Closing the
    pipe before the command writes makes that certain: no traceback, no error, exit 0."""
    command = [sys.executable, "-m", "lora_studio.cli", "dataset", "demo", "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before a byte is written
    err = proc.stderr.read()
    assert proc.wait(120) == 0 and err == "", err
