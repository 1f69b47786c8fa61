"""The core never imports gradio; the UI is only an edge."""

import pkgutil
import subprocess
import sys

import lora_studio

# Every module of the package but ui/, found rather than listed, so a new module is covered the day it lands.
CORE_MODULES = sorted(m.name for m in pkgutil.iter_modules(lora_studio.__path__) if m.name != "ui")


def test_the_list_covers_the_core():
    assert {"train", "step", "resume", "outputs", "session", "runs", "workflows", "sample", "export", "data",
            "cache", "jobs"} <= set(CORE_MODULES)  # fmt: skip


def test_core_modules_do_not_import_gradio():
    code = (
        "import importlib, sys\n"
        + "".join(f"importlib.import_module('lora_studio.{m}')\n" for m in CORE_MODULES)
        + "print('gradio' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_cli_commands_other_than_app_do_not_import_gradio(tmp_path):
    code = (
        "import sys\nfrom lora_studio.cli import main\n"
        "rc = main(['presets'])\n"
        "print('GRADIO' if 'gradio' in sys.modules else 'clean', rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "clean 0", result.stderr[-2000:]
