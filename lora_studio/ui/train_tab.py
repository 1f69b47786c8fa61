"""The Train tab: a base-model picker, a preset, every setting as a form field (the rarely changed ones
in an Advanced accordion), the estimated steps and GPU memory, Start/Stop/Resume, and a live view of
the running job (progress bar, loss curve, newest samples, log tail, queue).

The job runs in `jobs.JobManager`'s worker thread; a timer on the page polls it, so closing the page
does not stop training and a reopened page shows the running job again.
"""

from __future__ import annotations

import functools
import html
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..catalogue import describe_source, find_local_models, find_local_vaes
from ..config import (
    TrainConfig,
    delete_user_preset,
    import_config,
    list_presets,
    load_preset,
    save_user_preset,
    shortened,
    user_presets,
)
from ..data import dataset_report
from ..errors import ConfigError, LoraStudioError
from ..estimate import batch_guidance, estimate_memory
from ..models import FAMILY_NAMES, checked_vae_source
from ..paths import models_dir
from ..runs import RunFolder
from . import config_form
from .config_form import BASIC_KEYS, FIELD_BY_KEY, FIELDS, KEYS, SECTION_TITLES, config_from_form, form_values
from .errors import shown
from .state import AppState, confined_base, confined_config, uploaded_files

log = logging.getLogger(__name__)

# --- base models ---------------------------------------------------------------------------------


