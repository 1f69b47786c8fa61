"""The one typed training config, used alike by the UI, the CLI and the presets.

A `TrainConfig` is validated once at the boundary. Every bad field is reported at once, each with
its dotted path, the bad value and what to do. Configs are TOML with a `version`; older versions
are migrated on load, so old presets and run folders keep loading.

Defaults follow common practice; the comment beside a default says where it comes from
(kohya_ss's sd-scripts and GUI, OneTrainer's presets, or the diffusers examples).
"""

from __future__ import annotations

import difflib
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .fsutil import write_text_atomic
from .paths import PRESETS_DIR

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_VERSION = 1

Family = Literal["auto", "sd1", "sd2", "sd2-v", "sdxl"]
UnetTargets = Literal["attn", "attn-ff", "full"]
SavePrecision = Literal["fp16", "bf16", "fp32"]
SAVE_PRECISIONS = typing.get_args(SavePrecision)  # what files are written in: the CLI and the Library offer these


class Section(BaseModel):
    """Shared settings: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Section):
    path: str = Field("", description="Folder of images with same-name caption files, or a kohya `10_name/` parent.")
    caption_extension: str = Field(".txt", description="Extension of caption files, e.g. .txt or .caption.")
    trigger_word: str = Field("", description="Prepended to every caption unless already present.")
    caption_prefix: str = ""
    caption_suffix: str = ""
    resolution: int = Field(0, ge=0, description="Training side in pixels; 0 uses the base model's native one.")
    repeats: int = Field(1, ge=1, description="Times each image is seen per epoch (kohya folder prefixes override).")
    batch_size: int = Field(1, ge=1, le=256)  # kohya_ss GUI default
    enable_bucket: bool = True  # kohya default for non-square datasets
    min_bucket_reso: int = Field(256, ge=32)  # kohya default; 32 allows the 64 px demo model
    max_bucket_reso: int = Field(1024, ge=32)  # kohya default for SD1.5 (2048 for SDXL presets)
    bucket_reso_steps: int = Field(64, ge=8)  # kohya default: 64 keeps SD-family VAE/UNet strides aligned
    bucket_no_upscale: bool = False
    random_crop: bool = False
    flip_aug: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0, description="Leading comma-separated tags that shuffle keeps in place.")
    caption_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    caption_tag_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    alpha_background: str = Field(
        "#ffffff", pattern=r"^#[0-9a-fA-F]{6}$", description="Colour under transparent pixels."
    )
    cache_latents: bool = True  # kohya/OneTrainer: cache VAE latents unless augmenting per step
    cache_latents_to_disk: bool = Field(
        True, description="Keep cached latents on disk for later runs; off keeps them in memory for this run only."
    )
    cache_text_embeddings: bool = False  # only possible with a frozen text encoder and static captions
    cache_dir: str = Field("", description="Where latent/text caches live; empty: .cache in the runs folder.")

    @property
    def captions_are_static(self) -> bool:
        """Whether every step sees the same caption for an image (needed to cache text embeddings)."""
        return not (self.shuffle_caption or self.caption_dropout_rate or self.caption_tag_dropout_rate)

    @model_validator(mode="after")
    def _bucket_range(self) -> DatasetConfig:
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(
                f"min_bucket_reso ({self.min_bucket_reso}) is above max_bucket_reso ({self.max_bucket_reso}); "
                "lower the minimum or raise the maximum"
            )
        return self


class LoraConfig(Section):
    rank: int = Field(16, ge=1, le=1024)  # OneTrainer's default rank; kohya GUI defaults to 8
    alpha: float = Field(1.0, gt=0)  # kohya and OneTrainer default: scale = alpha / rank
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    unet_targets: UnetTargets = Field(
        "attn-ff", description="attn: to_q/k/v/out; attn-ff: the kohya set (adds proj_in/out, ff); full: adds LoCon."
    )
    conv_rank: int | None = Field(
        None, ge=1, le=1024, description="Rank of the 3x3 conv (LoCon) adapters with 'full'."
    )
    conv_alpha: float | None = Field(None, gt=0)
    train_text_encoder: bool = True  # kohya trains the text encoder(s) unless --network_train_unet_only
    text_encoder_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],  # kohya's TE modules
    )
    use_dora: bool = False
    init_lora_weights: Literal["default", "gaussian"] = (
        "default"  # peft default: B = 0, so the adapter starts as a no-op
    )

    @model_validator(mode="after")
    def _conv_needs_full(self) -> LoraConfig:
        if self.conv_rank is not None and self.unet_targets != "full":
            raise ValueError(
                "conv_rank is set but unet_targets is not 'full'; set unet_targets = 'full' to train convs"
            )
        return self


class OptimConfig(Section):
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = "adamw"
    learning_rate: float = Field(1e-4, gt=0)  # kohya's default LoRA learning rate
    unet_lr: float | None = Field(None, gt=0, description="UNet learning rate; empty uses learning_rate.")
    text_encoder_lr: float | None = Field(5e-5, gt=0)  # kohya guides: about half the UNet rate
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "cosine"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler_num_cycles: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0)  # torch AdamW default
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)  # kohya default; 0 turns clipping off
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_epochs: int | None = Field(10, ge=1)  # kohya GUI default epoch count
    max_train_steps: int | None = Field(None, ge=1, description="Stops at this step count; overrides epochs when set.")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)  # kohya: 0.0357-0.1 for dark/bright images
    min_snr_gamma: float | None = Field(
        5.0, ge=0, description="Min-SNR-gamma loss weighting; 0 turns it off (TOML has no null)."
    )  # Hang et al. 2023 recommend 5; kohya guides use 5

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"both betas must lie in [0, 1), got {list(value)}")
        return value


class SampleConfig(Section):
    every_n_steps: int = Field(100, ge=0, description="Render samples every N steps; 0 turns sampling off.")
    prompts: list[str] = Field(default_factory=list, description="Empty uses the trigger word and a dataset caption.")
    negative_prompt: str = ""
    strengths: list[float] = Field(default_factory=lambda: [0.5, 1.0], description="Adapter strengths to render.")
    seeds: list[int] = Field(default_factory=lambda: [42])
    num_inference_steps: int = Field(20, ge=1, le=200)
    guidance_scale: float = Field(7.0, ge=0.0)  # A1111 default CFG
    sampler: Literal["euler_a", "euler", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "pndm"] = (
        "euler_a"  # A1111's default sampler
    )
    at_start: bool = Field(False, description="Also render samples before the first step (the base model's look).")
    width: int | None = Field(None, ge=32)
    height: int | None = Field(None, ge=32)

    @field_validator("strengths")
    @classmethod
    def _strengths_in_range(cls, value: list[float]) -> list[float]:
        bad = [s for s in value if not -2.0 <= s <= 2.0]
        if bad:
            raise ValueError(f"strengths must lie in [-2, 2], got {bad}")
        return value


class SaveConfig(Section):
    format: Literal["kohya", "diffusers"] = Field(
        "kohya", description="kohya loads in A1111/Forge, ComfyUI and diffusers; diffusers is the PEFT-native format."
    )
    precision: SavePrecision = "fp16"  # kohya's default save_precision
    every_n_steps: int = Field(0, ge=0)
    every_n_epochs: int = Field(1, ge=0)  # kohya GUI default
    keep_last: int = Field(0, ge=0, description="Keep only the newest N checkpoints; 0 keeps all.")
    save_state: bool = True  # resumable optimizer/RNG/data-order state next to each checkpoint


class TrainConfig(Section):
    version: int = CONFIG_VERSION
    name: str = Field("my-lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Run and file name.")
    base_model: str = Field(
        "demo", description="'demo', a .safetensors checkpoint, a diffusers folder or a cached hub id."
    )
    family: Family = "auto"
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    output_dir: str = Field("", description="Folder the run folders go in; empty: runs/ in the app's home.")
    seed: int = Field(42, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"  # kohya/OneTrainer default on modern GPUs
    clip_skip: int = Field(1, ge=1, le=4)  # 1 = last layer; anime-style SD1 models use 2
    gradient_checkpointing: bool = False
    low_vram: bool = Field(
        False,
        description="Keep the UNet off the GPU while latents and text embeddings are cached, so the VAE and "
        "text encoders never share the card with it (they leave it once the caches are full in any run).",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the trained models with torch.compile (inductor): faster steps after a one-off "
        "compile of a minute or more; worth it for long runs, not for the demo.",
    )
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optimizer: OptimConfig = Field(default_factory=OptimConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)

    @field_validator("version")
    @classmethod
    def _current_version(cls, value: int) -> int:
        if value != CONFIG_VERSION:
            raise ValueError(f"must be {CONFIG_VERSION} after migration, got {value}")
        return value

    def frozen_parts_off_device(self) -> set[str]:
        """The frozen parts no training step needs once the caches are full, so training keeps them off the GPU:
        the VAE with cached latents, the text encoders with cached embeddings (refused unless they are frozen
        and the captions static, so every step hits the cache)."""
        parts = {"vae"} if self.dataset.cache_latents else set()
        if self.dataset.cache_text_embeddings and not self.lora.train_text_encoder:
            parts.add("text_encoders")
        return parts

    def text_cache_refusal(self) -> str | None:
        """Why text-encoder outputs cannot be cached with these settings, or None if they can."""
        if self.lora.train_text_encoder:
            return (
                "the text encoder is being trained, so its outputs change every step; "
                "set lora.train_text_encoder = false"
            )
        if not self.dataset.captions_are_static:
            return (
                "captions change every step (shuffle_caption or caption dropout is on); "
                "turn those off to cache text embeddings"
            )
        return None

    def combination_problems(self) -> list[str]:
        """Settings that are each valid but cannot train together. "Check settings", `lora-studio config`
        and the trainer all ask this one place, so what the form accepts is what training accepts."""
        problems = []
        if self.dataset.cache_latents and self.dataset.random_crop:
            problems.append(
                "`dataset.random_crop` changes every step, so latents cannot be cached; "
                "turn cache_latents or random_crop off"
            )
        reason = self.text_cache_refusal() if self.dataset.cache_text_embeddings else None
        if reason:
            problems.append(f"`dataset.cache_text_embeddings` cannot be used: {reason}")
        return problems

    def training_problems(self) -> list[str]:
        """Everything training would refuse before loading anything: the combinations, plus the fields a preset
        leaves for the person to fill in (presets ship without a base model)."""
        missing = [] if self.base_model.strip() else ["`base_model` is empty: choose a checkpoint, a diffusers "
                                                       "folder or 'demo'"]  # fmt: skip
        return missing + self.combination_problems()

    def check_trainable(self, source: str = "config") -> TrainConfig:
        problems = self.training_problems()
        if problems:
            raise ConfigError(source, problems)
        return self


# --- validation with every problem at once --------------------------------------------------------


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    """The valid keys at `path`, for did-you-mean hints on unknown keys."""
    for part in path[:-1]:
        annotation = model.model_fields.get(str(part))
        if annotation is None or not isinstance(annotation.annotation, type):
            return []
        if not issubclass(annotation.annotation, BaseModel):
            return []
        model = annotation.annotation
    return list(model.model_fields)


def describe_errors(exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into sentences: `field` = value: what is wrong; what to do."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _field_names(TrainConfig, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"known keys here: {', '.join(known)}"
            problems.append(f"`{where}` is not a setting; remove it ({hint})")
            continue
        message = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        problems.append(f"`{where}`{shown}: {message[0].lower() + message[1:]}")
    return problems


def validate_config(data: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Migrate then validate; raises ConfigError listing every bad field."""
    try:
        config = TrainConfig.model_validate(migrate(dict(data)))
    except ValidationError as exc:
        raise ConfigError(source, describe_errors(exc)) from None
    problems = config.combination_problems()
    if problems:
        raise ConfigError(source, problems)
    return config


