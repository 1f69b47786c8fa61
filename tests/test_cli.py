"""The command line: exit codes and output of the commands that need no GPU and no app."""

import json

from PIL import Image

from lora_studio.cli import main


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
    assert "18 images" in out and "64x64: 18 images" in out and "Steps: 3 per epoch, 200 in all" in out


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


def test_app_refuses_network_host_without_auth(capsys):
    assert main(["--host", "0.0.0.0", "--no-browser"]) == 1
    assert "--auth user:password" in capsys.readouterr().err
