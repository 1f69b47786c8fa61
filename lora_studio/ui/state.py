"""What the app holds on the server, built once in `build_app`: never taken from a request.

The folders a request may touch (`Roots`), the one job manager that trains (its worker thread starts
with the first job), and the loaded preview models (one base at a time, to keep memory bounded).
What one page has open (its dataset folder, its chosen run) lives in that page's `gr.State`, which
Gradio keeps on the server too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..config import shortened
from ..errors import LoraStudioError
from ..paths import Roots, home, is_within
from ..runs import RunFolder

DEFAULT_MAX_UPLOAD_MB = 50


@dataclass
class AppState:
    roots: Roots
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    previewers: dict = field(default_factory=dict)  # (base source, VAE) -> sample.Previewer
    preview_lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time
    caption_stop: threading.Event = field(default_factory=threading.Event)  # the Dataset tab's Stop captioning
    loaded_captioner: tuple | None = None  # ((folder, threshold), captioner): kept between preview and captioning
    _jobs: object | None = None
    _jobs_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def jobs(self):
        """The app's one job manager, made on first use (it starts the worker thread)."""
        with self._jobs_lock:
            if self._jobs is None:
                from ..job_store import JobStore
                from ..jobs import JobManager
                from ..runs import queue_folder

                self._jobs = JobManager(JobStore(queue_folder(self.roots.runs)))
            return self._jobs

    def previewer(self, base: str, vae: str = ""):
        """The loaded Previewer for `base` (with `vae` in place of its own VAE when named), loading it (and dropping
        any other) on first use."""
        from ..sample import Previewer
        from ..workflows import load_preview_base

        if (base, vae) not in self.previewers:
            self.previewers.clear()
            self.previewers[base, vae] = Previewer(load_preview_base(base, vae))
        return self.previewers[base, vae]


def confined_base(roots: Roots, source: str) -> str:
    """A base model named in a request: the demo, a hub id already in the local cache, or a path inside the
    roots (returned resolved, so it does not depend on the working directory)."""
    from ..models import HUB_ID, resolve_cached_hub_id

    if not isinstance(source, str | None):
        raise LoraStudioError(f"The base model must be `demo`, a path or a hub id, not {shortened(repr(source))}.")
    text = (source or "").strip()
    if text == "demo":
        return text
    if HUB_ID.match(text) and not (home() / text).exists():
        return str(resolve_cached_hub_id(text))  # a folder of the local Hugging Face cache, or a sentence why not
    return str(roots.resolve(text, "base model"))


def confined_vae(roots: Roots, source: str | None) -> str:
    """A VAE named in a request, resolved inside the roots; empty (the base model's own) stays empty."""
    if not isinstance(source, str | None):
        raise LoraStudioError(f"The VAE must be a path or empty, not {shortened(repr(source))}.")
    text = (source or "").strip()
    return str(roots.resolve(text, "VAE (`vae`)")) if text else ""


def confined_dataset_folder(roots: Roots, path: str, what: str) -> str:
    """A dataset folder from a request, resolved inside the roots: 'demo' (the bundled dataset) as it is, empty
    stays empty (a config with only subsets)."""
    from ..data import resolve_dataset_path

    if not path.strip():
        return ""
    if path.strip() == "demo":
        return str(resolve_dataset_path(path))
    return str(roots.resolve(path, what))


def confined_config(roots: Roots, config):
    """The form's config with every path resolved inside the roots: the dataset, the validation and regularization
    folders, the starting LoRA, the VAE and the base model where the app may read, `output_dir` and `dataset.cache_dir`
    inside the runs folder (where the app writes)."""
    dataset = confined_dataset_folder(roots, config.dataset.path, "dataset folder (`dataset.path`)")
    subsets = [subset.model_copy(update={"path": confined_dataset_folder(
        roots, subset.path, f"folder of line {number} of `dataset.subsets`")})
        for number, subset in enumerate(config.dataset.subsets, 1)]  # fmt: skip
    output = roots.resolve(config.output_dir or roots.runs, "`output_dir`", write=True, within=roots.runs)
    cache = config.dataset.cache_dir.strip()
    if cache:
        cache = str(roots.resolve(cache, "`dataset.cache_dir`", write=True, within=roots.runs))
    held_out = config.validation.path.strip()
    if held_out and held_out != "demo-validation":  # the bundled demo's held-out images are readable as they are
        held_out = str(roots.resolve(held_out, "validation folder (`validation.path`)"))
    regularization = config.regularization.path.strip()
    if regularization:
        regularization = str(roots.resolve(regularization, "regularization folder (`regularization.path`)"))
    start = config.lora.network_weights.strip()
    if start:
        start = str(roots.resolve(start, "starting LoRA (`lora.network_weights`)"))
    vae = confined_vae(roots, config.vae)
    return config.model_copy(
        update={
            "vae": vae,
            # An empty one stays empty: training_problems says what to fill in, in the config's own words.
            "base_model": confined_base(roots, config.base_model) if config.base_model.strip() else "",
            "output_dir": str(output),
            "dataset": config.dataset.model_copy(update={"path": dataset, "subsets": subsets, "cache_dir": cache}),
            "validation": config.validation.model_copy(update={"path": held_out}),
            "regularization": config.regularization.model_copy(update={"path": regularization}),
            "lora": config.lora.model_copy(update={"network_weights": start}),
        }
    )


def checked_run(app: AppState, name: str | None) -> RunFolder:
    """The run `name` (from a request), refused unless it is a run directly inside the runs folder."""
    if not name:
        raise LoraStudioError("No run is selected; select one in the table first.")
    root = app.roots.runs.resolve()
    run = RunFolder((root / Path(name).name).resolve())
    if run.path.parent != root or not run.config.is_file():
        raise LoraStudioError(f"No run named {shortened(name)!r} in {root}; refresh the list and select a run.")
    return run


def uploaded_files(app: AppState, files: list[str]) -> list[Path]:
    """Gradio's own temp copies of the uploads: a path elsewhere (a crafted request) or over the cap is refused."""
    from gradio.utils import get_upload_folder

    cache = Path(get_upload_folder()).resolve()
    paths = []
    for file in files:
        path = Path(file).resolve()
        if not is_within(path, cache) or not path.is_file():
            raise LoraStudioError(f"{Path(file).name} is not an upload; add files with the upload box.")
        if path.stat().st_size > app.max_upload_mb * 1024 * 1024:
            raise LoraStudioError(
                f"{path.name} is over the {app.max_upload_mb} MB an upload may have; shrink it, or start the app "
                "with a larger --max-upload-mb."
            )
        paths.append(path)
    return paths
