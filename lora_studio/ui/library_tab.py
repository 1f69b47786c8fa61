"""The Library tab: the runs, their config, metrics, samples and files; export, inspect, resize, merge, delete.

A run is chosen by selecting its row in the runs table; the chosen run's name lives in the page's
server-side state and is checked to be a run directly in the runs folder before anything is read,
written or deleted. A file picked in the page must be one of that run's LoRA files. Handlers are plain
functions (tests call them directly); the work itself is `workflows`' (the CLI calls the same).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from ..config import SAVE_PRECISIONS
from ..errors import LoraStudioError
from ..runs import RunFolder, list_runs
from ..sample_prompts import STRENGTH_RANGE
from ..workflows import (
    base_model_of,
    checkpoint_label,
    export_lora_file,
    exports_path,
    lora_file_label,
    merge_into_base,
    resize_lora_file,
)
from .errors import shown
from .state import AppState, checked_run

FORMATS = ("kohya", "diffusers")


def runs_table(app: AppState) -> list[list]:
    rows = []
    for run in list_runs(app.roots.runs):
        metrics = run.last_metrics()
        state = "training" if run.is_locked() else ("yes" if run.final_files() else "no")
        rows.append([run.name, metrics.get("step", 0), metrics.get("loss"), state, best_note(run)])
    return rows


def best_note(run: RunFolder) -> str:
    """'step 300 (val 0.0812)' for a run that validated its files, else ''."""
    best = run.best_lora()
    if best is None:
        return ""
    entry = run.validation_losses()[best]
    return f"{checkpoint_label(best)} (val {entry['validation_loss']:.4f})"


def run_details(app: AppState, name: str) -> tuple[str, str, list, list[str]]:
    """Config, last metrics, the newest samples and every LoRA file of a run."""
    run = checked_run(app, name)
    config = run.config.read_text(encoding="utf-8", errors="replace")
    metrics = json.dumps(run.last_metrics(), indent=2)
    _step, images = run.newest_samples()
    files = [(lora_file_label(p), str(p)) for p in run.lora_files()]
    return config, metrics, [(str(p), p.stem) for p in images], files


def checked_file(app: AppState, name: str | None, file: str | None) -> tuple[RunFolder, Path]:
    run = checked_run(app, name)
    path = Path(file or "").resolve()
    if not file or path not in [p.resolve() for p in run.lora_files()]:
        raise LoraStudioError("Pick one of this run's LoRA files first.")
    return run, path


def export_file(app: AppState, name: str, file: str, fmt: str, precision: str) -> str:
    """A copy in the chosen format and precision in the run's exports/ folder, for download."""
    run, source = checked_file(app, name, file)
    if fmt not in FORMATS or precision not in SAVE_PRECISIONS:
        choices = f"a format ({', '.join(FORMATS)}) and a precision ({', '.join(SAVE_PRECISIONS)})"
        raise LoraStudioError(f"Choose {choices}.")
    out = exports_path(source, f"{fmt}-{precision}")
    base_model = base_model_of(run) if fmt == "diffusers" else None
    return str(export_lora_file(source, out, fmt, precision, base_model))


def inspect_file(app: AppState, name: str, file: str) -> str:
    from ..lora_inspect import inspect_lora

    info = inspect_lora(checked_file(app, name, file)[1])
    info.pop("per_module")
    return json.dumps(info, indent=2)


def resize_file(app: AppState, name: str, file: str, rank: float) -> tuple[str, str]:
    _run, source = checked_file(app, name, file)
    if not 1 <= int(rank or 0) <= 1024:
        raise LoraStudioError("Resize to a rank from 1 to 1024.")
    out, report = resize_lora_file(source, exports_path(source, f"rank{int(rank)}"), int(rank), None)
    summary = f"Frobenius error {report.total_error:.4g} of {report.total_norm:.4g} ({report.relative_error:.2%})"
    return str(out), summary


