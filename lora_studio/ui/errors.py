"""How handler errors reach the page: one sentence, never a traceback (which goes to the log)."""

from __future__ import annotations

import logging

import gradio as gr

from ..errors import LoraStudioError

log = logging.getLogger(__name__)


def shown(handler):
    """Run a handler; a LoraStudioError becomes a gr.Error sentence, anything else is logged and summarised."""

    def wrapped(*args):
        try:
            return handler(*args)
        except LoraStudioError as exc:
            raise gr.Error(str(exc)) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise gr.Error("An unexpected error occurred; the details are in the log.") from None

    wrapped.__name__ = handler.__name__
    return wrapped
