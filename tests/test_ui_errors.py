"""Handler errors reach the page as one sentence; the traceback goes to the app's log.txt."""

import threading

import gradio as gr
import pytest

from lora_studio import logs
from lora_studio.errors import ConfigError, LoraStudioError
from lora_studio.ui import errors


def test_our_errors_are_their_own_sentence_and_others_point_at_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "_attached", None)
    log_file = logs.attach_app_log(tmp_path / "log.txt")

    def bad_input():
        assert threading.current_thread() is not threading.main_thread()  # torch work never on a pooled thread
        raise LoraStudioError("the dataset folder is empty; add images first.")

    def bug():
        raise KeyError("unet.weird")

    with pytest.raises(gr.Error) as caught:
        errors.shown(bad_input)()
    assert caught.value.message == "the dataset folder is empty; add images first."
    with pytest.raises(gr.Error) as caught:
        errors.shown(bug)()
    assert caught.value.message == f"An unexpected error occurred in bug; the details are in {log_file}."
    assert "Traceback" not in caught.value.message
    logged = log_file.read_text()
    assert "Traceback" in logged and "KeyError: 'unet.weird'" in logged
    import logging

    logging.getLogger("lora_studio").removeHandler(logs._attached)


def test_bad_form_fields_are_listed_together():
    problem = ConfigError("the Train form", ["`lora.rank` = 0: must be at least 1", "`seed` = -1: too small"])

    def start_training():
        raise problem

    with pytest.raises(gr.Error) as caught:
        errors.shown(start_training)()
    assert "lora.rank" in caught.value.message and "seed" in caught.value.message


def test_the_error_notice_keeps_lines_and_code_and_shows_markup_as_text():
    from lora_studio.ui.errors import notice_html

    shown = notice_html("the Train form has 2 problem(s):\n  - `lora.rank` = 0: bad\n  - <b>x</b>.png & more")
    assert shown == ("the Train form has 2 problem(s):<br>  - <code>lora.rank</code> = 0: bad<br>"
                     "  - &lt;b&gt;x&lt;/b&gt;.png &amp; more")  # fmt: skip
