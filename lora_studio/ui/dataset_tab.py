"""The Dataset tab: open or upload a dataset, edit captions one by one or in bulk, see the report.

The open folder lives in the page's server-side state (`gr.State`), set only by `open_dataset` after it
resolved the request's path inside the app's roots; every other handler takes the folder from there,
never from a request value. Handlers are plain functions of plain values (tests call them directly);
`build` wires them to Gradio components. Errors reach the page as one sentence, never a traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
from pydantic import ValidationError

from ..config import (
    CONFIG_VERSION,
    MAX_SUBSETS,
    DatasetConfig,
    DatasetSubset,
    load_preset,
    shortened,
    validate_config,
)
from ..data import KOHYA_FOLDER, CaptionError, is_training_image, read_caption, scan, validation_caption
from ..dataset_edit import (
    BulkEdit,
    bulk_edit,
    clear_mask,
    gallery_pictures,
    import_files,
    mask_overlay,
    safe_name,
    save_painted_mask,
    write_caption,
)
from ..errors import LoraStudioError, StoppedEarly
from ..paths import DEMO_DATASET_DIR, is_within
from ..runs import list_runs
from ..tokens import WINDOW, longer_than_a_window
from .config_form import parse_tables
from .errors import shown
from .state import AppState, checked_run, uploaded_files

MAX_GALLERY = 500  # images shown at once; a dataset is 10-200 images, a folder of thousands is not one


def working_folder(app: AppState, source: str) -> Path:
    """The folder edits go to: a folder inside the roots as given (resolved, symlinks included), a plain name of a
    folder in datasets/ (where uploads make new ones), or for `demo` (which ships read-only with the app) a copy of
    the bundled demo dataset under datasets/demo, made once."""
    source = (source or "").strip() or "demo"
    if source == "demo":
        copy = app.roots.datasets / "demo"
        if not copy.exists():
            shutil.copytree(DEMO_DATASET_DIR, copy)
        return copy
    named = app.roots.datasets / source
    if source == named.name and source not in (".", "..") and named.is_dir():
        source = str(named)  # a dataset's name, as an upload names a new one: datasets/<name>
    folder = app.roots.resolve(source, "dataset folder", write=True)
    if not folder.is_dir():
        raise LoraStudioError(f"{folder} is not a folder; give the folder that holds your images, or upload them.")
    return folder


def open_folder(app: AppState, folder: str | None) -> Path:
    """The page's open folder from its server-side state, checked again against the roots."""
    if not folder:
        raise LoraStudioError("No dataset is open; open a folder or upload images into a new dataset first.")
    return app.roots.resolve(folder, "open dataset folder", write=True)


def new_dataset_folder(app: AppState, name: str) -> Path:
    """datasets/<name> for an upload into a new dataset; the name is sanitized like any upload name."""
    folder = app.roots.datasets / safe_name(name or "my-dataset")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def caption_extension(extension: str | None) -> str:
    """The Train form's `dataset.caption_extension` (".txt" when none came), checked as the config checks it: the
    Dataset tab shows and edits the caption files that training reads. A request may send anything here."""
    data = {"version": CONFIG_VERSION, "dataset": {"caption_extension": extension or ".txt"}}
    return validate_config(data, source="the Train form").dataset.caption_extension


def gallery_items(folder: Path, extension: str = ".txt") -> list[tuple[str, str]]:
    """The folder's images (links out of the folder left out), large ones through small copies of the same name
    (dataset_edit.gallery_picture), with their captions as labels."""
    items = []
    images = sorted(p for p in folder.iterdir() if is_training_image(p) and is_within(p, folder))[:MAX_GALLERY]
    for image, picture in zip(images, gallery_pictures(images), strict=True):
        try:
            caption, _notes = read_caption(image, extension, lines=True)  # the lines a save keeps
        except CaptionError as exc:
            caption = f"(caption refused: {exc})"
        items.append((str(picture), caption or ""))
    return items


def dataset_settings(preset: str | None, folder: Path, extension: str = ".txt",
                     subset: DatasetSubset | None = None) -> DatasetConfig:  # fmt: skip
    """The Train tab's preset's dataset settings (bucket sizes...) with the form's caption extension for `folder`,
    or as the form's `subset` reads it (its own repeats, class tokens and caption settings), so the report warns
    about what that training would actually do."""
    settings = load_preset(preset).dataset if preset else DatasetConfig()
    if subset is not None:
        own = subset.model_copy(update={"path": str(folder), "regularization": False})  # scanned as it is
        return settings.model_copy(update={"path": "", "subsets": [own], "caption_extension": extension})
    return settings.model_copy(update={"path": str(folder), "subsets": [], "caption_extension": extension})


