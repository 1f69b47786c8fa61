"""The Gradio app: the Dataset, Train, Preview and Library tabs, the bundled models and presets, a base-model checker.

Handlers catch every error: a LoraStudioError is shown as its own sentence, anything else is
logged with its traceback and shown as one sentence pointing at the log.
"""

from __future__ import annotations

import ipaddress
import logging
import os

import gradio as gr

from ..config import list_presets, preset_description
from ..errors import LoraStudioError
from ..models import FAMILY_NAMES, bundled_models, describe_source
from . import dataset_tab, library_tab, preview_tab, train_tab
from .errors import attach_app_log

log = logging.getLogger(__name__)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# Small previews (the demo's 64 px) are shown scaled up with hard pixel edges; the file itself is unchanged.
CSS = "#preview-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def bundled_models_table() -> list[list[str]]:
    return [[name, what, "ready" if ready else "not installed"] for name, what, ready in bundled_models()]


def presets_table() -> list[list[str]]:
    return [[name, preset_description(name)] for name in list_presets()]


def check_base_model(source: str, allow_pickle: bool) -> str:
    """Markdown describing a base-model source, or the one-sentence reason it cannot be used."""
    if not source.strip():
        return "Enter `demo`, the path to a `.safetensors` checkpoint, or a diffusers folder."
    try:
        summary = describe_source(source.strip(), allow_pickle=allow_pickle)
    except LoraStudioError as exc:
        return f"**Cannot use this base model.** {exc}"
    except Exception:
        log.exception("checking base model %r failed", source)
        return "**Cannot use this base model.** An unexpected error occurred; details are in the log."
    lines = [
        f"**{summary.source}**: {FAMILY_NAMES[summary.family]} ({summary.kind}), "
        f"prediction type `{summary.prediction_type}`."
    ]
    lines += [f"- note: {note}" for note in summary.notes]
    return "\n".join(lines)


def build_app() -> gr.Blocks:
    with gr.Blocks(title="LoRA Studio") as app:
        gr.Markdown("# LoRA Studio\nTrain Stable Diffusion LoRAs on your own GPU, offline.")
        with gr.Tab("Dataset"):
            dataset = dataset_tab.build()
        with gr.Tab("Train"):
            train = train_tab.build()
        dataset_tab.connect(app, dataset, train["preset"], train["dataset.path"])
        with gr.Tab("Preview"):
            preview_tab.build()
        with gr.Tab("Library"):
            library_tab.build()
        with gr.Tab("Models"):
            gr.Markdown("## Bundled models")
            gr.Dataframe(
                value=bundled_models_table(),
                headers=["name", "what it is", "status"],
                interactive=False,
                elem_id="bundled-models",
            )
            gr.Markdown("## Check a base model")
            source = gr.Textbox(
                label="Base model", placeholder="demo, /path/to/model.safetensors or a diffusers folder"
            )
            allow_pickle = gr.Checkbox(label="Allow pickle (.ckpt) files from a source I trust", value=False)
            check = gr.Button("Check", elem_id="check-base")
            result = gr.Markdown(elem_id="check-result")
            check.click(check_base_model, inputs=[source, allow_pickle], outputs=result)
        with gr.Tab("Presets"):
            gr.Dataframe(
                value=presets_table(), headers=["preset", "when to use it"], interactive=False, elem_id="presets-table"
            )
    return app


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise LoraStudioError("--auth must be user:password with both parts non-empty; e.g. --auth me:s3cret")
    return user, password


def launch(
    host: str = "127.0.0.1",
    port: int | None = None,
    auth: str | None = None,
    open_browser: bool = True,
    block: bool = True,
) -> gr.Blocks:
    """Serve the app. Listening beyond this machine requires a password: training boxes hold private data.

    With `block=False` it returns the running app at once (tests close it with `.close()`).
    """
    credentials = parse_auth(auth or os.environ.get("LORA_STUDIO_AUTH"))
    if not is_loopback(host) and credentials is None:
        raise LoraStudioError(
            f"listening on {host} would expose LoRA Studio to your network without a password; "
            "add --auth user:password (or set LORA_STUDIO_AUTH), or keep the default host 127.0.0.1"
        )
    attach_app_log()
    app = build_app()
    app.launch(
        server_name=host,
        server_port=port,
        auth=credentials,
        share=False,
        inbrowser=open_browser,
        show_error=False,  # errors reach the page as our own sentences, never as tracebacks
        css=CSS,
        prevent_thread_lock=not block,
    )
    return app
