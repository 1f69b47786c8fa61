"""The Train tab: a preset plus a few fields (and any other setting as key=value lines), Start/Stop/Resume,
and a live view of the running job (progress, loss curve, newest samples, log tail, queue).

The job runs in `jobs.JobManager`'s worker thread; a timer on the page polls it, so closing the page
does not stop training and a reopened page shows the running job again.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..config import list_presets, load_preset
from ..errors import LoraStudioError
from .errors import shown

_manager = None


def manager():
    """The app's one job manager, made on first use (it starts the worker thread)."""
    global _manager
    if _manager is None:
        from ..jobs import JobManager

        _manager = JobManager()
    return _manager


def build_config(preset: str, base: str, dataset: str, steps: float, lr: float, rank: float, advanced: str):
    """The preset with the form's fields and the Advanced lines (`key.path=value`, one a line) applied.
    Every bad field is reported at once by the config's own validation."""
    overrides = [f"base_model={_toml_string(base)}", f"dataset.path={_toml_string(dataset)}"]
    overrides += [f"optimizer.max_train_steps={int(steps)}", f"optimizer.learning_rate={float(lr)!r}"]
    overrides += [f"lora.rank={int(rank)}"]
    overrides += [line.strip() for line in (advanced or "").splitlines() if line.strip() and not line.startswith("#")]
    return load_preset(preset, overrides)


def _toml_string(text: str) -> str:
    return '"' + text.strip().replace("\\", "\\\\").replace('"', '\\"') + '"'


def preset_fields(preset: str) -> tuple[str, str, int, float, int]:
    config = load_preset(preset)
    return (config.base_model, config.dataset.path, config.optimizer.max_train_steps or 1000,
            config.optimizer.learning_rate, config.lora.rank)  # fmt: skip


def start(preset, base, dataset, steps, lr, rank, advanced) -> str:
    config = build_config(preset, base, dataset, steps, lr, rank, advanced)
    job = manager().submit(config)
    waiting = len(manager().queued())
    return f"Job {job} ({config.name}) " + (f"queued behind {waiting - 1} other(s)." if waiting > 1 else "started.")


def stop() -> str:
    return "Stopping after this step; the LoRA and the state are saved." if manager().stop() else "Nothing is running."


def resume(preset, base, dataset, steps, lr, rank, advanced) -> str:
    """Continue the newest stopped run from its saved state (the form's values may extend it)."""
    status = manager().current()
    if status is None or status.state != "stopped" or status.run_dir is None:
        raise LoraStudioError("There is no stopped run to resume; start a new one instead.")
    config = build_config(preset, base, dataset, steps, lr, rank, advanced)
    job = manager().submit(config, resume_from=status.run_dir)
    return f"Job {job} resumes {status.run_dir.name} from step {status.step}."


def poll() -> tuple[str, object, list, str]:
    """What the page shows now: status line, loss curve, newest samples, log tail."""
    import pandas as pd

    status = manager().current()
    if status is None:
        return "No training yet: pick a preset and press Start.", pd.DataFrame({"step": [], "loss": []}), [], ""
    percent = 100 * status.step / status.total_steps if status.total_steps else 0
    line = (f"**{status.state}** · {status.name} · step {status.step}/{status.total_steps} ({percent:.0f}%) · "
            f"{status.it_per_s:.2f} it/s · ETA {status.eta_s:.0f} s")  # fmt: skip
    queued = manager().queued()
    if queued:
        line += f" · queued: {', '.join(q.name for q in queued)}"
    if status.message:
        line += f"\n\n{status.message}"
    losses = pd.DataFrame(status.losses, columns=["step", "loss"])
    samples = [(str(p), Path(p).stem) for p in status.samples]
    return line, losses, samples, log_tail(status.run_dir)


def log_tail(run_dir: Path | None, lines: int = 20) -> str:
    if run_dir is None or not (run_dir / "log.txt").is_file():
        return ""
    return "\n".join((run_dir / "log.txt").read_text(errors="replace").splitlines()[-lines:])


def build() -> None:
    presets = list_presets()
    first = "demo-cpu" if "demo-cpu" in presets else presets[0]
    base0, dataset0, steps0, lr0, rank0 = preset_fields(first)
    with gr.Row():
        preset = gr.Dropdown(presets, value=first, label="Preset", elem_id="train-preset")
        base = gr.Textbox(base0, label="Base model", elem_id="train-base")
        dataset = gr.Textbox(dataset0, label="Dataset folder", elem_id="train-dataset")
    with gr.Row():
        steps = gr.Number(steps0, label="Steps", precision=0, elem_id="train-steps")
        lr = gr.Number(lr0, label="Learning rate")
        rank = gr.Number(rank0, label="Rank", precision=0)
    with gr.Accordion("Advanced", open=False):
        advanced = gr.Code(label="Any other setting, one key.path=value a line (e.g. lora.alpha=8)", language=None,
                           elem_id="train-advanced")  # fmt: skip
    with gr.Row():
        start_button = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_button = gr.Button("Stop", variant="stop", elem_id="train-stop")
        resume_button = gr.Button("Resume", elem_id="train-resume")
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    loss = gr.LinePlot(x="step", y="loss", label="Loss (smoothed)", elem_id="train-loss")
    samples = gr.Gallery(label="Newest samples", columns=6, elem_id="train-samples")
    log = gr.Textbox(label="Log", lines=8, elem_id="train-log")

    form = [preset, base, dataset, steps, lr, rank, advanced]
    preset.change(shown(preset_fields), preset, [base, dataset, steps, lr, rank])
    start_button.click(shown(start), form, message)
    stop_button.click(shown(stop), None, message)
    resume_button.click(shown(resume), form, message)
    timer = gr.Timer(1.0)
    timer.tick(poll, None, [status, loss, samples, log])