def summarize(source: str | Path):
    """describe_source's summary, or the LoraStudioError saying why the source cannot be used.

    Kept per (path, size, modification time): the page lists the models folder in two tabs and again on
    every rescan, and re-reading each checkpoint's header only makes sense once the file changed.
    """
    path = Path(source).expanduser()
    try:
        stat = path.stat()
    except OSError:
        return _summarize(str(source), 0, 0)
    return _summarize(str(source), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _summarize(source: str, _size: int, _mtime_ns: int):
    try:
        return describe_source(source)
    except LoraStudioError as exc:
        return exc
    except Exception as exc:  # a leftover or foreign file must never stop the listing (or the app's start)
        log.warning("reading %s failed", source, exc_info=True)
        return LoraStudioError(f"{Path(source).name} cannot be read ({type(exc).__name__}); see the app's log")


def describe_base(source: str) -> str:
    """'SD 1.x, epsilon' for a usable base, else 'cannot use: <the reason>'."""
    summary = summarize(source)
    if isinstance(summary, LoraStudioError):
        return f"cannot use: {summary}"
    return f"{FAMILY_NAMES.get(summary.family, summary.family)}, {summary.prediction_type}"


def base_choices() -> list[tuple[str, str]]:
    """(label, value) for the picker: the bundled demo, then the models folder, each with its family."""
    sources = ["demo", *(str(p) for p in find_local_models(models_dir()))]
    return [(f"{Path(s).name} · {describe_base(s)}", s) for s in sources]


OWN_VAE = "the base model's own"


def vae_choices() -> list[tuple[str, str]]:
    """(label, value) for the VAE pickers (the Train form's and the Preview's): the base model's own (""), then the
    VAE files of the models folder and its VAE/ subfolder."""
    return [(OWN_VAE, ""), *((path.name, str(path)) for path in find_local_vaes(models_dir()))]


def models_folder_table() -> list[list[str]]:
    rows = []
    for path in find_local_models(models_dir()):
        summary = summarize(path)
        if isinstance(summary, LoraStudioError):
            rows.append([path.name, "", "", "", f"cannot use: {summary}"])
        else:
            rows.append([path.name, summary.kind, FAMILY_NAMES.get(summary.family, summary.family),
                         summary.prediction_type, "; ".join(summary.notes)])  # fmt: skip
    return rows


def base_info(app: AppState, source: str) -> str:
    if isinstance(source, str | None) and not (source or "").strip():
        return "Pick the demo or a model from the folder, or type the path of a checkpoint or diffusers folder."
    try:
        source = confined_base(app.roots, source)
    except LoraStudioError as exc:
        return f"cannot use: {exc}"
    return f"**{Path(source).name}**: {describe_base(source)}"


def preset_choices():
    """The preset picker's list (bundled, then the person's own); the chosen preset stays."""
    return gr.update(choices=list_presets())


def refresh_models(base: str, vae: str):
    """The base-model and VAE pickers' lists read again (the chosen or typed values stay), the folder's table."""
    folder = models_dir()
    note = f"Models folder: `{folder}`" + ("" if folder.is_dir() else " (it does not exist yet; create it and "
                                             "put .safetensors files or diffusers folders in it)")  # fmt: skip
    return (gr.update(choices=base_choices(), value=base), gr.update(choices=vae_choices(), value=vae),
            models_folder_table(), note)  # fmt: skip


# --- the form, steps and memory ------------------------------------------------------------------


def preset_values(preset: str, dataset_path: str = "") -> list:
    """The preset's settings for the form; the dataset already chosen (e.g. opened in the Dataset tab) stays."""
    config = load_preset(preset or "")  # a request may send no preset: "choose one of ..." names them
    if (dataset_path or "").strip():
        config.dataset.path = dataset_path.strip()
    return form_values(config)


def estimate(app: AppState, *values) -> str:
    """Markdown with the run's total steps and a rough GPU memory figure, or every problem Start would meet:
    bad fields, settings that cannot train together, paths outside the app's folders."""
    try:
        config = config_from_form(list(values))
    except ConfigError as exc:
        return fix_first(exc.problems)
    problems = config.training_problems()
    if config.dataset.has_images():
        try:
            config = confined_config(app.roots, config)
        except LoraStudioError as exc:
            problems.append(str(exc))
    if problems:
        return fix_first(problems)
    lines = [steps_line(config), vae_line(config), memory_line(config)]
    return "\n\n".join(line for line in lines if line)


def vae_line(config: TrainConfig) -> str:
    """What the `vae` setting names, read from its header or config (no weights), or why it cannot be used."""
    if not config.vae.strip():
        return ""
    try:
        path, tensors = checked_vae_source(config.vae)
    except LoraStudioError as exc:
        return f"**VAE:** cannot use: {exc}"
    what = f"a VAE file of {tensors} tensors" if tensors else "a diffusers VAE folder"
    return f"**VAE:** `{path.name}`, {what}; it encodes the training images and decodes the samples."


def fix_first(problems: list[str]) -> str:
    return "**Fix these settings first:**\n" + "\n".join(f"- {p}" for p in problems)


def steps_line(config: TrainConfig) -> str:
    if not config.dataset.has_images():
        return "**Steps:** choose a dataset folder (field `path`) to count them."
    try:
        report = dataset_report(config)
    except LoraStudioError as exc:
        return f"**Steps:** cannot count yet: {exc}"
    if not report["items"]:
        return f"**Steps:** the dataset `{report['path']}` has no usable images yet."
    line = (f"**Steps:** {report['total_steps']:,} in all ({report['steps_per_epoch']} per epoch; "
            f"{report['images_per_epoch']} images per epoch, batch {report['batch_size']})")  # fmt: skip
    if report["validation_images"]:
        line += f"; {len(report['validation_images'])} images held out for the validation loss"
    if report["errors"]:
        line += f"; {len(report['errors'])} file(s) will be skipped, see the Dataset tab"
    return line + "."


def memory_line(config: TrainConfig) -> str:
    if config.base_model.strip() == "demo":
        return "**GPU memory:** the demo model is tiny (15 MB of weights) and trains on 2 CPU cores in about 80 s."
    family = config.family
    if family == "auto":
        summary = summarize(config.base_model.strip())
        if isinstance(summary, LoraStudioError):
            return f"**Base model:** {summary}"
        family = summary.family
    family = "sd2" if family == "sd2-v" else family
    memory = estimate_memory(family, config)
    return (f"**GPU memory (rough):** {memory.sentence()}. {batch_guidance(family, config)} Formula and its "
            "measurements: `lora_studio/estimate.py`.")  # fmt: skip


# --- your presets -------------------------------------------------------------------------------


def save_preset(name: str, based_on: str | None, *values) -> tuple:
    """The form, validated, as the person's preset `name`; the picker then lists and selects it. Paths are kept as
    typed (Start confines them, as it does for any preset)."""
    config = config_from_form(list(values))
    path = save_user_preset(config, name, based_on if based_on in list_presets() else "")
    return gr.update(choices=list_presets(), value=path.stem), f"Saved your preset **{path.stem}** (`{path}`)."


def import_settings(app: AppState, upload: str | None) -> list:
    """An uploaded kohya_ss save (.json), sd-scripts TOML or config of this app, into the form, and the upload box
    emptied for the next one. A file whose settings cannot train here lists why and leaves the form as it is. Its
    paths are kept as written (Start confines them)."""
    if not upload:
        raise LoraStudioError("No file was uploaded; pick a kohya_ss .json or a .toml config.")
    (path,) = uploaded_files(app, [upload])
    if path.suffix.lower() not in (".json", ".toml"):
        raise LoraStudioError(f"{path.name} is not a .json or .toml config; pick a kohya_ss save or a TOML config.")
    try:
        config = import_config(path, path.name)
    except ConfigError as exc:
        problems = "\n".join(f"- {p}" for p in exc.problems)
        return [*(gr.skip() for _ in KEYS), f"**{path.name} was not imported** (the form is unchanged):\n{problems}",
                None]  # fmt: skip
    note = f"Imported **{path.name}**; check the base model and folders, then press Check settings."
    return [*form_values(config), note, None]


def delete_preset(name: str | None) -> tuple:
    """Delete the selected preset if it is one of the person's; the picker goes back to the demo's."""
    if not name:
        raise LoraStudioError("No preset is selected; select one you saved, then press Delete.")
    if name not in user_presets():
        raise LoraStudioError(f"{shortened(name)!r} is not one of your presets (bundled presets cannot be deleted); "
                              "select one you saved, then press Delete.")  # fmt: skip
    path = delete_user_preset(name)
    return gr.update(choices=list_presets(), value="demo-cpu"), f"Deleted your preset {name} (`{path}`)."


# --- jobs ----------------------------------------------------------------------------------------


def trainable_form(app: AppState, values) -> TrainConfig:
    """The form's config as training takes it: every field valid, nothing left to fill in (a preset's empty base
    model), then its paths inside the app's folders. Check settings shows the same problems (`estimate`)."""
    return confined_config(app.roots, config_from_form(list(values)).check_trainable("the Train form"))


def start(app: AppState, *values) -> str:
    config = trainable_form(app, values)
    job = app.jobs.submit(config)
    ahead = jobs_ahead(app, job)
    return f"Job {job} ({config.name}) " + (f"queued behind {ahead} other(s)." if ahead else "started.")


def jobs_ahead(app: AppState, job: int) -> int:
    """How many jobs run or wait before `job` (which may already have started)."""
    queued = [q.id for q in app.jobs.queued()]
    current = app.jobs.current()
    running = current is not None and current.state in ("running", "stopping") and current.id != job
    return (queued.index(job) if job in queued else 0) + running


def render_regularization(app: AppState, *values) -> str:
    """Queue the rendering of the form's generated regularization images, to look at in the Dataset tab before
    training (training with the same settings finds them cached)."""
    config = trainable_form(app, values)
    if config.regularization.path.strip():
        raise LoraStudioError("`regularization.path` is set, so training uses that folder's images; clear it to "
                              "generate class images with the base model instead.")  # fmt: skip
    job = app.jobs.submit_regularization_images(config)
    ahead = jobs_ahead(app, job)
    return f"Job {job} renders the regularization images" + (
        f", queued behind {ahead} other(s)." if ahead else "; the bar below counts them.")


def stop(app: AppState) -> str:
    return "Stopping after this step; the LoRA and the state are saved." if app.jobs.stop() else "Nothing is running."


def resume(app: AppState, *values) -> str:
    """Continue the newest stopped run from its saved state (the form's values may extend it)."""
    status = app.jobs.current()
    if status is None or status.state != "stopped" or status.run_dir is None:
        raise LoraStudioError("There is no stopped run to resume; start a new one instead.")
    config = trainable_form(app, values)
    job = app.jobs.submit(config, resume_from=status.run_dir)
    return f"Job {job} resumes {status.run_dir.name} from step {status.step}."


# --- jobs from before a restart ----------------------------------------------------------------------


def recovered_label(record) -> str:
    if not record.interrupted:
        return f"{record.name} · was queued"
    if record.resumable:
        at = f"step {record.saved_step}" if record.saved_step else "its saved state"
        return f"{record.name} · was running: resume from {at}"
    return f"{record.name} · was running, had saved nothing: starts over"


def recovered_view(app: AppState, picked: str | None = None) -> tuple:
    """The section of jobs that were queued or running when the app last stopped (shown only while one waits),
    and its picker (the `picked` job stays picked while it waits)."""
    keys = [(recovered_label(r), r.key) for r in app.jobs.recovered()]
    value = picked if picked in {key for _label, key in keys} else (keys[0][1] if keys else None)
    return gr.Accordion(visible=bool(keys)), gr.Dropdown(choices=keys, value=value)


def start_recovered(app: AppState, key: str | None) -> tuple:
    """Queue the picked job from before the restart (a running one resumes from its saved state)."""
    if not key:
        raise LoraStudioError("No job from before the restart is picked; there may be none.")
    chosen = {r.key: r for r in app.jobs.recovered()}.get(key)
    if chosen is None:
        raise LoraStudioError("That job from before the restart is no longer waiting; refresh the list.")
    confined_config(app.roots, chosen.train_config())  # its paths still inside the app's folders
    job = app.jobs.start_recovered(key)
    return f"Job {job}: {recovered_label(chosen)}.", *recovered_view(app)


def start_all_recovered(app: AppState) -> tuple:
    records = app.jobs.recovered()
    if not records:
        raise LoraStudioError("No jobs from before the restart are waiting.")
    for record in records:
        confined_config(app.roots, record.train_config())
    jobs = [app.jobs.start_recovered(r.key) for r in records]
    return f"Queued {len(jobs)} job(s) from before the restart.", *recovered_view(app)


def discard_recovered(app: AppState, key: str | None) -> tuple:
    if not key:
        raise LoraStudioError("No job from before the restart is picked; there may be none.")
    record = app.jobs.discard_recovered(key)
    where = f" (its run folder {Path(record.run_dir).name} stays in the Library)" if record.run_dir else ""
    return f"Discarded {record.name}{where}.", *recovered_view(app)


def progress_html(step: int, total: int, it_per_s: float, eta_s: float, state: str) -> str:
    """A progress bar with the figures beside it (aria values let tests and screen readers read it)."""
    percent = 100 * step / total if total else 0.0
    colour = {"failed": "#dc2626", "stopped": "#a3a3a3", "done": "#16a34a"}.get(state, "#f97316")
    eta = f"{int(eta_s // 60)} min {int(eta_s % 60)} s" if eta_s >= 60 else f"{eta_s:.0f} s"
    figures = f"step {step}/{total} ({percent:.0f}%) · {it_per_s:.2f} it/s · ETA {eta}"
    return bar_html("train-progressbar", step, total, colour, f"{html.escape(state)} · {figures}")


def preparing_html(state: str, stage: str, done: int, total: int) -> str:
    """The bar while a job prepares (rendering regularization images): its own id, so nothing mistakes it for
    the training steps."""
    percent = 100 * done / total if total else 0.0
    text = f"{html.escape(state)} · {html.escape(stage)} {done}/{total} ({percent:.0f}%)"
    return bar_html("train-preparingbar", done, total, "#0ea5e9", text)


def bar_html(element_id: str, value: int, maximum: int, colour: str, text: str) -> str:
    percent = 100 * value / maximum if maximum else 0.0
    return (
        f'<div id="{element_id}" role="progressbar" aria-valuemin="0" aria-valuemax="{maximum}" '
        f'aria-valuenow="{value}" style="height:14px;border-radius:7px;background:#e5e5e5;overflow:hidden">'
        f'<div style="height:100%;width:{percent:.1f}%;background:{colour}"></div></div>'
        f"<div>{text}</div>"
    )


LOSS_PLOT_SECONDS = 5.0  # the loss curve redraws at most this often while a job runs
LOSS_PLOT_POINTS = 400  # and with at most this many points: the browser redraws all of them
# How often the page polls. Each poll costs the browser tens of ms of CPU in Gradio's event handling, whatever it
# updates, and more once an event has used the form's fields (Gradio then updates the loading status of each of
# them on every event): on the Train tab at rest with a poll a second, Chromium took 6-7% of a core on a fresh page
# and 13-16% after one "Check settings" (session 25). On 2 cores the demo trained from the page at 82% of the CLI's
# steps/s with a poll a second, 95% with the page open and no polls, and 92% with a poll every 4 s
# (bench/app_training.py, session 12). So a job training on the CPU is polled every 4 s, one on a GPU every second,
# and a page with nothing running every 5 s; the page's load, a tab's select and the buttons that start or stop a
# job poll at once (`live_view`), so the page follows its own clicks without waiting for the timer.
RUNNING_POLL_SECONDS, CPU_TRAINING_POLL_SECONDS, IDLE_POLL_SECONDS = 1.0, 4.0, 5.0


@functools.cache
def training_on_cpu() -> bool:
    """Whether jobs train on the CPU here (no CUDA or MPS device); asked once, when a job first runs."""
    from ..models import pick_device

    return pick_device().type == "cpu"


def poll_seconds(status, queued: Sequence = ()) -> float:
    """The interval for the page's next polls, given the current job's status (None: no job) and the queued ones."""
    if not queued and (status is None or status.state not in ("running", "stopping")):
        return IDLE_POLL_SECONDS
    return CPU_TRAINING_POLL_SECONDS if training_on_cpu() else RUNNING_POLL_SECONDS


@dataclass(frozen=True)
class Shown:
    """What one page was last sent. The page re-renders whatever a poll returns, and that rendering competes
    with training for the CPU (on 2 cores the demo ran 30% slower from the page than from the CLI), so a
    poll sends only what changed, and the loss curve at most every LOSS_PLOT_SECONDS."""

    job: int | None = None
    bar: str = ""
    line: str = ""
    loss_points: int = -1
    loss_sent_at: float = 0.0
    samples: tuple[str, ...] | None = None  # None: whatever the page shows is not this job's
    log: str | None = None
    every: float = IDLE_POLL_SECONDS  # the timer's interval on the page


def poll(app: AppState, before: Shown | None = None, now: float | None = None) -> tuple:
    """What the page shows now (progress bar, status line, loss curve, newest samples, log tail), each
    `gr.skip()` when the page already has it, the poll timer's new interval (or skip), and the new `Shown`."""
    import pandas as pd

    before = before or Shown()
    now = time.monotonic() if now is None else now
    status = app.jobs.current()
    queued = app.jobs.queued()
    waiting = app.jobs.recovered()
    note = f" · {len(waiting)} job(s) from before the restart wait (see below)" if waiting else ""
    if status is None:
        empty = pd.DataFrame({"step": [], "loss": [], "series": pd.Series([], dtype=str)})
        idle = progress_html(0, 0, 0.0, 0.0, "idle"), "No training yet: pick a preset and press Start." + note
        every = poll_seconds(None, queued)
        return (*only_new(before, idle), empty if before.loss_points else gr.skip(), gr.skip(), gr.skip(),
                new_interval(before, every), Shown(bar=idle[0], line=idle[1], loss_points=0, every=every))  # fmt: skip
    line = f"**{status.state}** · {status.name}{note}"
    if queued:
        line += f" · queued: {', '.join(q.name for q in queued)}"
    if status.message:
        line += f"\n\n{status.message}"
    if status.preparing is not None:  # cleared by the first step
        bar = preparing_html(status.state, *status.preparing)
    else:
        bar = progress_html(status.step, status.total_steps, status.it_per_s, status.eta_s, status.state)
    if status.id != before.job:
        before = Shown(job=status.id, every=before.every)  # the page keeps its timer
    points = len(status.losses) + len(status.validation)
    redraw = points != before.loss_points and (
        status.state != "running" or now - before.loss_sent_at >= LOSS_PLOT_SECONDS or before.loss_points <= 0
    )
    losses = loss_frame(status) if redraw else gr.skip()
    samples = tuple(str(p) for p in status.samples)
    tail = log_tail(status.run_dir)
    every = poll_seconds(status, queued)
    shown_now = Shown(
        status.id, bar, line,
        points if redraw else before.loss_points, now if redraw else before.loss_sent_at,
        samples, tail, every,
    )  # fmt: skip
    return (
        *only_new(before, (bar, line)),
        losses,
        [(p, Path(p).stem) for p in samples] if samples != before.samples else gr.skip(),
        tail if tail != before.log else gr.skip(),
        new_interval(before, every),
        shown_now,
    )


def new_interval(before: Shown, every: float):
    """The timer's update when its interval changes, else skip."""
    return gr.Timer(value=every) if every != before.every else gr.skip()


TRAINING_SERIES, VALIDATION_SERIES = "training (smoothed)", "validation"
SERIES_COLOURS = {TRAINING_SERIES: "#f97316", VALIDATION_SERIES: "#2563eb"}  # named colours: the series are categories


def loss_frame(status):
    """The curves the plot draws: the smoothed training loss (thinned) and every validation pass, one series each."""
    import pandas as pd

    rows = [(step, loss, TRAINING_SERIES) for step, loss in thinned(status.losses)]
    rows += [(step, loss, VALIDATION_SERIES) for step, loss in status.validation]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def only_new(before: Shown, bar_and_line: tuple[str, str]) -> tuple:
    bar, line = bar_and_line
    return bar if bar != before.bar else gr.skip(), line if line != before.line else gr.skip()


def thinned(points: list[tuple[int, float]], most: int = LOSS_PLOT_POINTS) -> list[tuple[int, float]]:
    """At most `most` points, evenly spaced, the newest always included."""
    if len(points) <= most:
        return points
    stride = -(-len(points) // most)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def log_tail(run_dir: Path | None, lines: int = 20) -> str:
    """The last lines of the run's log (read from its end: a long run's log is large, the page polls every second)."""
    if run_dir is None or not RunFolder(run_dir).log.is_file():
        return ""
    with open(RunFolder(run_dir).log, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 16384))
        return "\n".join(f.read().decode("utf-8", errors="replace").splitlines()[-lines:])


# --- layout --------------------------------------------------------------------------------------


def field_component(field: config_form.FormField, value):
    common = {"label": field.label, "elem_id": field.elem_id, "info": field.help or None}
    if field.kind == "choice":
        return gr.Dropdown(list(field.choices), value=value, **common)
    if field.key == "vae":  # a VAE file of the models folder, as in the Preview tab, or a typed path
        return gr.Dropdown(vae_choices(), value=value, allow_custom_value=True, **common)
    if field.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if field.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if field.kind == "int" else None, **common)
    return gr.Textbox(value=value, lines=3 if field.kind in ("lines", "tables") else 1, **common)


