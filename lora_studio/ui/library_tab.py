"""The Library tab: the runs, their config, metrics, samples and files; export, inspect, resize, merge, delete.

Handlers are plain functions (tests call them directly). Paths picked in the page are checked to lie
inside the runs folder before anything is read, written or deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr

from ..errors import LoraStudioError
from .errors import shown

PRECISION = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def runs_dir() -> Path:
    from . import preview_tab

    return preview_tab.RUNS_DIR  # one setting for both tabs (tests point it at a temp folder)


def run_path(name: str) -> Path:
    """The run folder `name`, refused unless it is a direct child of the runs folder."""
    root = runs_dir().resolve()
    run = (root / Path(name or "").name).resolve()
    if not name or run.parent != root or not run.is_dir():
        raise LoraStudioError(f"No run named {name!r} in {root}; refresh the list.")
    return run


def last_metrics(run: Path) -> dict:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return {}
    lines = metrics.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def runs_table() -> list[list]:
    rows = []
    if runs_dir().is_dir():
        for run in sorted((p for p in runs_dir().iterdir() if (p / "config.toml").is_file()), reverse=True):
            metrics = last_metrics(run)
            final = any(run.glob("*.safetensors"))
            rows.append([run.name, metrics.get("step", 0), metrics.get("loss"), "yes" if final else "no"])
    return rows


def run_details(name: str) -> tuple[str, str, list, list[str]]:
    """Config, last metrics, the newest samples and every LoRA file of a run."""
    run = run_path(name)
    config = (run / "config.toml").read_text(encoding="utf-8")
    metrics = json.dumps(last_metrics(run), indent=2)
    sample_steps = sorted((run / "samples").glob("step-*")) if (run / "samples").is_dir() else []
    samples = [(str(p), p.stem) for p in sorted(sample_steps[-1].glob("*.png"))] if sample_steps else []
    files = sorted(str(p) for p in run.glob("*.safetensors"))
    files += sorted(str(p) for p in (run / "checkpoints").glob("*.safetensors"))
    return config, metrics, samples, files


def checked_file(name: str, file: str) -> Path:
    run = run_path(name)
    path = Path(file or "").resolve()
    if not file or run not in path.parents or not path.is_file():
        raise LoraStudioError("Pick one of this run's LoRA files first.")
    return path


def export_file(name: str, file: str, fmt: str, precision: str) -> str:
    """A copy in the chosen format and precision beside the run's files (exports/), for download."""
    import torch

    from ..config import load_config
    from ..export import convert_to_diffusers, load_lora, save_kohya
    from ..models import load_base

    source = checked_file(name, file)
    dtype = getattr(torch, PRECISION[precision])
    out = run_path(name) / "exports" / f"{source.stem}-{fmt}-{precision}.safetensors"
    lora = load_lora(source)
    if fmt == "kohya":
        return str(save_kohya(lora, out, dtype))
    base_model = load_config(run_path(name) / "config.toml").base_model
    base = load_base(base_model, dtype=torch.float32 if base_model == "demo" else None)
    return str(convert_to_diffusers(lora, base, out, dtype))


def inspect_file(name: str, file: str) -> str:
    from ..tools import inspect_lora

    info = inspect_lora(checked_file(name, file))
    info.pop("per_module")
    return json.dumps(info, indent=2)


def resize_file(name: str, file: str, rank: float) -> tuple[str, str]:
    from ..export import load_lora, save_kohya
    from ..tools import resize_lora

    source = checked_file(name, file)
    resized, report = resize_lora(load_lora(source), rank=int(rank))
    out = save_kohya(resized, run_path(name) / "exports" / f"{source.stem}-rank{int(rank)}.safetensors")
    summary = f"Frobenius error {report.total_error:.4g} of {report.total_norm:.4g} ({report.relative_error:.2%})"
    return str(out), summary


def merge_file(name: str, file: str, strength: float) -> str:
    import torch

    from ..config import load_config
    from ..export import load_lora
    from ..models import load_base
    from ..tools import merge_lora

    source = checked_file(name, file)
    base_model = load_config(run_path(name) / "config.toml").base_model
    base = load_base(base_model, dtype=torch.float32, device="cpu")  # merging is exact work, not GPU work
    out = run_path(name) / "exports" / f"{source.stem}-merged-{strength:g}.safetensors"
    return str(merge_lora(base, load_lora(source), float(strength), out, torch.float16))


def delete_run(name: str, confirmed: bool) -> tuple[list[list], str]:
    if not confirmed:
        raise LoraStudioError("Tick 'Yes, delete it' first: deleting a run cannot be undone.")
    run = run_path(name)
    shutil.rmtree(run)
    return runs_table(), f"Deleted {run.name}."


def build() -> None:
    refresh = gr.Button("Refresh runs", elem_id="library-refresh")
    table = gr.Dataframe(runs_table(), headers=["run", "step", "loss", "final LoRA"], interactive=False,
                         elem_id="library-runs")  # fmt: skip
    with gr.Row():
        run = gr.Textbox(label="Run", elem_id="library-run", scale=3)
        show = gr.Button("Show", scale=1)
    with gr.Row():
        config = gr.Code(label="config.toml", language=None)
        metrics = gr.Code(label="Last metrics", language="json")
    samples = gr.Gallery(label="Newest samples", columns=6, allow_preview=True)
    file = gr.Dropdown([], label="LoRA file", elem_id="library-file")
    with gr.Row():
        fmt = gr.Dropdown(["kohya", "diffusers"], value="kohya", label="Format")
        precision = gr.Dropdown(list(PRECISION), value="fp16", label="Precision")
        export = gr.Button("Export")
    download = gr.File(label="Download", elem_id="library-download")
    with gr.Row():
        rank = gr.Number(8, label="Resize to rank", precision=0)
        resize = gr.Button("Resize")
        strength = gr.Slider(-2, 2, value=1.0, step=0.05, label="Merge strength")
        merge = gr.Button("Merge into the base")
    inspect = gr.Button("Inspect")
    details = gr.Code(label="Inspect", language="json")
    status = gr.Markdown(elem_id="library-status")
    with gr.Row():
        confirm = gr.Checkbox(label="Yes, delete it")
        delete = gr.Button("Delete run", variant="stop")

    def show_run(name):
        config_text, metrics_text, images, files = run_details(name)
        return config_text, metrics_text, images, gr.Dropdown(choices=files, value=files[0] if files else None)

    def pick_run(evt: gr.SelectData) -> str:
        return evt.row_value[0] if evt.row_value else ""

    refresh.click(runs_table, None, table)
    table.select(pick_run, None, run)
    show.click(shown(show_run), run, [config, metrics, samples, file])
    export.click(shown(export_file), [run, file, fmt, precision], download)
    inspect.click(shown(inspect_file), [run, file], details)
    resize.click(shown(resize_file), [run, file, rank], [download, status])
    merge.click(shown(merge_file), [run, file, strength], download)
    delete.click(shown(delete_run), [run, confirm], [table, status])