def listed_subset(app: AppState, folder: Path, subsets: str | None) -> DatasetSubset | None:
    """The Train form's subset that `folder` is, or is a kohya `N_name` folder of (resolved inside the roots; a line
    the form cannot read is no subset here, the form reports it)."""
    try:
        listed = parse_tables(subsets or "")
    except ValueError:
        return None
    within = folder.resolve().parent if KOHYA_FOLDER.match(folder.name) else None
    for table in listed:
        try:
            subset = DatasetSubset.model_validate(table)
            path = app.roots.resolve(subset.path, "subset folder")
        except (ValidationError, LoraStudioError):
            continue  # not a subset training can take (Start refuses it), so not this folder's
        if path == folder.resolve() or path == within:
            return subset
    return None


def folder_extension(subset: DatasetSubset | None, extension: str | None) -> str:
    """The caption extension the open folder's captions have for training: its subset's own, else the form's."""
    form = caption_extension(extension)  # checked even where a subset's own replaces it: a bad request is refused
    return subset.caption_extension if subset and subset.caption_extension else form


def folder_view(folder: Path, preset: str | None = None, extension: str = ".txt",
                subset: DatasetSubset | None = None) -> tuple[list, str, list[list]]:  # fmt: skip
    """Gallery items, the validation report and the tag table, from one scan of the folder."""
    settings = dataset_settings(preset, folder, extension, subset)
    report = scan(settings)
    lines = [f"**{len(report.items)} images** usable in `{folder}`, {len(report.errors)} errors, "
             f"{len(report.warnings)} warnings" + (f" (checked with the `{preset}` preset's settings)." if preset
                                                    else ".")]  # fmt: skip
    lines += [f"- error: `{Path(p.path).name}`: {p.message}" for p in report.errors]
    lines += [f"- warning: `{Path(p.path).name}`: {p.message}" for p in report.warnings]
    long = longer_than_a_window([validation_caption(item, settings) for item in report.items])
    if long:
        some = "1 caption is" if len(long) == 1 else f"{len(long)} captions are"
        lines.append(f"- note: {some} longer than {WINDOW} tokens (the longest: {max(count for _, count in long)}); "
                     f"training reads only the first {WINDOW} unless the Train form's `max_token_length` is 150 or "
                     "225")  # fmt: skip
    counts: dict[str, int] = {}
    for tags in report.tag_frequency().values():
        for tag, n in tags.items():
            counts[tag] = counts.get(tag, 0) + n
    tags = [[tag, n] for tag, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return gallery_items(folder, folder_extension(subset, extension)), "\n".join(lines), tags


def open_dataset(app: AppState, source: str, preset: str | None = None, extension: str | None = None,
                 subsets: str | None = None) -> tuple[str, str, list, str, list, str]:  # fmt: skip
    """The folder (for the page's state), its view; it also becomes the Train tab's dataset (so edits are what
    trains), unless it is one of the form's `subsets` already (then it is shown as that subset trains)."""
    extension = caption_extension(extension)
    folder = working_folder(app, source)
    subset = listed_subset(app, folder, subsets)
    return str(folder), str(folder), *folder_view(folder, preset, extension, subset), train_dataset(folder, subset)


def train_dataset(folder: Path, subset: DatasetSubset | None):
    """What the Train form's dataset.path becomes once `folder` is open: the folder, or (a skip) what it was when the
    folder is one of the form's subsets, which train already with their own settings."""
    return gr.skip() if subset is not None else str(folder)


def form_folders(path: str | None, subsets: str | None) -> gr.Dropdown:
    """The folders the Train form trains on (`dataset.path`, each subset's), to open one here. Only text from the
    form: opening one resolves it inside the roots as any typed folder is."""
    folders = [("dataset.path: " + path.strip(), path.strip())] if path and path.strip() else []
    try:
        listed = parse_tables(subsets or "")
    except ValueError:
        listed = []  # the Train form reports its own unreadable line
    folders += [(f"subset {number}: {table['path']}", str(table["path"])) for number, table in enumerate(listed, 1)
                if isinstance(table.get("path"), str) and table["path"].strip()]  # fmt: skip
    return gr.Dropdown(choices=folders[: MAX_SUBSETS + 1], value=None)


def current_view(app: AppState, folder: str | None, preset: str | None = None, extension: str | None = None,
                 subsets: str | None = None) -> tuple:  # fmt: skip
    """The open folder's gallery, report and tags again, as they are now: files added or captions changed on disk
    since, or a Train form whose preset (the report's checks), caption extension (the captions shown) or subsets
    changed."""
    if not folder:
        return gr.skip(), gr.skip(), gr.skip()
    target = open_folder(app, folder)
    return folder_view(target, preset, caption_extension(extension), listed_subset(app, target, subsets))


def upload(
    app: AppState, folder: str | None, new_name: str, files: list[str] | None, preset: str | None = None,
    extension: str | None = None, subsets: str | None = None,
) -> tuple[str, str, list, str, list, str, str]:  # fmt: skip
    """Copy uploads (images and same-name .txt or .caption captions) into the open folder, or into datasets/<new
    name>."""
    if not files:
        raise LoraStudioError("No files were uploaded; pick images (and their .txt captions) to add.")
    extension = caption_extension(extension)
    target = new_dataset_folder(app, new_name) if new_name.strip() or not folder else open_folder(app, folder)
    paths = uploaded_files(app, files)
    # Gradio keeps the browser's file name as the temp file's name; it is sanitized again on import.
    result = import_files(target, paths, [p.name for p in paths])
    message = f"Added {len(result.images)} images and {len(result.captions)} captions to {target}."
    if result.skipped:
        message += " Skipped: " + "; ".join(result.skipped)
    subset = listed_subset(app, target, subsets)
    return (str(target), str(target), *folder_view(target, preset, extension, subset), message,
            train_dataset(target, subset))


def save_caption(
    app: AppState, folder: str | None, image_path: str, caption: str, extension: str | None = None,
    subsets: str | None = None,
) -> tuple[list, str]:  # fmt: skip
    target = open_folder(app, folder)
    extension = folder_extension(listed_subset(app, target, subsets), extension)
    path = write_caption(target, Path(image_path or "").name, caption, extension)
    return gallery_items(target, extension), f"Saved {path.name}."


def apply_bulk_edit(
    app: AppState, folder: str | None, trigger: str, prefix: str, suffix: str, find: str, replace: str,
    preset: str | None = None, extension: str | None = None, subsets: str | None = None,
) -> tuple[list, str, list, str]:  # fmt: skip
    target = open_folder(app, folder)
    subset = listed_subset(app, target, subsets)
    changed = bulk_edit(target, BulkEdit(find=find, replace=replace, prefix=prefix, suffix=suffix,
                                         trigger_word=trigger), folder_extension(subset, extension))  # fmt: skip
    message = f"Changed {len(changed)} captions." if changed else "No caption needed a change."
    return *folder_view(target, preset, caption_extension(extension), subset), message


def editor_value(picture) -> dict:
    return {"background": picture, "layers": [], "composite": picture}


def show_mask(app: AppState, folder: str | None, image_path: str) -> tuple:
    """The selected image with its mask over it (red: ignored), and the painting canvas on it."""
    picture = mask_overlay(open_folder(app, folder), Path(image_path or "").name)
    return picture, editor_value(picture)


def save_mask(app: AppState, folder: str | None, image_path: str, painted: dict | None) -> tuple:
    """The strokes painted on the canvas become ignored area of the image's mask, saved beside it."""
    layers = list((painted or {}).get("layers") or [])
    if not image_path:
        raise LoraStudioError("Select an image in the gallery first, then paint over what to ignore.")
    if not layers:
        raise LoraStudioError("Nothing is painted; paint over the area the LoRA should ignore, then save.")
    target = open_folder(app, folder)
    path = save_painted_mask(target, Path(image_path).name, layers)
    return *show_mask(app, folder, image_path), f"Saved {path.name}: painted areas are ignored by masked loss."


def remove_mask(app: AppState, folder: str | None, image_path: str) -> tuple:
    removed = clear_mask(open_folder(app, folder), Path(image_path or "").name)
    note = "Removed the mask: the whole image is learned." if removed else "This image has no mask."
    return *show_mask(app, folder, image_path), note


def image_losses(app: AppState, run_name: str | None) -> list[list]:
    """A run's per-image losses, highest first: the held-out images' from its last validation pass, then the training
    images' mean over its last finished epoch (high ones are worth a look: a wrong caption, an odd crop)."""
    run = checked_run(app, run_name)
    record = run.read_image_losses()
    if not record:
        raise LoraStudioError(f"{run.name} has no per-image losses yet; they are written as each epoch ends.")
    rows = []
    for kind in ("validation", "training"):
        part = record.get(kind)
        if part:
            rows += [[Path(path).name, Path(path).parent.name, kind, round(float(loss), 6)]
                     for path, loss in part["images"].items()]  # fmt: skip
    return rows


# --- a local captioner -----------------------------------------------------------------------------------------

PREVIEW_CAPTIONS = 4  # images captioned (not written) by "Preview"


def captioner_choices() -> gr.Dropdown:
    from ..captioner import list_captioners

    choices = [(info.label, info.name) for info in list_captioners()]
    return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)


