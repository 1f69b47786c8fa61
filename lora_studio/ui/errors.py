"""How handler errors reach the page: one sentence, never a traceback (which goes to the app's log.txt)."""

from __future__ import annotations

import inspect
import logging

import gradio as gr

from ..errors import LoraStudioError
from ..jobs import run_on_fresh_thread
from ..logs import app_log_location

log = logging.getLogger(__name__)


def shown(handler, *bound):
    """Run `handler(*bound, *args)`; a LoraStudioError becomes a gr.Error sentence, anything else is logged
    and summarised. `bound` carries what the server holds (the app's state), never request values.

    The handler runs on a thread of its own that ends with it (`jobs.run_on_fresh_thread`): Gradio's pool
    threads live on, and one that ran torch (a preview, an export) would slow every later training.
    """

    def wrapped(*args):
        try:
            return run_on_fresh_thread(handler, *bound, *args, name=f"lora-studio-{handler.__name__}")
        except LoraStudioError as exc:
            raise gr.Error(str(exc)) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            message = f"An unexpected error occurred in {handler.__name__}; the details are in {app_log_location()}."
            raise gr.Error(message) from None

    wrapped.__name__ = handler.__name__
    # Gradio reads the signature to inject event data (gr.SelectData): show it the handler's own, less `bound`.
    # Annotations are strings here (PEP 563); __wrapped__ lets typing resolve them in the handler's module.
    parameters = list(inspect.signature(handler).parameters.values())[len(bound) :]
    wrapped.__signature__ = inspect.signature(handler).replace(parameters=parameters)
    wrapped.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}
    wrapped.__wrapped__ = handler
    return wrapped