# --- migrations -----------------------------------------------------------------------------------

# Version 0 is the flat, kohya-style key set (`network_dim`, `train_data_dir`, ...). Accepting it lets
# people bring their kohya_ss TOML/JSON settings along; every key we understand is moved into place.
KOHYA_V0_KEYS: dict[str, str] = {
    "output_name": "name",
    "pretrained_model_name_or_path": "base_model",
    "output_dir": "output_dir",
    "seed": "seed",
    "mixed_precision": "mixed_precision",
    "clip_skip": "clip_skip",
    "gradient_checkpointing": "gradient_checkpointing",
    "torch_compile": "torch_compile",
    "train_data_dir": "dataset.path",
    "caption_extension": "dataset.caption_extension",
    "resolution": "dataset.resolution",
    "train_batch_size": "dataset.batch_size",
    "enable_bucket": "dataset.enable_bucket",
    "min_bucket_reso": "dataset.min_bucket_reso",
    "max_bucket_reso": "dataset.max_bucket_reso",
    "bucket_reso_steps": "dataset.bucket_reso_steps",
    "bucket_no_upscale": "dataset.bucket_no_upscale",
    "random_crop": "dataset.random_crop",
    "flip_aug": "dataset.flip_aug",
    "shuffle_caption": "dataset.shuffle_caption",
    "keep_tokens": "dataset.keep_tokens",
    "caption_dropout_rate": "dataset.caption_dropout_rate",
    "caption_tag_dropout_rate": "dataset.caption_tag_dropout_rate",
    "cache_latents": "dataset.cache_latents",
    "cache_latents_to_disk": "dataset.cache_latents_to_disk",
    "network_dim": "lora.rank",
    "network_alpha": "lora.alpha",
    "network_dropout": "lora.dropout",
    "conv_dim": "lora.conv_rank",
    "conv_alpha": "lora.conv_alpha",
    "optimizer_type": "optimizer.optimizer",
    "learning_rate": "optimizer.learning_rate",
    "unet_lr": "optimizer.unet_lr",
    "text_encoder_lr": "optimizer.text_encoder_lr",
    "lr_scheduler": "optimizer.lr_scheduler",
    "lr_warmup_steps": "optimizer.lr_warmup_steps",
    "lr_scheduler_num_cycles": "optimizer.lr_scheduler_num_cycles",
    "max_grad_norm": "optimizer.max_grad_norm",
    "gradient_accumulation_steps": "optimizer.gradient_accumulation_steps",
    "max_train_epochs": "optimizer.max_train_epochs",
    "max_train_steps": "optimizer.max_train_steps",
    "noise_offset": "optimizer.noise_offset",
    "min_snr_gamma": "optimizer.min_snr_gamma",
    "sample_every_n_steps": "sample.every_n_steps",
    "save_precision": "save.precision",
    "save_every_n_epochs": "save.every_n_epochs",
    "save_every_n_steps": "save.every_n_steps",
    "save_last_n_epochs": "save.keep_last",
    "save_state": "save.save_state",
}
KOHYA_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor"}