def chosen_captioner(app: AppState, name: str | None, threshold: float):
    """The captioner folder `name` of models/captioners/ (only a listed one), loaded once and kept."""
    from ..captioner import list_captioners, load_captioner
    from ..paths import captioners_dir

    found = {info.name: info for info in list_captioners()}
    if not name and found:
        raise LoraStudioError(f"Pick a captioner first: {', '.join(found)}.")
    if name not in found:
        what = f"No captioner named {shortened(str(name))!r} is" if name else "No captioner is"
        raise LoraStudioError(f"{what} in {captioners_dir()}; put a captioning model's folder there (BLIP, Florence-2 "
                              "or a WD14 tagger), then press Refresh.")  # fmt: skip
    if not 0.0 < float(threshold) < 1.0:
        raise LoraStudioError(f"The tag threshold must lie between 0 and 1, not {threshold}.")
    key = (str(found[name].path), float(threshold))
    if app.loaded_captioner is None or app.loaded_captioner[0] != key:
        app.loaded_captioner = None  # the old model goes before the new one loads
        app.loaded_captioner = (key, load_captioner(found[name].path, float(threshold)))
    return app.loaded_captioner[1]


def preview_captions(app: AppState, folder: str | None, name: str | None, mode: str, trigger: str, threshold: float,
                     extension: str | None = None, subsets: str | None = None) -> list[list]:  # fmt: skip
    """What captioning would write for the first few images, written nowhere."""
    from ..captioner import caption_dataset

    target = open_folder(app, folder)
    extension = folder_extension(listed_subset(app, target, subsets), extension)
    captioner = chosen_captioner(app, name, threshold)
    results = caption_dataset(target, captioner, mode, trigger[:200], limit=PREVIEW_CAPTIONS, write=False,
                              extension=extension)  # fmt: skip
    return [[r.image.name, r.before or "", r.after if r.after is not None else "(kept as it is)"] for r in results]


