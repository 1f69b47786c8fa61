"""Caption a dataset with a captioning model the person already has on disk: nothing is downloaded.

A captioner is a folder in `models/captioners/` (or any folder given to the CLI):
- an image-to-text model of transformers (BLIP, BLIP-2, Florence-2, GIT...): `config.json`, its weights and its
  processor files, loaded with `AutoProcessor` / `AutoModelForImageTextToText` from that folder only;
- a WD14-style tagger (SmilingWolf's): `model.onnx` and `selected_tags.csv`, run with onnxruntime. Its tags above a
  threshold become the caption, most confident first, as kohya's `tag_images_by_wd14_tagger.py` writes them.

`caption_dataset` writes one caption per image (fill missing ones only, prepend, append or overwrite; the trigger
word first), each through a temp file and a rename; a preview captions the first few without writing anything.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DatasetConfig
from .data import find_concept_folders, image_files, open_image, read_caption
from .dataset_edit import caption_file_text
from .errors import LoraStudioError, StoppedEarly
from .fsutil import write_text_atomic
from .paths import captioners_dir, is_within

log = logging.getLogger(__name__)

CAPTION_MODES = ("missing", "prepend", "append", "overwrite")  # what happens to an image that has a caption
TAGGER_FILES = ("model.onnx", "selected_tags.csv")
FLORENCE_TASK = "<MORE_DETAILED_CAPTION>"  # Florence-2 answers a task prompt; this one gives a sentence or two
MAX_BATCH = 32
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}  # fmt: skip  # tags whose underscores are the face


class CaptionerError(LoraStudioError):
    """A captioner folder that cannot be used, or a captioning request that cannot be done."""


@dataclass(frozen=True)
class CaptionerInfo:
    name: str
    path: Path
    kind: str  # "tagger" (WD14, ONNX) or "image-to-text" (transformers)
    model_type: str = ""  # transformers' model_type: blip, blip-2, florence2, ...

    @property
    def label(self) -> str:
        return f"{self.name} ({'WD14 tagger' if self.kind == 'tagger' else self.model_type or 'image-to-text'})"


def describe_captioner(folder: Path) -> CaptionerInfo:
    """What kind of captioner a folder holds, from its files; a clear error for anything else."""
    import json

    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionerError(f"The captioner {folder} is not a folder; put the model's files in a folder of their "
                             f"own in {captioners_dir()}.")  # fmt: skip
    if all((folder / name).is_file() for name in TAGGER_FILES):
        return CaptionerInfo(folder.name, folder, "tagger")
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = str(json.loads(config.read_text(encoding="utf-8")).get("model_type", ""))
        except (ValueError, OSError, AttributeError) as exc:
            raise CaptionerError(f"{config} cannot be read as a model config ({exc}); re-copy the model.") from None
        return CaptionerInfo(folder.name, folder, "image-to-text", model_type)
    raise CaptionerError(
        f"{folder} holds no captioner: a transformers image-to-text model needs config.json and its weights, a WD14 "
        "tagger model.onnx and selected_tags.csv."
    )


def list_captioners(root: Path | None = None) -> list[CaptionerInfo]:
    """The usable captioner folders in `models/captioners/`; others are skipped (the Models tab can check one)."""
    root = root or captioners_dir()
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            found.append(describe_captioner(folder))
        except CaptionerError as exc:
            log.info("not a captioner: %s", exc)
    return found


# --- the two kinds ---------------------------------------------------------------------------------------------


class OnnxTagger:
    """A WD14-style tagger: the image padded square on white, resized to the model's side, BGR, 0-255 floats;
    general tags above `threshold` and character tags above `character_threshold`, most confident first."""

    def __init__(self, folder: Path, threshold: float = 0.35, character_threshold: float = 0.85):
        import onnxruntime

        self.threshold, self.character_threshold = threshold, character_threshold
        self.tags, self.categories = read_tags(folder / "selected_tags.csv")
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=providers)
        except Exception as exc:  # onnxruntime raises its own kinds for a damaged or foreign file
            raise CaptionerError(f"{folder / 'model.onnx'} cannot be loaded by onnxruntime ({exc}).") from None
        model_input = self.session.get_inputs()[0]
        self.input_name, self.side = model_input.name, int(model_input.shape[1])
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.tags):
            raise CaptionerError(f"{folder}: the model scores {outputs} tags but selected_tags.csv lists "
                                 f"{len(self.tags)}; the two files belong to different taggers.")  # fmt: skip

    def prepare(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        square = square.resize((self.side, self.side), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR, as the WD14 models were trained

    def caption(self, images: list[Image.Image]) -> list[str]:
        batch = np.stack([self.prepare(image) for image in images])
        (scores,) = self.session.run(None, {self.input_name: batch})
        return [self.tags_of(row) for row in scores]

    def tags_of(self, scores: np.ndarray) -> str:
        chosen = []
        for index in np.argsort(-scores):
            limit = {0: self.threshold, 4: self.character_threshold}.get(self.categories[index])
            if limit is not None and scores[index] >= limit:
                tag = self.tags[index]
                chosen.append(tag if tag in KAOMOJI else tag.replace("_", " "))
        return ", ".join(chosen)


def read_tags(path: Path) -> tuple[list[str], list[int]]:
    """selected_tags.csv: (names, categories) in the model's output order (0 general, 4 character, 9 rating)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [row["name"] for row in rows], [int(row["category"]) for row in rows]
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise CaptionerError(f"{path} is not a tagger's tag list (tag_id,name,category,count): {exc}") from None


