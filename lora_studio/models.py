"""Loading a base model, offline, from whatever a person has on disk.

`load_base(source)` accepts:
- `"demo"`: the bundled demo model under `assets/demo-model/`;
- a diffusers folder (`model_index.json` plus component folders);
- a single-file checkpoint in the original LDM/SGM layout (SD1.x, SD2.x 512/768-v, SDXL), whose
  family is detected from its keys and which loads through diffusers' `from_single_file` with the
  configs bundled in `assets/sd-configs/<family>/`, so no config is ever fetched;
- a hub id (`org/name`) only when it is already in the local Hugging Face cache.

Pickled checkpoints (`.ckpt`, `.pt`, `.bin`) can run code when unpickled; they are refused unless
`allow_pickle=True`, and then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from .errors import ModelLoadError
from .paths import DEMO_MODEL_DIR, sd_config_dir
from .safetensors_io import SafetensorsFileError, read_header

if TYPE_CHECKING:  # torch and diffusers load on first use: the app's page must come up before them
    import torch
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x (512, epsilon)", "sd2-v": "SD 2.x (768, v)", "sdxl": "SDXL"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
# kohya/A1111 name of each family, written into metadata so other tools recognise our files.
MODELSPEC_ARCHITECTURE = {  # modelspec.architecture of a base model; a LoRA of it appends "/lora"
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
LORA_KEY_MARKERS = ("lora_down", "lora_up", ".lora_A.", ".lora_B.", "hada_w1", "lokr_w1", ".lora.down.")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BaseModel:
    """A loaded Stable Diffusion base model: the diffusers pipeline plus what we know about it."""

    pipeline: DiffusionPipeline
    family: str
    prediction_type: str  # "epsilon" or "v_prediction", as diffusers' schedulers name them
    native_resolution: int
    source: str
    notes: list[str] = field(default_factory=list)  # assumptions made while loading, shown to the user

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        encoders = [self.pipeline.text_encoder, getattr(self.pipeline, "text_encoder_2", None)]
        return [e for e in encoders if e is not None]

    def lora_parts(self, text_encoders: bool = True) -> dict[str, torch.nn.Module]:
        """The components LoRA goes into, named as diffusers' LoRA files and `load_lora_weights` name them."""
        parts = {"unet": self.unet}
        if text_encoders:
            parts |= {("text_encoder" if i == 0 else "text_encoder_2"): e for i, e in enumerate(self.text_encoders)}
        return parts

    @property
    def tokenizers(self) -> list:
        tokenizers = [self.pipeline.tokenizer, getattr(self.pipeline, "tokenizer_2", None)]
        return [t for t in tokenizers if t is not None]

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device


# --- device and dtype ----------------------------------------------------------------------------


def pick_device() -> torch.device:
    """CUDA, then Apple's MPS, then the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPE_NAMES = {"no": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # mixed and save precisions


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision setting: mixed_precision ("no", "fp16", "bf16") or a save precision."""
    import torch

    return getattr(torch, DTYPE_NAMES[precision])


def pick_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on a GPU; fp32 on the CPU, where half is slow or missing."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


# --- reading a checkpoint's table of contents ---------------------------------------------------