def caption_all(app: AppState, folder: str | None, name: str | None, mode: str, trigger: str, threshold: float,
                batch: int, preset: str | None = None, extension: str | None = None, subsets: str | None = None,
                progress=gr.Progress()) -> tuple:  # fmt: skip
    """Caption every image of the open folder, batch by batch, each write atomic; Stop ends it after a batch."""
    from ..captioner import caption_dataset

    target = open_folder(app, folder)
    subset = listed_subset(app, target, subsets)
    form_extension, extension = caption_extension(extension), folder_extension(subset, extension)
    captioner = chosen_captioner(app, name, threshold)
    app.caption_stop.clear()

    def report(done: int, total: int) -> None:
        progress((done, total), desc="captioning", unit="images")

    try:
        results = caption_dataset(target, captioner, mode, trigger[:200], int(batch), extension=extension,
                                  progress=report, should_stop=app.caption_stop.is_set)  # fmt: skip
        message = f"Wrote {sum(r.written for r in results)} captions ({len(results)} images, mode {mode})."
    except StoppedEarly as exc:
        message = str(exc)
    return *folder_view(target, preset, form_extension, subset), message


def stop_captioning(app: AppState) -> str:
    app.caption_stop.set()
    return "Stopping after the current batch; what is written stays."


def run_names(app: AppState) -> gr.Dropdown:
    return gr.Dropdown(choices=[run.name for run in list_runs(app.roots.runs)])