def live_view(app: AppState, outputs: list, triggers: Sequence = (), after: Sequence = ()) -> None:
    """The live view: a timer polls the job, and so do each of `triggers` (page load, tab select) and the end of each
    event in `after` (Start, Stop, Resume); what this page was sent (`Shown`) is kept on the server."""
    page_has = gr.State(None)
    timer = gr.Timer(IDLE_POLL_SECONDS)
    # show_progress="hidden": Gradio would otherwise draw its pending overlay on all five outputs every poll, and
    # queue=False: a plain request rather than the queue's event stream. Both are CPU the browser spends on the
    # machine that trains (measured with Chromium's Performance metrics: about 20% less per poll without the queue).
    polled = {"fn": shown(poll, app), "inputs": page_has, "outputs": [*outputs, timer, page_has],
              "show_progress": "hidden", "queue": False}  # fmt: skip
    gr.on([timer.tick, *triggers], **polled)
    for event in after:
        event.then(**polled)


def estimate_triggers(form: list) -> list:
    """When the estimate is made again: a pick in a dropdown or a tick, at once; a typed field when it is left or
    Enter is pressed, not at each key. Each estimate sends the whole form and makes Gradio's page walk its ~440
    components for each of the ~150 fields (~250 ms of the browser's CPU here): typing a 39-character name set off 20
    of them, 6.5 s of CPU, where a training on the CPU would want it."""
    triggers = []
    for component in form:
        if isinstance(component, gr.Dropdown | gr.Checkbox):
            triggers.append(component.input)
        else:
            triggers += [component.blur, component.submit]
    return triggers


