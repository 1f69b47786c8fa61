"""Loading a base model, offline, from whatever a person has on disk.

`load_base(source)` accepts:
- `"demo"`: the bundled demo model under `assets/demo-model/`;
- a diffusers folder (`model_index.json` plus component folders);
- a single-file checkpoint in the original LDM/SGM layout (SD1.x, SD2.x 512/768-v, SDXL), whose
  family is detected from its keys and which loads through diffusers' `from_single_file` with the
  configs bundled in `assets/sd-configs/<family>/`, so no config is ever fetched;
- a hub id (`org/name`) only when it is already in the local Hugging Face cache.

`vae=` swaps in a VAE of the person's own (kohya's `--vae`: a fixed fp16 SDXL VAE, a sharper SD1 one), from a
.safetensors file in either key layout or a diffusers VAE folder (`load_vae`).

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

from .checkpoints import (
    detect_family,
    family_of_configs,
    normalise_prediction,
    read_checkpoint_index,
    vae_tensor_count,
    with_prediction,
)
from .config import shortened
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
    vae_source: str = ""  # the VAE used instead of the model's own, as named; "" for its own

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


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`, the step's inputs made on the CPU (latents, noise, timesteps, token ids). To a GPU through
    pinned memory and without waiting: torch copies from ordinary (pageable) memory with a stream synchronise after,
    so each such copy made the CPU wait for everything queued on the GPU, and a step could not be queued while the
    last one ran. The pinned block goes back to torch's pool only once the copy is done."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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
    vae: str | Path | None = None,
    fp8_unet: bool = False,
    fp8_text_encoders: bool = False,
) -> BaseModel:
    """Load a base model offline and freeze it in the working dtype on the working device.

    `config` overrides the bundled diffusers config folder used for single files (tests pass the
    folder of a tiny model); `prediction_type` overrides what is read or guessed from the file;
    `vae` names a VAE to use instead of the model's own (see `load_vae`); `fp8_unet` and `fp8_text_encoders`
    store those parts' Linear/Conv2d weights in 8 bits (`fp8.narrow_frozen_weights`, training's fp8_base) before
    they reach the device, so the device never holds them wide.
    """
    import torch

    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or pick_dtype(device)
    path, label = resolve_source(source)
    if path.is_dir():
        base = _load_diffusers_folder(path, label, dtype, prediction_type)
    else:
        base = _load_single_file(path, dtype, config, prediction_type, allow_pickle)
    if vae is not None and str(vae).strip():
        base.pipeline.vae = load_vae(vae, like=base.vae)
        base.vae_source = str(vae).strip()
    for module in (base.unet, base.vae, *base.text_encoders):
        module.requires_grad_(False)
        module.eval()
    narrowed = [("UNet", base.unet)] if fp8_unet else []
    if fp8_text_encoders:
        narrowed += [("text encoder", encoder) for encoder in base.text_encoders]
    if narrowed:
        from .fp8 import narrow_frozen_weights

        for name, module in narrowed:
            count = narrow_frozen_weights(module, dtype)
            log.info("fp8_base: %d %s weights stored in float8, %.2f GiB of %s", count, name,
                     sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30, name)  # fmt: skip
    if base.device != device:
        base.pipeline.to(device)
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


# --- a VAE of the person's own -----------------------------------------------------------------


def load_vae(source: str | Path, like: torch.nn.Module) -> torch.nn.Module:
    """A VAE to use instead of a base model's own (`like`), in its dtype, frozen.

    `source` is a .safetensors file, in the original (LDM) key layout or diffusers', a VAE alone or a whole
    checkpoint whose VAE is taken; or a diffusers VAE folder (config.json beside the weights), or a diffusers model
    folder whose vae/ is taken. A file has no config of its own, so it gets the base model's VAE config, as kohya
    loads a `--vae` file into its family's VAE; a folder keeps its own config (a fixed fp16 VAE says there that it
    needs no upcast, `force_upcast = false`). Either way the latents keep the base model's scaling factor, which
    its UNet was trained on. Pickled files are refused: they can run code when read.
    """
    path, tensors = checked_vae_source(source)
    vae = _vae_from_folder(path, like.dtype) if path.is_dir() else _vae_from_file(path, tensors, like)
    _check_vae_fits(vae, like, path)
    if vae.config.scaling_factor != like.config.scaling_factor:
        log.warning("the VAE %s has scaling factor %s, the base model's VAE %s; latents are scaled by the base "
                    "model's, which its UNet learned", path, vae.config.scaling_factor, like.config.scaling_factor)
        vae.register_to_config(scaling_factor=like.config.scaling_factor)
    vae.to(like.device)
    vae.requires_grad_(False)
    vae.eval()
    return vae


def checked_vae_source(source: str | Path) -> tuple[Path, int]:
    """The VAE file or folder `source` names, and for a file how many VAE tensors it holds, checked as far as
    headers and configs go (no weights read, so "Check settings" can say it at once); a ModelLoadError otherwise."""
    path = Path(str(source).strip()).expanduser()
    if not path.exists():
        raise ModelLoadError(f"the VAE {str(source)!r} (`vae`) was not found: there is no such file or folder; give a "
                             "VAE .safetensors file or a diffusers VAE folder, or leave `vae` empty to use the base "
                             "model's own.")  # fmt: skip
    if path.is_dir():
        if (path / "vae" / "config.json").is_file():  # a whole diffusers model folder: its VAE
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers VAE folder: it has no config.json; give the folder that "
                                 "holds config.json and diffusion_pytorch_model.safetensors, or the VAE's "
                                 ".safetensors file.")  # fmt: skip
        if read_config_json(path / "config.json").get("_class_name") != "AutoencoderKL":
            raise ModelLoadError(f"{path / 'config.json'} is not an AutoencoderKL's config, so {path} is not a "
                                 "Stable Diffusion VAE; give a VAE folder or file.")  # fmt: skip
        return path, 0
    index = read_checkpoint_index(path)  # refuses pickles; a damaged header is a sentence
    tensors = vae_tensor_count(index)
    if not tensors:
        raise ModelLoadError(f"{path} holds no VAE weights (no encoder.* or decoder.* tensors); give a VAE file, "
                             "or a checkpoint that holds one.")  # fmt: skip
    return path, tensors


def _vae_from_folder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"the VAE folder {folder} could not be loaded ({_why(exc)}); it needs its "
                             "weights as diffusion_pytorch_model.safetensors beside config.json.") from exc


def _vae_from_file(path: Path, tensors: int, like: torch.nn.Module) -> torch.nn.Module:
    needed = len(like.state_dict())  # both layouts name the same tensors, one for one
    if tensors < needed:
        raise ModelLoadError(f"the VAE file {path} holds {tensors} of the {needed} weights of the base model's "
                             "VAE; it is incomplete or of another shape, so download or export it again.")  # fmt: skip
    import tempfile

    from diffusers import AutoencoderKL

    with tempfile.TemporaryDirectory() as folder:
        like.save_config(Path(folder) / "vae")  # the base model's VAE config, as from_single_file reads a config
        try:
            vae = AutoencoderKL.from_single_file(str(path), config=folder, subfolder="vae", dtype=like.dtype,
                                                 local_files_only=True)  # fmt: skip
        except Exception as exc:  # diffusers raises many types for weights that do not fit the config
            raise ModelLoadError(f"the VAE file {path} does not fit the base model's VAE ({_why(exc)}); "
                                 "is it a VAE of another architecture, or damaged?") from exc
    if any(p.is_meta for p in vae.parameters()):
        raise ModelLoadError(f"the VAE file {path} lacks some of the VAE's weights; it is incomplete or damaged, so "
                             "download or export it again.")  # fmt: skip
    return vae


def _check_vae_fits(vae: torch.nn.Module, like: torch.nn.Module, path: Path) -> None:
    """The latents' channels and the image-to-latent scale must be the base model's, or its UNet cannot read them."""
    mine, theirs = vae.config, like.config
    if mine.latent_channels != theirs.latent_channels or len(mine.block_out_channels) != len(
            theirs.block_out_channels):  # fmt: skip
        raise ModelLoadError(
            f"the VAE {path} makes latents of {mine.latent_channels} channels at 1/"
            f"{2 ** (len(mine.block_out_channels) - 1)} of the image side; the base model's UNet reads "
            f"{theirs.latent_channels} channels at 1/{2 ** (len(theirs.block_out_channels) - 1)}; give a VAE of the "
            "base model's family (SD 1.x, 2.x and XL share one shape, SD3 and Flux VAEs do not fit)."
        )


def _why(exc: BaseException) -> str:
    return shortened(f"{type(exc).__name__}: {exc}", 200)