def caption_section(parts: dict) -> None:
    """The captioner picker, its settings, Preview / Caption all / Stop and the preview table, into `parts`."""
    with gr.Accordion("Caption with a model on this computer", open=False, elem_id="dataset-caption-section"):
        with gr.Row():
            parts["captioner"] = gr.Dropdown([], label="Captioner (a folder in models/captioners)", scale=3,
                                             elem_id="dataset-captioner")  # fmt: skip
            parts["captioner_refresh"] = gr.Button("Refresh", scale=1)
            parts["caption_mode"] = gr.Radio(["missing", "prepend", "append", "overwrite"], value="missing",
                                             label="Images that have a caption", scale=3,
                                             info="missing: caption only those without one")  # fmt: skip
        with gr.Row():
            parts["caption_trigger"] = gr.Textbox(label="Trigger word (put first)", max_length=200)
            parts["caption_threshold"] = gr.Number(0.35, label="Tag threshold (taggers)", minimum=0.01, maximum=0.99)
            parts["caption_batch"] = gr.Number(4, label="Batch", precision=0, minimum=1, maximum=32)
        with gr.Row():
            parts["caption_preview"] = gr.Button(f"Preview the first {PREVIEW_CAPTIONS}", elem_id="caption-preview")
            parts["caption_all"] = gr.Button("Caption all", variant="primary", elem_id="caption-all")
            parts["caption_stop"] = gr.Button("Stop", variant="stop", elem_id="caption-stop")
        parts["caption_rows"] = gr.Dataframe(headers=["image", "caption now", "would become"], interactive=False,
                                             elem_id="caption-preview-table")  # fmt: skip


def build() -> dict[str, gr.components.Component]:
    """The tab's components; `connect` wires their events once the Train tab exists."""
    parts = {}
    with gr.Row():
        parts["source"] = gr.Textbox(
            label="Dataset folder",
            value="demo",
            scale=4,
            elem_id="dataset-source",
            info="A folder of images with same-name captions (the Train form's caption extension, .txt by default), "
            "a kohya 10_name/ parent, a dataset's name in datasets/, or demo",
        )
        parts["open"] = gr.Button("Open", elem_id="dataset-open", scale=1)
        parts["form_folder"] = gr.Dropdown([], label="Or a folder the Train form trains on", scale=3,
                                           elem_id="dataset-form-folder")  # fmt: skip
    parts["folder"] = gr.Textbox(label="Editing", interactive=False, elem_id="dataset-folder")
    parts["open_folder"] = gr.State(None)  # server-side: the folder open_dataset or upload resolved
    with gr.Row():
        parts["files"] = gr.File(label="Upload images and captions", file_count="multiple", type="filepath",
                                 elem_id="dataset-upload")  # fmt: skip
        parts["new_name"] = gr.Textbox(label="New dataset name (empty: add to the open folder)",
                                       elem_id="dataset-new-name")  # fmt: skip
    parts["status"] = gr.Markdown(elem_id="dataset-status")
    parts["gallery"] = gr.Gallery(label="Images", columns=8, allow_preview=False, elem_id="dataset-gallery")
    parts["selected"] = gr.State("")
    with gr.Row():
        parts["caption"] = gr.Textbox(label="Caption of the selected image", scale=4, elem_id="caption-edit")
        parts["save"] = gr.Button("Save caption", elem_id="caption-save", scale=1)
    with gr.Accordion("Mask of the selected image (masked loss)", open=False, elem_id="dataset-mask-section"):
        with gr.Row():
            parts["mask_view"] = gr.Image(label="The image with its mask (red: ignored)", interactive=False,
                                          type="pil", elem_id="dataset-mask-view")  # fmt: skip
            parts["mask_editor"] = gr.ImageEditor(
                label="Paint over what the LoRA should ignore, then save", type="numpy", elem_id="dataset-mask-editor",
                brush=gr.Brush(colors=["#dc2626"], color_mode="fixed"), sources=(), transforms=(),
            )  # fmt: skip
        with gr.Row():
            parts["mask_save"] = gr.Button("Save mask", elem_id="dataset-mask-save")
            parts["mask_clear"] = gr.Button("Remove mask", elem_id="dataset-mask-clear")
    with gr.Accordion("Bulk edit", open=False):
        with gr.Row():
            for key, label in (("trigger", "Trigger word"), ("prefix", "Prefix"), ("suffix", "Suffix"),
                               ("find", "Find"), ("replace", "Replace with")):  # fmt: skip
                parts[key] = gr.Textbox(label=label)
        parts["bulk"] = gr.Button("Apply to every caption", elem_id="bulk-apply")
    caption_section(parts)
    with gr.Accordion("Per-image loss of a run (highest first)", open=False, elem_id="dataset-losses-section"):
        with gr.Row():
            parts["loss_run"] = gr.Dropdown([], label="Run", scale=4, elem_id="dataset-loss-run")
            parts["loss_show"] = gr.Button("Show losses", scale=1, elem_id="dataset-loss-show")
        parts["losses"] = gr.Dataframe(headers=["image", "folder", "set", "loss"], interactive=False,
                                       elem_id="dataset-losses")  # fmt: skip
    parts["report"] = gr.Markdown(elem_id="dataset-report")
    parts["tags"] = gr.Dataframe(headers=["tag", "count"], label="Tag frequency", interactive=False)
    return parts


