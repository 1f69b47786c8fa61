"""How handler errors reach the page: one sentence, never a traceback (which goes to the app's log.txt).

The sentence is a notice (`notice_html`). Gradio also puts an "Error" badge over every output of the failed event,
and it stays until dismissed: an event whose outputs hold the person's work (a gallery, the runs table, the form)
names its message component in `show_progress_on`, so the badge and the spinner go there and the work stays in view.
"""

from __future__ import annotations

import html
import inspect
import logging
import re

import gradio as gr

from ..errors import LoraStudioError
from ..jobs import run_on_fresh_thread
from ..logs import app_log_location

log = logging.getLogger(__name__)


def notice_html(message: str) -> str:
    """A message as the page's error notice shows it. Gradio renders the notice as (sanitized) HTML, not Markdown,
    and runs its lines together, so a list of config problems read as one line with its backticks: the text is
    escaped (a file named `<b>x</b>.png` stays text), `code` spans become <code>, and each line stays a line."""
    text = html.escape(message, quote=False)
    return re.sub(r"`([^`\n]+)`", r"<code>\1</code>", text).replace("\n", "<br>")


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
            raise gr.Error(notice_html(str(exc))) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            message = f"An unexpected error occurred in {handler.__name__}; the details are in {app_log_location()}."
            raise gr.Error(notice_html(message)) from None

    wrapped.__name__ = handler.__name__
    # Gradio reads the signature to inject event data (gr.SelectData): show it the handler's own, less `bound`.
    # Annotations are strings here (PEP 563); __wrapped__ lets typing resolve them in the handler's module.
    parameters = list(inspect.signature(handler).parameters.values())[len(bound) :]
    wrapped.__signature__ = inspect.signature(handler).replace(parameters=parameters)
    wrapped.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}
    wrapped.__wrapped__ = handler
    return wrapped