@dataclass
class CheckpointIndex:
    """The names and shapes of a checkpoint's tensors, and its metadata, without loading the data."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_safetensors_index(path: Path) -> CheckpointIndex:
    """Names, shapes and metadata from the shared header reader, which turns any malformed header into a sentence."""
    try:
        header = read_header(path)
    except SafetensorsFileError as exc:
        raise ModelLoadError(str(exc)) from None
    return CheckpointIndex(path, header.shapes, header.metadata)


def read_pickle_index(path: Path, allow_pickle: bool) -> CheckpointIndex:
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} is a pickle checkpoint ({path.suffix}), which can run code when opened, so it is refused; "
            "convert it to .safetensors, or allow pickle files explicitly if you trust its source."
        )
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise ModelLoadError(
            f"{path} could not be read as a weights-only checkpoint ({type(exc).__name__}); "
            "it may be damaged or contain code objects; convert it to .safetensors with the tool that made it."
        ) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return CheckpointIndex(path, shapes, {})


def read_checkpoint_index(path: Path, allow_pickle: bool = False) -> CheckpointIndex:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return read_pickle_index(path, allow_pickle)
    return read_safetensors_index(path)


# --- family detection ----------------------------------------------------------------------------


@dataclass
class Detected:
    family: str
    prediction_type: str
    notes: list[str]


def detect_family(index: CheckpointIndex, prediction_type: str | None = None) -> Detected:
    """Tell SD1 / SD2 / SD2-v / SDXL apart from the key layout, or say clearly what the file is instead."""
    keys = index.shapes.keys()
    _reject_non_base_models(index)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        family = "sdxl"
    elif has("conditioner.embedders.0.model."):
        raise ModelLoadError(
            f"{index.path} is an SDXL refiner, which is not a base model for LoRA training; "
            "pick the SDXL base checkpoint (or a fine-tune of it)."
        )
    elif has(layout.SD2_TEXT_PREFIX):
        family = "sd2"
    elif has(layout.SD1_TEXT_PREFIX):
        family = "sd1"
    else:
        raise ModelLoadError(
            f"{index.path} has a UNet but no text encoder (no cond_stage_model.* or conditioner.* keys); "
            "LoRA training needs a full checkpoint, so use the complete model file."
        )
    in_channels = index.shapes.get(layout.UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise ModelLoadError(
            f"{index.path} is a {in_channels}-channel UNet (an inpainting or other special model); "
            "train LoRAs on the ordinary text-to-image base model of that family."
        )
    prediction, notes = _prediction_type(index, family, prediction_type)
    return Detected(with_prediction(family, prediction), prediction, notes)


def _reject_non_base_models(index: CheckpointIndex) -> None:
    keys = list(index.shapes)
    path = index.path
    if any(m in k for k in keys for m in LORA_KEY_MARKERS) or any(k.startswith("lora_") for k in keys):
        raise ModelLoadError(
            f"{path} is a LoRA adapter, not a base model; choose the checkpoint it was trained on as the base "
            "and load this file as an adapter in the Preview tab."
        )
    if any(k.startswith(layout.UNET_PREFIX) for k in keys):
        return
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        what = "a Flux model"
    elif any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
        what = "an SD3 model"
    elif any(
        k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.", "encoder.down_blocks.")) for k in keys
    ):
        what = "a VAE on its own"
    elif any(k.startswith(("down_blocks.", "mid_block.")) for k in keys):
        what = "a diffusers-format UNet weights file"
    else:
        what = "not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)"
    raise ModelLoadError(
        f"{path} is {what}, an architecture LoRA Studio cannot train on; "
        "give an SD 1.x, SD 2.x or SDXL checkpoint (.safetensors) or a diffusers folder of one."
    )


def _prediction_type(index: CheckpointIndex, family: str, requested: str | None) -> tuple[str, list[str]]:
    """Epsilon or v: the caller's choice, else the file's own metadata, else a guess from its name."""
    if requested:
        return _normalise_prediction(requested), []
    declared = index.metadata.get("modelspec.prediction_type") or index.metadata.get("prediction_type")
    if declared:
        return _normalise_prediction(declared), []
    if "v_pred" in index.shapes:  # marker tensor some v-prediction SDXL fine-tunes carry (read by ComfyUI)
        return "v_prediction", []
    if family == "sd2":
        name = index.path.name.lower()
        if "768" in name or re.search(r"(^|[-_.])v[-_]?pred", name):
            return "v_prediction", [
                f"assumed v-prediction for {index.path.name} (768 in its name); override it if wrong"
            ]
        return "epsilon", [
            f"assumed epsilon prediction for SD2 file {index.path.name}; if it is a 768-v model, choose v-prediction"
        ]
    return "epsilon", []


def with_prediction(family: str, prediction: str) -> str:
    """SD2 is two families to its users (512 epsilon, 768 v); the others keep their name either way."""
    return "sd2-v" if family == "sd2" and prediction == "v_prediction" else family


def _normalise_prediction(value: str) -> str:
    v = value.strip().lower()
    if v in ("v", "v_prediction", "v-prediction", "vpred", "v_pred"):
        return "v_prediction"
    if v in ("epsilon", "eps", "noise"):
        return "epsilon"
    raise ModelLoadError(f"prediction type {value!r} is unknown; use 'epsilon' or 'v_prediction'.")


# --- loading -------------------------------------------------------------------------------------


def load_base(
    source: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    config: str | Path | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
) -> BaseModel:
    """Load a base model offline and freeze it in the working dtype on the working device.

    `config` overrides the bundled diffusers config folder used for single files (tests pass the
    folder of a tiny model); `prediction_type` overrides what is read or guessed from the file.
    """
    import torch

    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or pick_dtype(device)
    path, label = _resolve_source(source)
    if path.is_dir():
        base = _load_diffusers_folder(path, label, dtype, prediction_type)
    else:
        base = _load_single_file(path, dtype, config, prediction_type, allow_pickle)
    if base.device != device:
        base.pipeline.to(device)
    for module in (base.unet, base.vae, *base.text_encoders):
        module.requires_grad_(False)
        module.eval()
    return base


def _resolve_source(source: str | Path) -> tuple[Path, str]:
    text = str(source).strip()
    if text == "demo":
        if not (DEMO_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                f"the bundled demo model is missing from {DEMO_MODEL_DIR}; "
                "reinstall LoRA Studio from its checkout, or give the path to a checkpoint."
            )
        return DEMO_MODEL_DIR, "demo"
    path = Path(text).expanduser()
    if path.exists():
        return path, str(path)
    if HUB_ID.match(text):
        return resolve_cached_hub_id(text), text
    raise ModelLoadError(
        f"base model {text!r} was not found: there is no such file or folder; "
        "give the path to a .safetensors checkpoint or a diffusers folder."
    )


def resolve_cached_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of a hub id; never downloads."""
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: nothing usable is cached
        raise ModelLoadError(
            f"{repo_id!r} is neither a file or folder here nor a model in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): missing "
            "model_index.json and every component (unet, vae, text_encoder, tokenizer, scheduler); "
            "LoRA Studio works offline, so copy the model folder or a .safetensors file here and give its path."
        ) from None
    missing = missing_pipeline_files(folder)
    if missing:
        raise ModelLoadError(
            f"{repo_id!r} is only partly in the local Hugging Face cache ({folder}): missing {', '.join(missing)}; "
            "copy the complete model folder or a .safetensors file here and give its path."
        )
    return folder


