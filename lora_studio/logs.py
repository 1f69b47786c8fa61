"""The app's and the CLI's own log: one rotating file in the runs root, tracebacks included.

Each run also writes its own log.txt; this one is for what happens outside a run (the app's handlers,
a CLI command that fails before a run exists). Its path is printed wherever an error points to it.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from .runs import app_log_path

_attached: logging.handlers.RotatingFileHandler | None = None


def attach_app_log(path: Path | None = None) -> Path:
    """Send lora_studio's records at INFO and above to `path` (default: runs/log.txt in the home), rotated at
    1 MB with 3 kept; once per process (a second call with another path moves it)."""
    global _attached
    path = (path or app_log_path()).resolve()
    if _attached is None or Path(_attached.baseFilename) != path:
        path.parent.mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger("lora_studio")
        if _attached is not None:
            logger.removeHandler(_attached)
            _attached.close()
        _attached = logging.handlers.RotatingFileHandler(path, maxBytes=1_000_000, backupCount=3, encoding="utf-8")
        _attached.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _attached.setLevel(logging.INFO)
        logger.addHandler(_attached)
        logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    return path


def app_log_location() -> str:
    """Where the details of an unexpected error are: the attached log file, else the terminal."""
    return _attached.baseFilename if _attached is not None else "the terminal's output"
