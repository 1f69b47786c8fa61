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

Reading a checkpoint's keys and telling its family is `checkpoints.py`; describing and listing the models
a person can pick (the models folder) is `catalogue.py`; this module loads.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoints import detect_family, family_of_configs, normalise_prediction, read_checkpoint_index, with_prediction
from .errors import ModelLoadError
from .paths import DEMO_MODEL_DIR, sd_config_dir

if TYPE_CHECKING:  # torch and diffusers load on first use: the app's page must come up before them
    import torch
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x (512, epsilon)", "sd2-v": "SD 2.x (768, v)", "sdxl": "SDXL"}
# The image side each family was trained at: what a preview renders when nothing else says (a diffusers folder says
# it in its configs, `native_side_of_configs`).
NATIVE_SIDE = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
# kohya/A1111 name of each family, written into metadata so other tools recognise our files.
MODELSPEC_ARCHITECTURE = {  # modelspec.architecture of a base model; a LoRA of it appends "/lora"
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # diffusers' component names, in pipeline order
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
        encoders = [getattr(self.pipeline, name, None) for name in TEXT_ENCODER_NAMES]
        return [e for e in encoders if e is not None]

    def lora_parts(self, text_encoders: bool = True) -> dict[str, torch.nn.Module]:
        """The components LoRA goes into, named as diffusers' LoRA files and `load_lora_weights` name them."""
        parts = {"unet": self.unet}
        if text_encoders:
            parts |= dict(zip(TEXT_ENCODER_NAMES, self.text_encoders, strict=False))
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


# --- family detection ----------------------------------------------------------------------------


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
    path, label = resolve_source(source)
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


def resolve_source(source: str | Path) -> tuple[Path, str]:
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
    index = read_config_json(index_file)
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
    predicted = normalise_prediction(prediction_type or pipeline.scheduler.config.get("prediction_type", "epsilon"))
    _set_prediction_type(pipeline, predicted)
    return _finish(pipeline, with_prediction(family, predicted), predicted, label, [])


def family_of_pipeline(pipeline: DiffusionPipeline) -> str:
    return family_of_configs(type(pipeline).__name__, pipeline.unet.config, pipeline.text_encoder.config.hidden_act)


def read_config_json(path: Path) -> dict:
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
    return native_side_of_configs(pipeline.unet.config, pipeline.vae.config)


def native_side_of_configs(unet: dict, vae: dict) -> int:
    """native_resolution from the UNet's and the VAE's configs (a folder's config.json files, or loaded models')."""
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