def connect(
    app: AppState, blocks: gr.Blocks, parts: dict, preset: gr.Dropdown, train_dataset: gr.components.Component,
    extension: gr.components.Component, page: gr.Tab, subsets: gr.components.Component,
) -> None:
    """Events: the Train tab's preset sets the report's checks, its caption extension which caption files are shown
    and edited, and the open folder becomes its dataset (unless it is one of its `subsets`). Selecting the tab
    (`page`) shows the folder as it is now."""
    p = parts
    state = p["open_folder"]
    view = [state, p["folder"], p["gallery"], p["report"], p["tags"]]
    # show_progress_on: a refusal's badge goes on the message, not over the gallery (ui/errors.py says why)
    opening = [p["source"], preset, extension, subsets]
    gr.on([p["open"].click, blocks.load], shown(open_dataset, app), opening, [*view, train_dataset],
          show_progress_on=p["report"])  # blocks.load: the demo  # fmt: skip
    # The picker reads the form's folders when the tab is shown and when it is opened; not on each change of the form's
    # fields, which typing a path or a subset line sets off at every key (each event ~250 ms of the page's CPU).
    gr.on([page.select, p["form_folder"].focus], form_folders, [train_dataset, subsets], p["form_folder"], queue=False)
    p["form_folder"].input(lambda folder: folder or gr.skip(), p["form_folder"], p["source"]).then(
        shown(open_dataset, app), opening, [*view, train_dataset], show_progress_on=p["report"])
    page.select(shown(current_view, app), [state, preset, extension, subsets],
                [p["gallery"], p["report"], p["tags"]], show_progress_on=p["report"])  # fmt: skip
    blocks.load(shown(run_names, app), None, p["loss_run"])
    uploaded = p["files"].upload(shown(upload, app), [state, p["new_name"], p["files"], preset, extension, subsets],
                                 [*view, p["status"], train_dataset], show_progress_on=p["status"])  # fmt: skip
    uploaded.success(lambda: None, None, p["files"])  # the files are in the gallery now; empty the drop zone

    def pick(items, evt: gr.SelectData):
        path, label = items[evt.index][0], items[evt.index][1]
        return (path["image"]["path"] if isinstance(path, dict) else path), label or ""

    p["gallery"].select(pick, [p["gallery"]], [p["selected"], p["caption"]]).then(
        shown(show_mask, app), [state, p["selected"]], [p["mask_view"], p["mask_editor"]]
    )
    mask_outputs = [p["mask_view"], p["mask_editor"], p["status"]]
    p["mask_save"].click(shown(save_mask, app), [state, p["selected"], p["mask_editor"]], mask_outputs,
                         show_progress_on=p["status"])  # fmt: skip
    p["mask_clear"].click(shown(remove_mask, app), [state, p["selected"]], mask_outputs, show_progress_on=p["status"])
    p["loss_run"].focus(shown(run_names, app), None, p["loss_run"])
    blocks.load(shown(captioner_choices), None, p["captioner"])
    p["captioner_refresh"].click(shown(captioner_choices), None, p["captioner"])
    settings = [state, p["captioner"], p["caption_mode"], p["caption_trigger"], p["caption_threshold"]]
    p["caption_preview"].click(shown(preview_captions, app), [*settings, extension, subsets], p["caption_rows"])
    p["caption_all"].click(shown(caption_all, app), [*settings, p["caption_batch"], preset, extension, subsets],
                           [p["gallery"], p["report"], p["tags"], p["status"]],
                           show_progress_on=p["status"])  # fmt: skip
    p["caption_stop"].click(shown(stop_captioning, app), None, p["status"])
    p["loss_show"].click(shown(image_losses, app), p["loss_run"], p["losses"])
    p["save"].click(shown(save_caption, app), [state, p["selected"], p["caption"], extension, subsets],
                    [p["gallery"], p["status"]], show_progress_on=p["status"])  # fmt: skip
    bulk_inputs = [state, p["trigger"], p["prefix"], p["suffix"], p["find"], p["replace"], preset, extension,
                   subsets]
    p["bulk"].click(shown(apply_bulk_edit, app), bulk_inputs, [p["gallery"], p["report"], p["tags"], p["status"]],
                    show_progress_on=p["status"])  # fmt: skip