class TransformersCaptioner:
    """An image-to-text model of transformers, from its folder only (local_files_only: nothing is fetched)."""

    def __init__(self, info: CaptionerInfo, device: str | None = None, max_new_tokens: int = 60):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .models import pick_device

        self.device = torch.device(device) if device else pick_device()
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(info.path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(info.path, local_files_only=True, dtype=self.dtype)
            self.model = model.to(self.device).eval()
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for what it cannot load
            raise CaptionerError(f"{info.path} cannot be loaded as an image-to-text model "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).") from None  # fmt: skip
        self.prompt = FLORENCE_TASK if info.model_type == "florence2" else None
        self.max_new_tokens = max_new_tokens

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        rgb = [image.convert("RGB") for image in images]
        text = [self.prompt] * len(rgb) if self.prompt else None
        inputs = self.processor(images=rgb, text=text, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if self.prompt and "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            ids = ids[:, inputs["input_ids"].shape[1] :]  # a decoder-only model repeats its prompt first
        return [" ".join(t.replace(self.prompt or "", "").split()) for t in
                self.processor.batch_decode(ids, skip_special_tokens=True)]  # fmt: skip


def load_captioner(folder: Path, threshold: float = 0.35, device: str | None = None):
    info = describe_captioner(folder)
    return OnnxTagger(info.path, threshold) if info.kind == "tagger" else TransformersCaptioner(info, device)


# --- captioning a dataset ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionResult:
    image: Path
    before: str | None  # the caption file's text before, None without one
    after: str | None  # what is (or would be) written; None: left as it was
    written: bool


def combined(before: str | None, generated: str, mode: str, trigger: str) -> str | None:
    """The caption an image gets: None when `mode` leaves it alone (fill missing only, and it has one)."""
    if mode not in CAPTION_MODES:
        raise CaptionerError(f"Caption mode {mode!r} is unknown; choose one of: {', '.join(CAPTION_MODES)}.")
    existing = (before or "").strip()
    if mode == "missing" and existing:
        return None
    parts = {"prepend": [generated, existing], "append": [existing, generated]}.get(mode, [generated])
    tags = [t.strip() for part in parts for t in part.split(",") if t.strip()]
    word = trigger.strip()
    if word and word not in tags:
        tags.insert(0, word)
    return ", ".join(" ".join(t.split()) for t in tags)


def dataset_images(root: Path) -> list[Path]:
    """Every training image of a dataset, in either layout (kohya's N_name/ folders, or plain)."""
    sources, problems = find_concept_folders(root, DatasetConfig(path=str(root)))
    if not sources:
        raise CaptionerError(problems[0].message if problems else f"{root} has no images to caption.")
    return [image for source in sources for image in image_files(source.folder)]


def caption_dataset(
    root: Path, captioner, mode: str = "missing", trigger: str = "", batch_size: int = 4, limit: int | None = None,
    write: bool = True, extension: str = ".txt", progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[CaptionResult]:  # fmt: skip
    """Caption the dataset's images (the first `limit` with a limit) in batches; each write is atomic, so a stop or
    a crash leaves every caption whole. `write=False` only shows what would be written (the preview)."""
    combined("", "", mode, trigger)  # a bad mode fails before any model work
    if not 1 <= batch_size <= MAX_BATCH:
        raise CaptionerError(f"The batch size must be 1 to {MAX_BATCH}, not {batch_size}.")
    images = dataset_images(root)[:limit]
    results: list[CaptionResult] = []
    for start in range(0, len(images), batch_size):
        if should_stop is not None and should_stop():
            raise StoppedEarly(f"Stopped after {start} of {len(images)} images; their captions are written, the "
                               "rest are as they were.")  # fmt: skip
        batch = images[start : start + batch_size]
        pictures = []
        for path in batch:
            if not is_within(path, root):
                raise CaptionerError(f"{path.name} is a link to a file outside {root}; copy the file in.")
            pictures.append(open_image(path))
        for path, generated in zip(batch, captioner.caption(pictures), strict=True):
            before, _notes = read_caption(path, extension)
            after = combined(before, generated, mode, trigger)
            if write and after is not None and after != (before or "").strip():
                caption_file = path.with_suffix(extension)
                write_text_atomic(caption_file, caption_file_text(after, caption_file))
                results.append(CaptionResult(path, before, after, True))
            else:
                results.append(CaptionResult(path, before, after, False))
        if progress is not None:
            progress(len(results), len(images))
    return results