def _migrate_v0(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"version": 1}
    for key, value in data.items():
        if key == "version":
            continue
        target = KOHYA_V0_KEYS.get(key, key)  # unknown keys stay, so validation names them
        if key == "resolution" and isinstance(value, str) and value.split(",")[0].strip().isdigit():
            value = int(value.split(",")[0])  # kohya writes "512,512"
        if key == "optimizer_type" and isinstance(value, str):
            value = KOHYA_OPTIMIZERS.get(value.lower(), value)
        if key == "network_train_unet_only":
            target, value = "lora.train_text_encoder", not value
        _set_path(out, target, value)
    return out


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _migrate_v0}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a config dict of any known version up to CONFIG_VERSION (a dict with no version is v0)."""
    version = data.get("version", 0)
    if not isinstance(version, int) or not 0 <= version <= CONFIG_VERSION:
        return data  # validation reports the bad or newer version
    while version < CONFIG_VERSION:
        data = MIGRATIONS[version](data)
        version = data["version"]
    return data


# --- TOML and overrides ---------------------------------------------------------------------------


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("--set", [f"`{dotted}`: `{part}` is a value, not a section"])
        node = child
    node[leaf] = value


def parse_override_value(text: str) -> Any:
    """A `--set` value is read as TOML (numbers, booleans, lists, quoted strings), else kept as text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (the CLI's `--set`) to a config dict; returns a new dict."""
    result = _deep_copy(migrate(_deep_copy(data)))
    bad = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            bad.append(f"`{item}`: expected key.path=value, e.g. lora.rank=32")
            continue
        _set_path(result, key.strip(), parse_override_value(value.strip()))
    if bad:
        raise ConfigError("--set", bad)
    return result


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), ["the file does not exist; check the path"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"not valid TOML ({exc}); fix the syntax at that line"]) from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a TOML config or preset, apply `--set` overrides, migrate and validate it."""
    return validate_config(apply_overrides(read_toml(path), overrides), source=str(path))


def config_to_toml(config: TrainConfig) -> str:
    # TOML has no null: unset optional fields are left out and come back as their default (None).
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def save_config(config: TrainConfig, path: str | Path, header: str = "") -> None:
    text = config_to_toml(config)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + text
    write_text_atomic(path, text)


# --- presets --------------------------------------------------------------------------------------


def list_presets(folder: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.toml"))


def preset_path(name: str, folder: Path = PRESETS_DIR) -> Path:
    """The preset file of `name`; only the names list_presets gives (a name from a request cannot leave the
    folder: "../x" is no preset)."""
    path = folder / f"{name}.toml"
    if name not in list_presets(folder):
        known = list_presets(folder)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(known)}"
        raise ConfigError(f"preset {name!r}", [f"there is no {path.name} in {folder}; {hint}"])
    return path


def load_preset(name: str, overrides: Iterable[str] = ()) -> TrainConfig:
    return load_config(preset_path(name), overrides)


def preset_description(name: str, folder: Path = PRESETS_DIR) -> str:
    """The leading comment block of a preset: when to use it."""
    lines = []
    for line in preset_path(name, folder).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(line for line in lines if line)