def missing_pipeline_files(folder: Path) -> list[str]:
    """The files a diffusers folder lacks for an SD/SDXL pipeline (configs, weights, tokenizer files)."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return ["model_index.json"]
    index = _read_json(index_file)
    missing = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
            continue
        sub = folder / name
        if name.startswith("tokenizer"):
            # transformers >= 5 saves tokenizer.json alone; older folders have vocab.json + merges.txt.
            needed = [] if (sub / "tokenizer.json").is_file() else ["vocab.json", "merges.txt"]
        elif name == "scheduler":
            needed = ["scheduler_config.json"]
        else:
            needed = ["config.json"]
            if not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
                missing.append(f"{name}/*.safetensors")
        missing += [f"{name}/{f}" for f in needed if not (sub / f).is_file()]
    return missing


def _load_diffusers_folder(folder: Path, label: str, dtype: torch.dtype, prediction_type: str | None) -> BaseModel:
    missing = missing_pipeline_files(folder)
    if missing:
        raise ModelLoadError(
            f"{folder} is not a complete diffusers model folder: missing {', '.join(missing)}; "
            "give the folder that holds model_index.json, or a single .safetensors checkpoint."
        )
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        pipeline = DiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{folder} could not be loaded as a diffusers model ({exc}); check that the folder is complete."
        ) from exc
    if not isinstance(pipeline, StableDiffusionPipeline | StableDiffusionXLPipeline):
        raise ModelLoadError(
            f"{folder} holds a {type(pipeline).__name__}, not Stable Diffusion 1.x/2.x/XL; "
            "LoRA Studio trains only those families."
        )
    family = family_of_pipeline(pipeline)
    predicted = _normalise_prediction(prediction_type or pipeline.scheduler.config.get("prediction_type", "epsilon"))
    _set_prediction_type(pipeline, predicted)
    return _finish(pipeline, with_prediction(family, predicted), predicted, label, [])


def family_of_pipeline(pipeline: DiffusionPipeline) -> str:
    return family_of_configs(type(pipeline).__name__, pipeline.unet.config, pipeline.text_encoder.config.hidden_act)


def family_of_configs(pipeline_class: str, unet_config: Mapping, text_hidden_act: str) -> str:
    """SD1, SD2 or SDXL from a diffusers folder's configs alone (no weights needed)."""
    if pipeline_class == "StableDiffusionXLPipeline":
        return "sdxl"
    cross_dim = unet_config.get("cross_attention_dim")
    if cross_dim in (768, 1024):
        return "sd1" if cross_dim == 768 else "sd2"
    # Small custom models: OpenCLIP (SD2) text encoders use gelu, OpenAI CLIP (SD1) quick_gelu.
    return "sd2" if text_hidden_act == "gelu" else "sd1"