def form_fields(components: dict, initial: dict) -> gr.Button:
    """Every setting's field (the common ones on top, the rest in Advanced by section) into `components`; returns
    the Regularization section's render button."""
    basic = [FIELD_BY_KEY[k] for k in BASIC_KEYS if k != "base_model"]
    for row in (basic[:5], basic[5:]):
        with gr.Row():
            for field in row:
                components[field.key] = field_component(field, initial[field.key])
    with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
        for section, title in SECTION_TITLES.items():
            fields = [f for f in FIELDS if f.section == section and f.key not in components]
            with gr.Accordion(title, open=False, elem_id=f"train-section-{section or 'general'}"):
                for start_at in range(0, len(fields), 4):
                    with gr.Row():
                        for field in fields[start_at : start_at + 4]:
                            components[field.key] = field_component(field, initial[field.key])
                if section == "regularization":
                    render = gr.Button("Render regularization images now (to look at them first)",
                                       elem_id="train-render-reg")  # fmt: skip
    return render


def your_presets_section() -> dict[str, gr.components.Component]:
    """Save the form as a preset of one's own, or delete the selected one (wired in `build`, which has the form)."""
    with gr.Accordion("Your presets and imported settings", open=False, elem_id="train-your-presets"):
        with gr.Row():
            parts = {
                "name": gr.Textbox(label="Name", placeholder="my-style-v2", max_lines=1, max_length=64,
                                   elem_id="train-preset-name", scale=2),
                "save": gr.Button("Save the form as a preset", elem_id="train-save-preset", scale=1),
                "delete": gr.Button("Delete the selected preset", elem_id="train-delete-preset", scale=1),
            }  # fmt: skip
        parts["import"] = gr.File(label="Import settings: a kohya_ss save (.json), an sd-scripts .toml or a config "
                                  "of this app", file_types=[".json", ".toml"], file_count="single", height=140,
                                  elem_id="train-import")  # fmt: skip
        parts["message"] = gr.Markdown(elem_id="train-preset-message")
    return parts


