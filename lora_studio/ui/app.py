"""The Gradio app: the Dataset, Train, Preview and Library tabs, the bundled models and presets, a base-model checker.

Handlers catch every error: a LoraStudioError is shown as its own sentence, anything else is
logged with its traceback and shown as one sentence pointing at the log. What the app holds lives in
one `AppState` built here; the trust boundary (roots, Host/Origin checks, caps, auth) is set up in
`launch`. README "Security" says what is exposed and how it is protected.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import os
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from ..catalogue import bundled_models, describe_source
from ..config import list_presets, preset_description
from ..errors import LoraStudioError
from ..logs import attach_app_log
from ..models import FAMILY_NAMES
from ..paths import Roots, captioners_dir
from . import dataset_tab, library_tab, preview_tab, train_tab
from .errors import shown
from .guard import LoginThrottle, RequestGuard
from .state import DEFAULT_MAX_UPLOAD_MB, AppState, confined_base
from .tracker_frames import TrackerFrames

log = logging.getLogger(__name__)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# Small previews (the demo's 64 px) are shown scaled up with hard pixel edges; the file itself is unchanged.
CSS = "#preview-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
GRADIO_CACHE_CLEANUP = (3600, 3600)  # every hour, delete Gradio's temp copies (uploads, images) over an hour old


def bundled_models_table() -> list[list[str]]:
    return [[name, what, "ready" if ready else "not installed"] for name, what, ready in bundled_models()]


def captioners_table() -> list[list[str]]:
    """The captioning models in models/captioners/ (the Dataset tab's captioner picker lists the same)."""
    from ..captioner import list_captioners

    return [[info.name, "WD14 tagger (ONNX)" if info.kind == "tagger" else f"image-to-text ({info.model_type})",
             str(info.path)] for info in list_captioners()]  # fmt: skip


def presets_table() -> list[list[str]]:
    return [[name, preset_description(name)] for name in list_presets()]


def check_base_model(app: AppState, source: str, allow_pickle: bool) -> str:
    """Markdown describing a base-model source (inside the app's roots), or the one-sentence reason it cannot be
    used."""
    if not (source or "").strip():
        return "Enter `demo`, the path to a `.safetensors` checkpoint, or a diffusers folder."
    try:
        summary = describe_source(confined_base(app.roots, source), allow_pickle=allow_pickle)
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


def build_app(app: AppState | None = None) -> gr.Blocks:
    """The page, wired to one AppState (default: the home's folders)."""
    app = app or AppState(Roots.default())
    with gr.Blocks(title="LoRA Studio", delete_cache=GRADIO_CACHE_CLEANUP) as blocks:
        gr.Markdown("# LoRA Studio\nTrain Stable Diffusion LoRAs on your own GPU, offline.")
        # Each tab reads the server's lists (runs, LoRA files, presets, models) again when the page loads and when
        # the tab is selected: they change while the app runs (a training ends, a file is copied in).
        with gr.Tab("Dataset") as dataset_page:
            dataset = dataset_tab.build()
        with gr.Tab("Train") as page:
            train = train_tab.build(app, refreshed_on=[blocks.load, page.select])
        dataset_tab.connect(app, blocks, dataset, train["preset"], train["dataset.path"],
                            train["dataset.caption_extension"], dataset_page, train["dataset.subsets"])
        with gr.Tab("Preview") as page:
            preview_tab.build(app, refreshed_on=[blocks.load, page.select])
        with gr.Tab("Library") as page:
            library_tab.build(app, refreshed_on=[blocks.load, page.select])
        with gr.Tab("Models"):
            build_models_tab(app)
        with gr.Tab("Presets") as page:
            presets = gr.Dataframe(
                value=presets_table(), headers=["preset", "when to use it"], interactive=False, elem_id="presets-table"
            )
            gr.on([blocks.load, page.select], shown(presets_table), None, presets, show_progress="hidden", queue=False)
    blocks.lora_studio = app  # for tests and scripts that drive a launched app
    return blocks


def build_models_tab(app: AppState) -> None:
    gr.Markdown("## Bundled models")
    gr.Dataframe(
        value=bundled_models_table(), headers=["name", "what it is", "status"], interactive=False,
        elem_id="bundled-models",
    )  # fmt: skip
    gr.Markdown(f"## Captioners\nCaptioning models in `{captioners_dir()}`, one folder each (a transformers "
                "image-to-text model such as BLIP or Florence-2, or a WD14 tagger: model.onnx + selected_tags.csv); "
                "the Dataset tab captions with them.")  # fmt: skip
    captioners = gr.Dataframe(value=captioners_table, headers=["name", "kind", "folder"], interactive=False,
                              elem_id="captioners")  # fmt: skip
    gr.Button("Rescan captioners", size="sm").click(captioners_table, None, captioners)
    gr.Markdown("## Check a base model")
    source = gr.Textbox(label="Base model", placeholder="demo, /path/to/model.safetensors or a diffusers folder")
    allow_pickle = gr.Checkbox(label="Allow pickle (.ckpt) files from a source I trust", value=False)
    check = gr.Button("Check", elem_id="check-base")
    result = gr.Markdown(elem_id="check-result")
    check.click(shown(check_base_model, app), inputs=[source, allow_pickle], outputs=result)


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
    user, sep, password = auth.strip().partition(":")
    if not sep or not user or not password:
        raise LoraStudioError("--auth must be user:password with both parts non-empty; e.g. --auth me:s3cret")
    return user, password


def read_auth_file(path: str | os.PathLike) -> str:
    """user:password from the first line of a file (kept out of `ps`, unlike --auth)."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        raise LoraStudioError(
            f"--auth-file {path} cannot be read, or is empty; put user:password on its first line."
        ) from None


def launch(
    host: str = "127.0.0.1",
    port: int | None = None,
    auth: str | None = None,
    open_browser: bool = True,
    block: bool = True,
    allow_dirs: tuple[str, ...] = (),
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    resume_queue: bool = False,
) -> gr.Blocks:
    """Serve the app. Listening beyond this machine requires a password: training boxes hold private data.

    `auth` is user:password (else LORA_STUDIO_AUTH). With `block=False` it returns the running app at once
    (tests close it with `.close()`).
    """
    credentials = parse_auth(auth or os.environ.get("LORA_STUDIO_AUTH"))
    loopback = is_loopback(host)
    if not loopback and credentials is None:
        raise LoraStudioError(
            f"listening on {host} would expose LoRA Studio to your network without a password; "
            "add --auth-file FILE (or set LORA_STUDIO_AUTH=user:password), or keep the default host 127.0.0.1"
        )
    if not loopback and not ssl_certfile:
        log.warning("listening on %s over plain HTTP: passwords and images cross the network unencrypted; "
                    "give --ssl-certfile and --ssl-keyfile to serve HTTPS", host)  # fmt: skip
    attach_app_log()
    roots = Roots.default(tuple(allow_dirs))
    state = AppState(roots, max_upload_mb=max_upload_mb)
    state.jobs.recover()  # what was queued or running when the app last stopped: the Train tab offers it
    if resume_queue:
        start_recovered_jobs(state)
    blocks = build_app(state)
    calm_queue(blocks)
    port = port or free_port_from(7860)
    blocks.launch(
        server_name=host,
        server_port=port,
        auth=LoginThrottle(*credentials).check if credentials else None,
        share=False,
        inbrowser=open_browser,
        show_error=False,  # errors reach the page as our own sentences, never as tracebacks
        css=CSS,
        prevent_thread_lock=not block,
        allowed_paths=roots.served(),
        max_file_size=f"{max_upload_mb}mb",
        app_kwargs={"middleware": [Middleware(RequestGuard, loopback=loopback, port=port), Middleware(TrackerFrames)]},
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        **run_history_off(),
    )
    return blocks


def run_history_off() -> dict:
    """launch()'s argument that turns Gradio's run history off, where this Gradio has one (later 6.x releases).

    The run history keeps every event's inputs in the browser's localStorage (dataset paths, captions, the whole Train
    form) and offers to copy them to a Hugging Face bucket: private data kept where the app does not manage it, and a
    cloud upload in an offline app. Each event also read and rewrote it whole, typing and the Train tab's polls
    included (~260 KB after a page load and one Check)."""
    return {"run_history": False} if "run_history" in inspect.signature(gr.Blocks.launch).parameters else {}


# Gradio's queue looks for new events every 1 ms while it has none, and for progress to send every 10 ms (its
# Windows values: 50 and 100 ms). On this 2-core machine that kept the app's event-loop thread at 7.7% of a core at
# rest (1.54 s of CPU in 20 s; 0.13 s with the Windows values), taking the GIL a thousand times a second beside a
# training's thread. With this and tracker_frames the demo trained from the page at 84% of the CLI's steps/s, 75%
# before both (bench/app_training.py, 3 rounds; README "From the app"). The cost: an event through the queue starts up
# to 50 ms later (the Train tab's poll skips the queue).
QUEUE_IDLE_SLEEP_S, QUEUE_PROGRESS_SLEEP_S = 0.05, 0.1


def calm_queue(blocks: gr.Blocks) -> None:
    """Gradio's queue at its Windows polling intervals (QUEUE_IDLE_SLEEP_S); a Gradio without those attributes is left
    as it is, with a warning (tests/test_app.py then fails, so the change gets looked at)."""
    queue = getattr(blocks, "_queue", None)
    names = ("sleep_when_free", "progress_update_sleep_when_free")
    if queue is None or not all(isinstance(getattr(queue, name, None), float) for name in names):
        log.warning("Gradio's queue has no %s: left at its own polling intervals", " / ".join(names))
        return
    queue.sleep_when_free, queue.progress_update_sleep_when_free = QUEUE_IDLE_SLEEP_S, QUEUE_PROGRESS_SLEEP_S


def start_recovered_jobs(state: AppState) -> None:
    """`--resume-queue`: queue every job from before the restart whose paths still lie inside the app's folders;
    one that does not stays offered in the Train tab with the reason in the log (the app starts either way)."""
    for record in state.jobs.recovered():
        try:
            train_tab.start_recovered(state, record.key)
        except LoraStudioError as exc:
            log.warning("not resuming the queued job %s: %s", record.name, exc)


def free_port_from(first: int, tries: int = 100) -> int:
    """The first free loopback port from `first` (Gradio's own search, made here so the Host check knows it)."""
    import socket

    for port in range(first, first + tries):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LoraStudioError(f"no free port from {first} to {first + tries - 1}; give one with --port")
