"""How handler errors reach the page: one sentence, never a traceback (which goes to the app's log.txt)."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

import gradio as gr

from ..errors import LoraStudioError
from ..jobs import run_on_fresh_thread
from ..paths import PROJECT_ROOT

log = logging.getLogger(__name__)
APP_LOG = PROJECT_ROOT / "runs" / "log.txt"  # beside the run folders (each run also has its own log.txt)
_attached: logging.Handler | None = None


def attach_app_log(path: Path = APP_LOG) -> Path:
    """Send lora_studio's log records, tracebacks included, to `path` (rotated at 1 MB, 3 kept); once per process."""
    global _attached
    if _attached is None or Path(_attached.baseFilename) != path.resolve():
        path.parent.mkdir(parents=True, exist_ok=True)
        if _attached is not None:
            logging.getLogger("lora_studio").removeHandler(_attached)
        _attached = logging.handlers.RotatingFileHandler(path, maxBytes=1_000_000, backupCount=3, encoding="utf-8")
        _attached.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("lora_studio")
        logger.addHandler(_attached)
        logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    return Path(_attached.baseFilename)


def shown(handler):
    """Run a handler; a LoraStudioError becomes a gr.Error sentence, anything else is logged and summarised.

    The handler runs on a thread of its own that ends with it (`jobs.run_on_fresh_thread`): Gradio's pool
    threads live on, and one that ran torch (a preview, an export) would slow every later training.
    """

    def wrapped(*args):
        try:
            return run_on_fresh_thread(handler, *args, name=f"lora-studio-{handler.__name__}")
        except LoraStudioError as exc:
            raise gr.Error(str(exc)) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            where = Path(_attached.baseFilename) if _attached is not None else "the terminal's log"
            message = f"An unexpected error occurred in {handler.__name__}; the details are in {where}."
            raise gr.Error(message) from None

    wrapped.__name__ = handler.__name__
    return wrapped