def connect_your_presets(app: AppState, parts: dict, preset: gr.Dropdown, form: list, estimate_box) -> None:
    """Save and delete one's presets; an imported file fills the form, and the estimate follows."""
    said = parts["message"]
    parts["save"].click(shown(save_preset), [parts["name"], preset, *form], [preset, said], show_progress_on=said)
    parts["delete"].click(shown(delete_preset), preset, [preset, said], show_progress_on=said)
    parts["import"].upload(shown(import_settings, app), parts["import"], [*form, said, parts["import"]],
                           show_progress_on=said).then(shown(estimate, app), form, estimate_box)  # fmt: skip


def recovered_section(app: AppState, message: gr.Markdown, refreshed_on: Sequence) -> list:
    """The jobs that were queued or running when the app last stopped, and what to do with each; hidden while none
    waits. Each of `refreshed_on` (page load, tab select) lists them again. Returns the events that start jobs."""
    waiting = bool(app.jobs.recovered())
    with gr.Accordion("Jobs from before the restart", open=waiting, visible=waiting, elem_id="train-recovered") as box:
        with gr.Row():
            recovered = gr.Dropdown([], label="Queued or running when the app last stopped", scale=3,
                                    elem_id="train-recovered-jobs")  # fmt: skip
            start_one = gr.Button("Start / resume it", elem_id="train-recovered-start", scale=1)
            start_all = gr.Button("Start all", elem_id="train-recovered-all", scale=1)
            discard = gr.Button("Discard it", elem_id="train-recovered-discard", scale=1)
    gr.on(refreshed_on, shown(recovered_view, app), recovered, [box, recovered], show_progress="hidden", queue=False)
    started = [
        start_one.click(shown(start_recovered, app), recovered, [message, box, recovered], show_progress_on=message),
        start_all.click(shown(start_all_recovered, app), None, [message, box, recovered], show_progress_on=message),
    ]
    discard.click(shown(discard_recovered, app), recovered, [message, box, recovered], show_progress_on=message)
    return started