@dataclass
class SourceSummary:
    """What a base-model source is, found from headers and configs without loading any weights."""

    source: str
    kind: str  # "demo", "diffusers folder", "single file" or "hub cache"
    family: str
    prediction_type: str
    notes: list[str]


def describe_source(source: str | Path, allow_pickle: bool = False) -> SourceSummary:
    path, label = _resolve_source(source)
    if label == "demo":
        kind = "demo"
    elif label != str(path):
        kind = "hub cache"
    else:
        kind = "diffusers folder" if path.is_dir() else "single file"
    if path.is_dir():
        missing = missing_pipeline_files(path)
        if missing:
            raise ModelLoadError(f"{path} is not a complete diffusers model folder: missing {', '.join(missing)}.")
        index = _read_json(path / "model_index.json")
        unet = _read_json(path / "unet" / "config.json")
        text = _read_json(path / "text_encoder" / "config.json")
        family = family_of_configs(index.get("_class_name", ""), unet, text.get("hidden_act", ""))
        prediction = _normalise_prediction(
            _read_json(path / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
        )
        return SourceSummary(label, kind, with_prediction(family, prediction), prediction, [])
    detected = detect_family(read_checkpoint_index(path, allow_pickle))
    return SourceSummary(label, kind, detected.family, detected.prediction_type, detected.notes)


def find_local_models(folder: Path) -> list[Path]:
    """Checkpoint files and diffusers folders directly inside `folder` (not deeper), sorted by name.

    Pickle files are listed too, so the picker can say why they are refused rather than hide them.
    """
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if entry.is_dir() and (entry / "model_index.json").is_file():
            found.append(entry)
        elif entry.is_file() and entry.suffix.lower() in {".safetensors", *PICKLE_SUFFIXES}:
            found.append(entry)
    return found


def _read_json(path: Path) -> dict:
    """A diffusers config file as a dict; a damaged one is a ModelLoadError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(
            f"{path} cannot be read as JSON ({type(exc).__name__}); the model folder is damaged, so copy or "
            "export it again."
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object; the model folder is damaged, so copy or export it again.")
    return data


def bundled_models() -> list[tuple[str, str, bool]]:
    """(name, what it is, whether it is usable now) for what ships under assets/."""
    demo_ready = (DEMO_MODEL_DIR / "model_index.json").is_file()
    rows = [("demo", "tiny SD-family model for CPU runs; trains in minutes, no checkpoint needed", demo_ready)]
    for family in FAMILIES:
        ready = (sd_config_dir(family) / "model_index.json").is_file()
        rows.append(
            (family, f"offline configs and tokenizers: load your own {FAMILY_NAMES[family]} checkpoint", ready)
        )
    return rows


def _load_single_file(
    path: Path, dtype: torch.dtype, config: str | Path | None, prediction_type: str | None, allow_pickle: bool
) -> BaseModel:
    index = read_checkpoint_index(path, allow_pickle)
    detected = detect_family(index, prediction_type)
    config_dir = Path(config) if config else sd_config_dir(detected.family)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if detected.family == "sdxl" else StableDiffusionPipeline
    try:
        pipeline = pipeline_class.from_single_file(
            str(path), config=str(config_dir), dtype=dtype, local_files_only=True
        )
    except Exception as exc:  # diffusers raises ValueError/KeyError/RuntimeError for a mismatched file
        raise ModelLoadError(
            f"{path} looks like {detected.family} but its weights do not fit that architecture ({exc}); "
            "the file may be a merge of another family or damaged."
        ) from exc
    _set_prediction_type(pipeline, detected.prediction_type)
    return _finish(pipeline, detected.family, detected.prediction_type, str(path), detected.notes)


def _set_prediction_type(pipeline: DiffusionPipeline, prediction_type: str) -> None:
    if pipeline.scheduler.config.get("prediction_type") != prediction_type:
        scheduler_class = type(pipeline.scheduler)
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, prediction_type=prediction_type)


def _finish(pipeline: DiffusionPipeline, family: str, prediction: str, label: str, notes: list[str]) -> BaseModel:
    for note in notes:
        log.warning(note)
    return BaseModel(
        pipeline=pipeline,
        family=family,
        prediction_type=prediction,
        native_resolution=native_resolution(pipeline),
        source=label,
        notes=notes,
    )


def native_resolution(pipeline: DiffusionPipeline) -> int:
    """The image side the model was trained at: UNet sample size times the VAE's downsampling."""
    vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return int(pipeline.unet.config.sample_size) * vae_scale