def merge_file(app: AppState, name: str, file: str, strength: float) -> str:
    run, source = checked_file(app, name, file)
    low, high = STRENGTH_RANGE
    if not low <= float(strength) <= high:
        raise LoraStudioError(f"Merge at a strength from {low:g} to {high:g}.")
    out = exports_path(source, f"merged-{float(strength):g}")
    return str(merge_into_base(base_model_of(run), source, float(strength), out))


def delete_run(app: AppState, name: str, confirmed: bool) -> tuple[list[list], str, None]:
    """Remove a run after confirmation; never one that is training or waiting in the queue to resume."""
    if not confirmed:
        raise LoraStudioError("Tick 'Yes, delete it' first: deleting a run cannot be undone.")
    run = checked_run(app, name)
    queued = [job for job in app.jobs.queued() if job.run_dir and Path(job.run_dir).resolve() == run.path]
    if queued:
        raise LoraStudioError(f"{run.name} is queued to resume; remove it from the queue (or let it finish) first.")
    run.delete()  # refused in one sentence while a trainer holds the run's lock
    return runs_table(app), f"Deleted {run.name}.", None


def build(app: AppState, refreshed_on: Sequence = ()) -> None:
    """The tab; its runs table is read again on each of `refreshed_on` (page load, tab select) and on Refresh runs."""
    refresh = gr.Button("Refresh runs", elem_id="library-refresh")
    table = gr.Dataframe(runs_table(app), headers=["run", "step", "loss", "final LoRA", "best (validation)"],
                         interactive=False, elem_id="library-runs")  # fmt: skip
    chosen = gr.State(None)  # server-side: the run selected in the table
    shown_run = gr.Markdown("Select a run in the table.", elem_id="library-run")
    with gr.Row():
        config = gr.Code(label="config.toml", language=None)
        metrics = gr.Code(label="Last metrics", language="json")
    samples = gr.Gallery(label="Newest samples", columns=6, allow_preview=True)
    file = gr.Dropdown([], label="LoRA file", elem_id="library-file")
    with gr.Row():
        fmt = gr.Dropdown(list(FORMATS), value="kohya", label="Format")
        precision = gr.Dropdown(list(SAVE_PRECISIONS), value="fp16", label="Precision")
        export = gr.Button("Export")
    download = gr.File(label="Download", elem_id="library-download")
    with gr.Row():
        rank = gr.Number(8, label="Resize to rank", precision=0, minimum=1, maximum=1024)
        resize = gr.Button("Resize")
        strength = gr.Slider(-2, 2, value=1.0, step=0.05, label="Merge strength")
        merge = gr.Button("Merge into the base")
    inspect = gr.Button("Inspect")
    details = gr.Code(label="Inspect", language="json")
    status = gr.Markdown(elem_id="library-status")
    with gr.Row():
        confirm = gr.Checkbox(label="Yes, delete it")
        delete = gr.Button("Delete run", variant="stop")

    def select_run(rows, evt: gr.SelectData):
        """The selected row's run (its name checked by run_details), its details, and its files."""
        name = evt.row_value[0] if evt.row_value else None
        config_text, metrics_text, images, files = run_details(app, name)
        return (name, f"**{name}**", config_text, metrics_text, images,
                gr.Dropdown(choices=files, value=files[0][1] if files else None))  # fmt: skip

    gr.on([refresh.click, *refreshed_on], shown(runs_table, app), None, table, show_progress="hidden",
          queue=False)
    # show_progress_on: a refusal's badge goes on the message, not over the runs table (ui/errors.py says why)
    table.select(shown(select_run), table, [chosen, shown_run, config, metrics, samples, file],
                 show_progress_on=shown_run)  # fmt: skip
    export.click(shown(export_file, app), [chosen, file, fmt, precision], download)
    inspect.click(shown(inspect_file, app), [chosen, file], details)
    resize.click(shown(resize_file, app), [chosen, file, rank], [download, status], show_progress_on=status)
    merge.click(shown(merge_file, app), [chosen, file, strength], download)
    delete.click(shown(delete_run, app), [chosen, confirm], [table, status, chosen], show_progress_on=status)