def build(app: AppState, refreshed_on: Sequence = ()) -> dict[str, gr.components.Component]:
    """The tab; returns the preset dropdown and the form's components by config key, for the other tabs. The preset
    and base-model lists are read again on each of `refreshed_on` (page load, tab select): a preset saved in another
    window or a checkpoint copied into the models folder shows up."""
    presets = list_presets()
    first = "demo-cpu" if "demo-cpu" in presets else presets[0]
    initial = dict(zip(KEYS, preset_values(first), strict=True))
    components: dict[str, gr.components.Component] = {}
    with gr.Row():
        preset = gr.Dropdown(presets, value=first, label="Preset", elem_id="train-preset", scale=1)
        components["base_model"] = gr.Dropdown(
            base_choices(), value=initial["base_model"], label="Base model", allow_custom_value=True, scale=3,
            elem_id="cfg-base_model", info="The demo, a model from the models folder, or a path you type",
        )  # fmt: skip
        refresh = gr.Button("Rescan models folder", scale=1, elem_id="train-rescan")
    base_note = gr.Markdown(base_info(app, initial["base_model"]), elem_id="train-base-info")
    your_presets = your_presets_section()
    with gr.Accordion("Models folder", open=False, elem_id="train-models-folder"):
        folder_note = gr.Markdown(f"Models folder: `{models_dir()}`")
        folder_table = gr.Dataframe(models_folder_table(), headers=["name", "kind", "family", "prediction", "note"],
                                    interactive=False, elem_id="train-models")  # fmt: skip
    render_button = form_fields(components, initial)
    # The first estimate comes with the page, so the demo's figures are there before anyone clicks.
    estimate_box = gr.Markdown(estimate(app, *initial.values()), elem_id="train-estimate")
    with gr.Row():
        check = gr.Button("Check settings", elem_id="train-check")
        start_button = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_button = gr.Button("Stop", variant="stop", elem_id="train-stop")
        resume_button = gr.Button("Resume", elem_id="train-resume")
    message = gr.Markdown(elem_id="train-message")
    started_recovered = recovered_section(app, message, refreshed_on)
    progress = gr.HTML(progress_html(0, 0, 0.0, 0.0, "idle"), elem_id="train-progress")
    status = gr.Markdown(elem_id="train-status")
    loss = gr.LinePlot(x="step", y="loss", color="series", label="Loss: training (smoothed) and validation",
                       color_map=SERIES_COLOURS, elem_id="train-loss")  # fmt: skip
    samples = gr.Gallery(label="Newest samples (strength and seed in each name)", columns=6, elem_id="train-samples")
    log = gr.Textbox(label="Log", lines=8, elem_id="train-log")

    form = [components[k] for k in KEYS]
    # show_progress_on: a refusal's badge goes on a message, not over every field of the form (ui/errors.py)
    preset.change(shown(preset_values), [preset, components["dataset.path"]], form,
                  show_progress_on=estimate_box).then(shown(estimate, app), form, estimate_box)  # fmt: skip
    connect_your_presets(app, your_presets, preset, form, estimate_box)
    components["base_model"].change(shown(base_info, app), components["base_model"], base_note)
    pickers = [components["base_model"], components["vae"]]
    gr.on([refresh.click, *refreshed_on], shown(refresh_models), pickers, [*pickers, folder_table, folder_note],
          show_progress_on=folder_note, queue=False)  # fmt: skip
    gr.on(refreshed_on, shown(preset_choices), None, preset, show_progress="hidden", queue=False)
    gr.on([*estimate_triggers(form), check.click], shown(estimate, app), form, estimate_box,
          trigger_mode="always_last")  # fmt: skip
    clicked = [
        start_button.click(shown(start, app), form, message),
        stop_button.click(shown(stop, app), None, message),
        render_button.click(shown(render_regularization, app), form, message),
        resume_button.click(shown(resume, app), form, message),
    ]
    live_view(app, [progress, status, loss, samples, log], refreshed_on, [*clicked, *started_recovered])
    return {"preset": preset, **components}
