"""The one typed training config, used alike by the UI, the CLI and the presets.

A `TrainConfig` is validated once at the boundary. Every bad field is reported at once, each with
its dotted path, the bad value and what to do. Configs are TOML with a `version`; older versions
are migrated on load, so old presets and run folders keep loading.

Defaults follow common practice; the comment beside a default says where it comes from
(kohya_ss's sd-scripts and GUI, OneTrainer's presets, or the diffusers examples).
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import re
import sys
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .fsutil import write_text_atomic
from .kohya_gui import from_kohya_ss
from .paths import PRESETS_DIR, is_within, user_presets_dir
from .sample_prompts import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    STRENGTH_RANGE,
    SamplePrompt,
    parse_sample_prompt,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_VERSION = 1
# Training sides (resolution, bucket sides): 8x SD1.5's and 4x SDXL's, and bounded so that listing the buckets
# stays instant (an unbounded max_bucket_reso from a request kept a server thread busy for hours).
MAX_TRAINING_SIDE = 8192
MAX_REPEATS = 10_000  # an epoch lists every image that many times
MAX_SUBSETS = 64  # dataset.subsets: more folders than any concept list people keep (each is scanned at every check)
MAX_SAMPLES_PER_EVENT = 64  # images one sampling renders (prompts x seeds x strengths), as a preview grid's cells
BLOCK_COUNTS = (3, 23, 25)  # block_ranks: down/mid/up, or kohya's block_dims (SDXL's 23, SD 1.x/2.x's 25)

Family = Literal["auto", "sd1", "sd2", "sd2-v", "sdxl"]
UnetTargets = Literal["attn", "attn-ff", "full"]
SavePrecision = Literal["fp16", "bf16", "fp32"]
SAVE_PRECISIONS = typing.get_args(SavePrecision)  # what files are written in: the CLI and the Library offer these


class Section(BaseModel):
    """Shared settings: unknown keys are errors (a typo must not silently fall back to a default)."""

    # No inf or NaN in any number: an infinite learning rate or alpha only turns the loss into NaN a step later.
    # No text (a path, a prompt line, a trigger word) longer than a prompt may be.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, str_max_length=MAX_PROMPT_CHARS
    )


class DatasetSubset(Section):
    """One more folder of training images with its own repeat count and class tokens: kohya's
    `[[datasets.subsets]]`, OneTrainer's concepts."""

    path: str = Field(description="A folder of images with captions: plain, a kohya `N_name` folder or their parent.")
    repeats: int | None = Field(
        None, ge=1, le=MAX_REPEATS, description="Times each image is seen per epoch; empty: the folder's kohya N_ "
        "prefix, else dataset.repeats.",
    )  # fmt: skip
    class_tokens: str = Field(
        "", description="The caption of an image without a caption file (kohya's class_tokens); empty: the folder's "
        "name.",
    )  # fmt: skip
    regularization: bool = Field(
        False, description="Regularization (class) images, as in regularization.path: no trigger word, their loss "
        "weighted by regularization.prior_loss_weight (kohya's is_reg).",
    )  # fmt: skip
    # The folder's own caption settings, as kohya's subsets have them; empty (None): the dataset's.
    caption_extension: str | None = None
    keep_tokens: int | None = Field(None, ge=0)
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool | None = None
    shuffle_caption: bool | None = None
    caption_dropout_rate: float | None = Field(None, ge=0.0, le=1.0)
    caption_tag_dropout_rate: float | None = Field(None, ge=0.0, le=1.0)
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    # ... and its own augmentations (kohya's flip_aug, random_crop, color_aug per subset)
    flip_aug: bool | None = None
    random_crop: bool | None = None
    color_jitter: tuple[float, float, float, float] | None = None

    @field_validator("path")
    @classmethod
    def _a_folder(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; name the subset's folder of images")
        return value.strip()

    @field_validator("caption_extension")
    @classmethod
    def _an_extension(cls, value: str | None) -> str | None:
        return None if value is None else caption_extension(value)

    @field_validator("color_jitter")
    @classmethod
    def _jitter_in_range(cls, value: tuple[float, float, float, float] | None) -> tuple | None:
        return None if value is None else color_jitter_in_range(value)

    @field_validator("keep_tokens_separator", "secondary_separator")
    @classmethod
    def _a_separator(cls, value: str | None) -> str | None:
        return None if value is None else tag_separator(value)

    def own_settings(self) -> dict[str, Any]:
        """The caption and augmentation settings this folder sets for itself (the rest are the dataset's)."""
        return {key: getattr(self, key) for key in SUBSET_OWN_KEYS if getattr(self, key) is not None}


SUBSET_CAPTION_KEYS = ("caption_extension", "keep_tokens", "keep_tokens_separator", "secondary_separator",
                       "enable_wildcard", "shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                       "caption_prefix", "caption_suffix")  # fmt: skip
SUBSET_AUGMENTATION_KEYS = ("flip_aug", "random_crop", "color_jitter")
AUGMENTATION_OFF = {"random_crop": "turn random_crop off", "color_jitter": "set color_jitter to [0, 0, 0, 0]"}
SUBSET_OWN_KEYS = SUBSET_CAPTION_KEYS + SUBSET_AUGMENTATION_KEYS


def tag_separator(value: str) -> str:
    """A caption separator of kohya's (|||, ;;;): a few characters that are no tag separator (comma) or space."""
    if value and (len(value) > 16 or "," in value or any(c.isspace() for c in value)):
        raise ValueError(f"{value!r} cannot separate tags: use a few characters without commas or spaces, such as "
                         "||| or ;;;")  # fmt: skip
    return value


def color_jitter_in_range(value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    limits = (1.0, 1.0, 1.0, 0.5)
    bad = [f"{name} {v}" for name, v, top in zip(("brightness", "contrast", "saturation", "hue"), value, limits,
                                                  strict=True) if not 0.0 <= v <= top]  # fmt: skip
    if bad:
        raise ValueError(f"{', '.join(bad)} out of range: brightness, contrast and saturation take 0-1, hue 0-0.5")
    return value


def caption_extension(value: str) -> str:
    """An extension (".txt", "caption"): the caption of `a.png` is `a` plus it, never a path somewhere else."""
    extension = value.strip()
    extension = extension if extension.startswith(".") else "." + extension
    if len(extension) > 32 or not re.fullmatch(r"(\.[A-Za-z0-9_-]+)+", extension):
        raise ValueError(f"{value!r} is not a file extension; use one such as .txt or .caption")
    return extension


class DatasetConfig(Section):
    path: str = Field("", description="Folder of images with same-name caption files, or a kohya `10_name/` parent.")
    subsets: list[DatasetSubset] = Field(
        default_factory=list, max_length=MAX_SUBSETS,
        description="More folders, one a line, each with its own repeats and class tokens (kohya's subsets, "
        'OneTrainer\'s concepts): { path = "/data/alice", repeats = 10, class_tokens = "alice woman" }.',
    )  # fmt: skip
    caption_extension: str = Field(".txt", description="Extension of caption files, e.g. .txt or .caption.")
    trigger_word: str = Field("", description="Prepended to every caption unless already present.")
    caption_prefix: str = ""
    caption_suffix: str = ""
    resolution: int = Field(
        0, ge=0, le=MAX_TRAINING_SIDE, description="Training side in pixels; 0 uses the base model's native one."
    )
    repeats: int = Field(
        1, ge=1, le=MAX_REPEATS, description="Times each image is seen per epoch (kohya folder prefixes override)."
    )
    batch_size: int = Field(1, ge=1, le=256)  # kohya_ss GUI default
    enable_bucket: bool = True  # kohya default for non-square datasets
    min_bucket_reso: int = Field(256, ge=32, le=MAX_TRAINING_SIDE)  # kohya default; 32 allows the 64 px demo model
    max_bucket_reso: int = Field(1024, ge=32, le=MAX_TRAINING_SIDE)  # kohya default for SD1.5 (2048 for SDXL presets)
    bucket_reso_steps: int = Field(64, ge=8, le=512)  # kohya default: 64 keeps SD-family VAE/UNet strides aligned
    bucket_no_upscale: bool = False
    random_crop: bool = False
    flip_aug: bool = False
    color_jitter: tuple[float, float, float, float] = Field(
        (0.0, 0.0, 0.0, 0.0), description="Colour augmentation per sample and step: brightness, contrast, saturation "
        "and hue jitter, e.g. [0.1, 0.1, 0.1, 0.02] (a factor in 1 +- j; hue shifts by up to j of the colour wheel).",
    )  # fmt: skip
    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0, description="Leading comma-separated tags that shuffle keeps in place.")
    keep_tokens_separator: str = Field(
        "", description="kohya's keep_tokens_separator, e.g. |||: in a caption holding it, the tags before it stay "
        "in place and are never dropped (so do those after a second one, at the end); only the tags between "
        "shuffle and drop. It never reaches the text encoder. Empty: keep_tokens decides.",
    )  # fmt: skip
    secondary_separator: str = Field(
        "", description="kohya's secondary_separator, e.g. ;;;: tags joined by it (long hair;;;blue hair) shuffle "
        "and drop as one, then read as separate tags.",
    )  # fmt: skip
    enable_wildcard: bool = Field(
        False, description="kohya's enable_wildcard: each step reads one line of a caption file of several (one "
        "caption a line) and one option of each {red|blue}; {{ and }} are literal braces. Off: the lines are "
        "joined, braces are text.",
    )  # fmt: skip
    caption_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    caption_tag_dropout_rate: float = Field(0.0, ge=0.0, le=1.0)
    caption_dropout_every_n_epochs: int = Field(
        0, ge=0, description="kohya's: every Nth epoch trains on empty captions only (the unconditional prediction, "
        "as caption dropout does for single images); 0 off.",
    )  # fmt: skip
    alpha_background: str = Field(
        "#ffffff", pattern=r"^#[0-9a-fA-F]{6}$", description="Colour under transparent pixels."
    )
    masked_loss: bool = Field(
        False, description="Weight the loss by each image's mask, `name.mask.png` beside it (white = learn, black = "
        "ignore); images without one are learned whole.",
    )  # fmt: skip
    alpha_mask: bool = Field(False, description="With masked_loss: an image without a mask file uses its alpha "
                             "channel as the mask (kohya's alpha_mask).")  # fmt: skip
    unmasked_weight: float = Field(
        0.0, ge=0.0, le=1.0, description="With masked_loss: the loss weight of the masked-out (black) area "
        "(OneTrainer's unmasked weight); 0 ignores it.",
    )  # fmt: skip
    cache_latents: bool = True  # kohya/OneTrainer: cache VAE latents unless augmenting per step
    cache_latents_to_disk: bool = Field(
        True, description="Keep cached latents on disk for later runs; off keeps them in memory for this run only."
    )
    cache_text_embeddings: bool = False  # only possible with a frozen text encoder and static captions
    cache_dir: str = Field("", description="Where latent/text caches live; empty: .cache in the runs folder.")

    @field_validator("caption_extension")
    @classmethod
    def _an_extension(cls, value: str) -> str:
        return caption_extension(value)

    @field_validator("keep_tokens_separator", "secondary_separator")
    @classmethod
    def _a_separator(cls, value: str) -> str:
        return tag_separator(value)

    @field_validator("color_jitter")
    @classmethod
    def _jitter_in_range(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return color_jitter_in_range(value)

    @property
    def color_augmented(self) -> bool:
        return any(self.color_jitter)

    def per_step_augmentations(self) -> list[tuple[str, str]]:
        """(the setting that turns it on, its key) for each augmentation that changes an image every step (so its
        latents cannot be cached): "`dataset.random_crop`", "`color_jitter` on line 2 of dataset.subsets"..."""
        folders = [(0, self)] if self.path.strip() or not self.subsets else []  # path unset: subsets alone
        folders += [(n, self.for_subset(n)) for n in range(1, len(self.subsets) + 1)]
        found = []
        for line, settings in folders:
            for key, on in (("random_crop", settings.random_crop), ("color_jitter", settings.color_augmented)):
                own = line and getattr(self.subsets[line - 1], key) is not None
                named = f"`{key}` on line {line} of dataset.subsets" if own else f"`dataset.{key}`"
                if on and (named, key) not in found:
                    found.append((named, key))
        return found

    @property
    def captions_are_static(self) -> bool:
        """Whether every step sees the same caption for an image (needed to cache text embeddings), in every
        folder."""
        return not self.caption_dropout_every_n_epochs and all(
            not (settings.shuffle_caption or settings.caption_dropout_rate or settings.caption_tag_dropout_rate
                 or settings.enable_wildcard)
            for settings in (self, *(self.for_subset(n) for n in range(1, len(self.subsets) + 1))))  # fmt: skip

    def for_subset(self, line: int) -> DatasetConfig:
        """The settings the images of subset `line` (1-based; 0: `path`'s) are captioned and augmented with."""
        own = self.subsets[line - 1].own_settings() if line else {}
        return self.model_copy(update=own) if own else self

    def has_images(self) -> bool:
        """Whether a folder of training images is named: `path`, or at least one training subset."""
        return bool(self.path.strip()) or any(not subset.regularization for subset in self.subsets)

    def has_regularization_subsets(self) -> bool:
        """Whether a subset holds regularization (class) images."""
        return any(subset.regularization for subset in self.subsets)

    @field_validator("subsets")
    @classmethod
    def _each_folder_once(cls, value: list[DatasetSubset]) -> list[DatasetSubset]:
        paths = [subset.path for subset in value]
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed more than once; list each folder once and give "
                             "it the repeats it should have")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _path_not_a_subset(self) -> DatasetConfig:
        if self.path.strip() and self.path.strip() in {subset.path for subset in self.subsets}:
            raise ValueError(f"{self.path.strip()!r} is both dataset.path and a subset; keep it in one place (a "
                             "subset, to give it its own repeats)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _bucket_range(self) -> DatasetConfig:
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(
                f"min_bucket_reso ({self.min_bucket_reso}) is above max_bucket_reso ({self.max_bucket_reso}); "
                "lower the minimum or raise the maximum"
            )
        return self


def _check_blocks(name: str, values: list, alphas_name: str, alphas: list, kohya: str, most: float) -> None:
    """A per-block list (block_ranks and its kind): none, 3 (down, mid, up) or kohya's 23 / 25 blocks, each from 0
    (the block left out) to `most`, and its alphas, when given, one a block and above 0."""
    if len(values) not in (0, *BLOCK_COUNTS):
        raise ValueError(f"{name} has {len(values)} values; give 3 (down, mid, up), 23 or 25 ({kohya} for SDXL or "
                         "SD 1.x/2.x), or none")  # fmt: skip
    if any(v < 0 or v > most for v in values):
        raise ValueError(f"{name} must lie between 0 (the block left out) and {most:g}")
    if alphas and len(alphas) != len(values):
        raise ValueError(f"{alphas_name} has {len(alphas)} values but {name} has {len(values)}; give one alpha per "
                         "block, or none")  # fmt: skip
    if any(a <= 0 for a in alphas):
        raise ValueError(f"{alphas_name} must be above 0")


class LoraConfig(Section):
    rank: int = Field(16, ge=1, le=1024)  # OneTrainer's default rank; kohya GUI defaults to 8
    alpha: float = Field(1.0, gt=0)  # kohya and OneTrainer default: scale = alpha / rank
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rank_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="kohya's rank_dropout: at each step each rank of each layer is left out with "
        "this chance (per image), the rest scaled up to make up for it; a regularizer against overfitting, e.g. 0.1. "
        "0 off.",
    )  # fmt: skip
    module_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="kohya's module_dropout: at each step each adapted layer is left out whole "
        "with this chance, e.g. 0.1. 0 off.",
    )  # fmt: skip
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
    include_modules: str = Field(
        "", description="A regular expression over the layers' kohya names (as in the file, e.g. "
        "lora_unet_up_blocks_.*_attn2_): only matching layers get an adapter. Empty: every target.",
    )  # fmt: skip
    exclude_modules: str = Field(
        "", description="A regular expression over the layers' kohya names: matching layers get no adapter.",
    )  # fmt: skip
    block_ranks: list[int] = Field(
        default_factory=list, description="Rank per UNet block: 3 values (down, mid, up; any model) or kohya's "
        "block_dims: 25 values for SD 1.x/2.x (IN00-IN11, MID, OUT00-OUT11) or 23 for SDXL (embedding, IN00-IN08, "
        "MID00-MID02, OUT00-OUT08, out). 0 leaves a block out. Empty: rank.",
    )  # fmt: skip
    block_alphas: list[float] = Field(
        default_factory=list, description="Alpha per UNet block, as many values as block_ranks. Empty: alpha.",
    )  # fmt: skip
    conv_block_ranks: list[int] = Field(
        default_factory=list, description="Rank of the 3x3 conv (LoCon) adapters per UNet block, laid out as "
        "block_ranks (kohya's conv_block_dims); 0 leaves a block's convs out. Needs unet_targets = 'full'. Empty: "
        "conv_rank.",
    )  # fmt: skip
    conv_block_alphas: list[float] = Field(
        default_factory=list, description="Alpha of the conv adapters per UNet block, as many values as "
        "conv_block_ranks (kohya's conv_block_alphas). Empty: conv_alpha.",
    )  # fmt: skip
    block_lr_weights: list[float] = Field(
        default_factory=list, description="Learning-rate multiplier per UNet block, laid out as block_ranks (3 "
        "values, or kohya's 25 / 23 blocks: its down_lr_weight, mid_lr_weight and up_lr_weight); 0 leaves a block "
        "out. Empty: 1 everywhere.",
    )  # fmt: skip
    use_dora: bool = False
    scale_weight_norms: float = Field(
        0.0, ge=0.0, description="kohya's max-norm regularization: after each optimizer step, a layer whose LoRA "
        "update (B x A x alpha/rank) has a norm above this is scaled down to it; 0 off, kohya's guides use 1. "
        "Keeps layers from running away (and the LoRA easier to mix with others).",
    )  # fmt: skip
    network: Literal["lora", "loha", "lokr"] = Field(
        "lora", description="Adapter type. lora loads everywhere; LyCORIS' loha (Hadamard product of two low-rank "
        "pairs) and lokr (Kronecker product) load in A1111/Forge and ComfyUI, and here, but not in diffusers.",
    )  # fmt: skip
    lokr_factor: int = Field(
        -1, ge=-1, description="LoKr only: LyCORIS' factor, the size of the small Kronecker factor; -1 splits each "
        "width near its square root.",
    )  # fmt: skip
    init_lora_weights: Literal["default", "gaussian"] = (
        "default"  # peft default: B = 0, so the adapter starts as a no-op
    )
    network_weights: str = Field(
        "", description="Start from this LoRA file (kohya's network_weights), e.g. to train a LoRA further on new "
        "images: its layers and ranks must match these settings; steps, optimizer and schedule start afresh. Empty: "
        "start from zero. A resume ignores it (the saved state holds the weights).",
    )  # fmt: skip
    rank_from_weights: bool = Field(
        False, description="With network_weights: train at the file's rank (and conv rank) instead of lora.rank "
        "(kohya's dim_from_weights); the run records the rank it took.",
    )  # fmt: skip
    loraplus_lr_ratio: float = Field(
        0.0, ge=0.0, le=1024.0, description="LoRA+ (Hayou et al. 2024; kohya's loraplus_lr_ratio): the up (B) "
        "matrices learn this many times faster than the down (A) ones, in the UNet and the text encoders; 0 off, "
        "the paper and kohya's guides use 16. LoRA and DoRA only.",
    )  # fmt: skip
    loraplus_unet_lr_ratio: float = Field(
        0.0, ge=0.0, le=1024.0, description="LoRA+ for the UNet alone (kohya's loraplus_unet_lr_ratio); 0: "
        "loraplus_lr_ratio.",
    )  # fmt: skip
    loraplus_text_encoder_lr_ratio: float = Field(
        0.0, ge=0.0, le=1024.0, description="LoRA+ for the text encoders alone (kohya's "
        "loraplus_text_encoder_lr_ratio); 0: loraplus_lr_ratio.",
    )  # fmt: skip
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0, description="Exponential moving average of the LoRA weights, e.g. 0.999; 0 turns it off."
    )
    ema_warmup: bool = Field(
        True, description="Ramp the EMA decay up from 0 as 1 - (1 + step)^(-2/3) (diffusers' EMA warm-up), capped "
        "at ema_decay; off: (1 + step) / (10 + step).",
    )  # fmt: skip
    ema_for_samples: bool = Field(True, description="Samples and the validation loss use the EMA weights.")
    ema_for_files: bool = Field(True, description="The final LoRA file and the checkpoints hold the EMA weights.")

    def loraplus_ratios(self) -> tuple[float, float]:
        """LoRA+'s (UNet, text encoder) ratios, as kohya resolves them: a part's own ratio, else the common one."""
        return (self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio,
                self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio)  # fmt: skip

    @field_validator("include_modules", "exclude_modules")
    @classmethod
    def _a_regular_expression(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a regular expression ({exc}); e.g. 'up_blocks_.*attn2'") from None
        return value

    @model_validator(mode="after")
    def _blocks_line_up(self) -> LoraConfig:
        _check_blocks("block_ranks", self.block_ranks, "block_alphas", self.block_alphas, "kohya's block_dims", 1024)
        _check_blocks("conv_block_ranks", self.conv_block_ranks, "conv_block_alphas", self.conv_block_alphas,
                      "kohya's conv_block_dims", 1024)  # fmt: skip
        if self.conv_block_ranks and self.unet_targets != "full":
            raise ValueError(f"conv_block_ranks sets the 3x3 conv adapters' ranks, and unet_targets = "
                             f"'{self.unet_targets}' adapts no convs; set unet_targets = 'full'")  # fmt: skip
        _check_blocks("block_lr_weights", self.block_lr_weights, "", [], "kohya's down/mid/up_lr_weight", 100)
        if self.block_lr_weights and self.block_ranks and len(self.block_lr_weights) != len(self.block_ranks):
            raise ValueError(f"block_lr_weights has {len(self.block_lr_weights)} values and block_ranks "
                             f"{len(self.block_ranks)}; lay both out alike (3, 23 or 25 blocks)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _lycoris_options(self) -> LoraConfig:
        if self.scale_weight_norms and (self.network != "lora" or self.use_dora):
            kind = "use_dora" if self.network == "lora" else f"network = '{self.network}'"
            raise ValueError(f"scale_weight_norms caps a LoRA's B x A, as kohya's does; {kind} has other weights, so "
                             "set scale_weight_norms to 0 or train a plain LoRA")  # fmt: skip
        if self.rank_from_weights and not self.network_weights.strip():
            raise ValueError("rank_from_weights takes the rank of the file network_weights names, and none is named; "
                             "name the LoRA file to start from, or turn rank_from_weights off")  # fmt: skip
        if self.network_weights.strip() and (self.network != "lora" or self.use_dora):
            kind = "use_dora" if self.network == "lora" else f"network = '{self.network}'"
            raise ValueError(f"network_weights starts a plain LoRA from a file; {kind} has other weights, so clear "
                             "network_weights or train a plain LoRA")  # fmt: skip
        if self.use_dora and (self.rank_dropout or self.module_dropout):
            raise ValueError("rank_dropout and module_dropout leave ranks or layers of a LoRA out; DoRA's magnitude "
                             "is computed from all of them, so set both to 0 or turn use_dora off")  # fmt: skip
        if self.network == "lora":
            return self
        if any(self.loraplus_ratios()):
            raise ValueError(f"loraplus_lr_ratio speeds up a LoRA's up matrices; network = '{self.network}' has "
                             "none, so set the loraplus ratios to 0 or network = 'lora'")  # fmt: skip
        if self.use_dora:
            raise ValueError(f"use_dora is LoRA's weight decomposition; network = '{self.network}' has none here, "
                             "so turn use_dora off or set network = 'lora'")  # fmt: skip
        if self.dropout:
            raise ValueError(f"dropout is LoRA's input dropout; peft's {self.network} has none, so set dropout to 0")
        if self.init_lora_weights != "default":
            raise ValueError(f"init_lora_weights = 'gaussian' is for LoRA; {self.network} starts as a no-op on its "
                             "own, so leave it at 'default'")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _conv_needs_full(self) -> LoraConfig:
        if self.conv_rank is not None and self.unet_targets != "full":
            raise ValueError(
                "conv_rank is set but unet_targets is not 'full'; set unet_targets = 'full' to train convs"
            )
        return self


# Optimizers that find one step size for all the weights and refuse parameter groups at other rates.
ONE_RATE_OPTIMIZERS = ("prodigy", "dadapt_adam")


class OptimConfig(Section):
    optimizer: Literal[
        "adamw", "adamw8bit", "prodigy", "dadapt_adam", "adafactor", "lion", "lion8bit", "adamw_schedulefree"
    ] = Field(
        "adamw", description="adamw (the default); adamw8bit and lion8bit (bitsandbytes, CUDA only); prodigy (finds "
        "its own rate: learning_rate 1); dadapt_adam (D-Adaptation's Adam, kohya's DAdaptAdam: finds its own rate "
        "too, learning_rate 1, AdamW-style weight decay); adafactor; lion (lion-pytorch: a 3-10x lower rate and a "
        "higher weight decay than AdamW); adamw_schedulefree (schedulefree: no rate schedule, lr_scheduler "
        "'constant', warm-up from lr_warmup_steps; samples and files use its averaged weights). Extra optimizers: "
        "`pip install lora-studio[optimizers]`.",
    )  # fmt: skip
    learning_rate: float = Field(1e-4, gt=0)  # kohya's default LoRA learning rate
    unet_lr: float | None = Field(None, gt=0, description="UNet learning rate; empty uses learning_rate.")
    text_encoder_lr: float | None = Field(5e-5, gt=0)  # kohya guides: about half the UNet rate
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "cosine"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler_num_cycles: int = Field(1, ge=1)
    lr_scheduler_power: float = Field(
        1.0, gt=0.0, le=10.0, description="The 'polynomial' schedule's power (kohya's lr_scheduler_power): 1 falls "
        "linearly, above 1 falls fast at first, below 1 late.",
    )  # fmt: skip
    text_encoder_steps: int = Field(
        0, ge=0, description="Train the text encoder(s) for the first N optimizer steps only, then the UNet alone "
        "(kohya's DreamBooth stop_text_encoder_training, OneTrainer's stop-after for the text encoder): a text "
        "encoder over-learns sooner than the UNet. Their rate drops to 0 at step N; 0: they train the whole run.",
    )  # fmt: skip
    weight_decay: float = Field(0.01, ge=0)  # torch AdamW default
    betas: tuple[float, float] | None = Field(
        None, description="The optimizer's two betas; empty: its own (AdamW, Prodigy and schedule-free AdamW "
        "0.9, 0.999; Lion 0.9, 0.99). Adafactor has none.",
    )  # fmt: skip
    eps: float = Field(1e-8, gt=0)
    # Prodigy's own options, as kohya's optimizer_args and the LoRA guides set them (d_coef=2 use_bias_correction=True
    # safeguard_warmup=True); its defaults are the package's.
    prodigy_d_coef: float = Field(
        1.0, gt=0, le=100, description="Prodigy only: multiplies its estimate of the rate (d); guides use 1-2.",
    )  # fmt: skip
    prodigy_bias_correction: bool = Field(
        False, description="Prodigy only: Adam's bias correction in its estimate (guides turn it on); the rate rises "
        "more gently over the first steps.",
    )  # fmt: skip
    prodigy_safeguard_warmup: bool = Field(
        False, description="Prodigy only: leave the warm-up's low rates out of its estimate, so a warm-up does not "
        "hold d back (guides turn it on with lr_warmup_steps).",
    )  # fmt: skip
    max_grad_norm: float = Field(1.0, ge=0)  # kohya default; 0 turns clipping off
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_epochs: int | None = Field(10, ge=1)  # kohya GUI default epoch count
    max_train_steps: int | None = Field(None, ge=1, description="Stops at this step count; overrides epochs when set.")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)  # kohya: 0.0357-0.1 for dark/bright images
    noise_offset_random_strength: bool = Field(
        False, description="Each sample's offset at a random strength between 0 and noise_offset (kohya's "
        "noise_offset_random_strength).",
    )  # fmt: skip
    adaptive_noise_scale: float = Field(
        0.0, ge=-1.0, le=1.0, description="kohya's: each latent channel's offset grows by this times the absolute "
        "mean of that channel (brighter or darker images get more); needs noise_offset; about noise_offset's size. "
        "0 off.",
    )  # fmt: skip
    min_snr_gamma: float | None = Field(
        5.0, ge=0, description="Min-SNR-gamma loss weighting; 0 turns it off (TOML has no null)."
    )  # Hang et al. 2023 recommend 5; kohya guides use 5
    zero_terminal_snr: bool = Field(
        False, description="Rescale the noise schedule to zero SNR at the last timestep (Lin et al. 2023), so the "
        "model learns pure black and white; needs a v-prediction model or prediction_type = 'v_prediction'.",
    )  # fmt: skip
    # kohya sd-scripts' loss and noise options, with its names, defaults and formulas (step.py).
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field(
        "l2", description="The per-pixel loss: l2 (squared error, the usual), l1, or kohya's pseudo-Huber 'huber' and "
        "'smooth_l1', quadratic for small errors and linear for large ones (outlier images pull less).",
    )  # fmt: skip
    huber_schedule: Literal["snr", "exponential", "constant"] = Field(
        "snr", description="How the Huber threshold follows the timestep: 'snr' (kohya's default; about 1 at low "
        "noise, huber_c at high noise), 'exponential' (huber_scale down to huber_c x huber_scale), 'constant'.",
    )  # fmt: skip
    huber_c: float = Field(0.1, gt=0.0, le=1.0, description="The Huber threshold's floor (kohya: 0.1).")
    huber_scale: float = Field(1.0, gt=0.0, description="Scales the 'exponential' and 'constant' thresholds.")
    multires_noise_iterations: int = Field(
        0, ge=0, le=10, description="Multi-resolution (pyramid) noise levels added to the noise; 0 off, kohya's "
        "guides use 6-10. Not with noise_offset.",
    )  # fmt: skip
    multires_noise_discount: float = Field(0.3, gt=0.0, le=1.0, description="Each coarser level's weight (kohya 0.3).")
    ip_noise_gamma: float = Field(
        0.0, ge=0.0, le=1.0, description="Input perturbation (Ning et al. 2023): the noised image gets this much "
        "extra noise the target does not have; 0 off, the paper uses 0.1.",
    )  # fmt: skip
    ip_noise_gamma_random_strength: bool = Field(
        False, description="Each sample's perturbation at a random strength between 0 and ip_noise_gamma (kohya's "
        "ip_noise_gamma_random_strength).",
    )  # fmt: skip
    min_timestep: int = Field(0, ge=0, le=999, description="Train on timesteps from this one (kohya: 0) ...")
    max_timestep: int = Field(1000, ge=1, le=1000, description="... up to, not including, this one (kohya: 1000).")
    debiased_estimation: bool = Field(
        False, description="Weight each sample's loss by 1/sqrt(SNR) (Yu et al. 2024; kohya's "
        "debiased_estimation_loss), so low-noise steps do not dominate.",
    )  # fmt: skip
    scale_v_pred_loss_like_noise_pred: bool = Field(
        False, description="v-prediction models only (kohya's): each sample's loss times SNR/(SNR+1), so the "
        "timesteps weigh as they do in an epsilon model's loss.",
    )  # fmt: skip
    v_pred_like_loss: float = Field(
        0.0, ge=0.0, le=10.0, description="kohya's: add this much of a v-prediction-like loss, the loss times "
        "(SNR+1)/SNR, which weighs noisy timesteps more (e.g. 0.1 on SDXL); 0 off.",
    )  # fmt: skip

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"both betas must lie in [0, 1), got {list(value)}")
        return value


class SampleConfig(Section):
    every_n_steps: int = Field(100, ge=0, description="Render samples every N steps; 0: not by steps.")
    every_n_epochs: int = Field(
        0, ge=0, description="Also render samples as every Nth epoch ends (kohya's sample_every_n_epochs); 0: not "
        "by epochs. Both 0 turns sampling off.",
    )  # fmt: skip
    prompts: list[str] = Field(
        default_factory=list,
        description="One per line, kohya's flags allowed: `a red star --n blurry --w 512 --h 768 --d 42 --l 7 --s 28 "
        "--ss euler_a`; empty uses the trigger word and a dataset caption.",
    )  # fmt: skip
    negative_prompt: str = ""
    strengths: list[float] = Field(default_factory=lambda: [0.5, 1.0], description="Adapter strengths to render.")
    seeds: list[int] = Field(default_factory=lambda: [42])
    num_inference_steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.0, ge=0.0)  # A1111 default CFG
    sampler: Literal["euler_a", "euler", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "pndm"] = (
        "euler_a"  # A1111's default sampler
    )
    at_start: bool = Field(False, description="Also render samples before the first step (the base model's look).")
    width: int | None = Field(None, ge=32, le=MAX_SIDE)
    height: int | None = Field(None, ge=32, le=MAX_SIDE)

    @field_validator("prompts")
    @classmethod
    def _prompts_parse(cls, value: list[str]) -> list[str]:
        samplers = typing.get_args(cls.model_fields["sampler"].annotation)
        problems = []
        for number, line in enumerate(value, 1):
            try:
                if not parse_sample_prompt(line, samplers).prompt:
                    problems.append(f"prompt {number} has settings but no prompt text")
            except ValueError as exc:
                problems.append(f"prompt {number}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @property
    def on(self) -> bool:
        """Whether the run renders samples at all (by steps or by epochs)."""
        return bool(self.every_n_steps or self.every_n_epochs)

    def prompt_lines(self) -> list[SamplePrompt]:
        """The prompts with their per-prompt settings (kohya's flags) parsed."""
        return [parse_sample_prompt(line) for line in self.prompts]

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 0 <= s <= MAX_SEED]
        if bad:
            raise ValueError(f"seeds must lie in [0, {MAX_SEED}], got {bad}")
        return value

    @field_validator("strengths")
    @classmethod
    def _strengths_in_range(cls, value: list[float]) -> list[float]:
        low, high = STRENGTH_RANGE
        bad = [s for s in value if not low <= s <= high]
        if bad:
            raise ValueError(f"strengths must lie in [{low:g}, {high:g}], got {bad}")
        return value

    def images_per_sampling(self) -> int:
        """Images one sampling renders: each prompt (or the default one) at every strength, for each seed (a
        prompt's own `--d` seed: once)."""
        lines = self.prompt_lines() or [SamplePrompt("")]
        return sum(1 if line.seed is not None else len(self.seeds) for line in lines) * len(self.strengths)

    @model_validator(mode="after")
    def _bounded_sampling(self) -> SampleConfig:
        images = self.images_per_sampling()
        if images > MAX_SAMPLES_PER_EVENT:
            raise ValueError(
                f"{images} images at each sampling (prompts x seeds x strengths; a prompt with its own --d seed "
                f"renders once per strength), over the {MAX_SAMPLES_PER_EVENT} one sampling may render; "
                "use fewer prompts, seeds or strengths"
            )
        return self


class ValidationConfig(Section):
    """A held-out set scored at fixed noise and timesteps, so two evaluations differ only by the weights
    (kohya sd-scripts #193; OneTrainer #859: the training loss alone picks overfitted checkpoints)."""

    fraction: float = Field(
        0.0, ge=0.0, le=0.5,
        description="Share of each folder's images held out for the validation loss (seeded); 0: none held out.",
    )  # fmt: skip
    path: str = Field("", description="A separate folder of validation images and captions, instead of a fraction.")
    every_n_steps: int = Field(
        0, ge=0, description="Validation loss every N steps; also at every checkpoint and at the end. 0: only those."
    )
    every_n_epochs: int = Field(
        0, ge=0, description="Also as every Nth epoch ends (kohya's validate_every_n_epochs); 0: not by epochs.",
    )  # fmt: skip
    timesteps: int = Field(
        4, ge=1, le=32, description="Fixed timesteps spread over the schedule, each with its own fixed noise."
    )
    seed: int | None = Field(
        None, ge=1, le=MAX_SEED, description="Seed of the held-out draw and of the fixed noise (kohya's "
        "validation_seed), so runs of other seeds are scored on the same images; empty (or 0): the run's seed.",
    )  # fmt: skip
    max_images: int = Field(
        0, ge=0, description="Score at most this many held-out images in each pass (the first, by path), for a "
        "quicker pass; 0: all of them. kohya's max_validation_steps x batch size.",
    )  # fmt: skip

    @property
    def enabled(self) -> bool:
        return bool(self.fraction or self.path.strip())

    @model_validator(mode="after")
    def _one_source(self) -> ValidationConfig:
        if self.fraction and self.path.strip():
            raise ValueError(
                f"both fraction ({self.fraction}) and path ({self.path!r}) are set; hold out a fraction of the "
                "dataset or use a separate folder, not both"
            )
        return self


class RegularizationConfig(Section):
    """Prior preservation: images of the class without the trigger, so the LoRA changes what the trigger asks for
    and leaves the rest of the model alone (kohya's reg folder; OneTrainer's and ai-toolkit's reg datasets)."""

    path: str = Field("", description="A folder of regularization images with captions; kohya's N_class/ layout too.")
    generate: bool = Field(
        False, description="Render the regularization images with the base model itself, from the training captions "
        "without the trigger word (cached: a second run reuses them).",
    )  # fmt: skip
    class_word: str = Field("", description="Put in place of the trigger word in generated prompts, e.g. 'dog'.")
    images: int = Field(0, ge=0, le=2000, description="Images to generate; 0: one per training image.")
    steps: int = Field(20, ge=1, le=100, description="Sampling steps of each generated image.")
    guidance_scale: float = Field(7.0, ge=0.0, description="CFG of the generated images.")
    prior_loss_weight: float = Field(1.0, ge=0.0, description="Loss weight of regularization images (kohya: 1.0).")

    @property
    def enabled(self) -> bool:
        return bool(self.path.strip()) or self.generate

    @model_validator(mode="after")
    def _one_source(self) -> RegularizationConfig:
        if self.generate and self.path.strip():
            raise ValueError(
                f"both path ({self.path!r}) and generate are set; use your own folder or generated images, not both"
            )
        return self


class SaveConfig(Section):
    format: Literal["kohya", "diffusers"] = Field(
        "kohya", description="kohya loads in A1111/Forge, ComfyUI and diffusers; diffusers is the PEFT-native format."
    )
    precision: SavePrecision = "fp16"  # kohya's default save_precision
    every_n_steps: int = Field(0, ge=0)
    every_n_epochs: int = Field(1, ge=0)  # kohya GUI default
    keep_last: int = Field(0, ge=0, description="Keep only the newest N checkpoints; 0 keeps all.")
    keep_last_steps: int = Field(
        0, ge=0, description="Keep only the checkpoints of the last N steps (kohya's save_last_n_steps); 0 keeps all. "
        "With keep_last, a checkpoint stays only if both keep it.",
    )  # fmt: skip
    save_state: bool = True  # resumable optimizer/RNG/data-order state next to each checkpoint


class TrainConfig(Section):
    version: int = CONFIG_VERSION
    name: str = Field("my-lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Run and file name.")
    base_model: str = Field(
        "demo", description="'demo', a .safetensors checkpoint, a diffusers folder or a cached hub id."
    )
    family: Family = "auto"
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    vae: str = Field(
        "", description="A VAE to use instead of the base model's own (kohya's vae): a .safetensors file or a "
        "diffusers VAE folder, e.g. a fixed fp16 SDXL VAE. It encodes the training images and decodes samples; "
        "empty: the base model's.",
    )  # fmt: skip
    output_dir: str = Field("", description="Folder the run folders go in; empty: runs/ in the app's home.")
    seed: int = Field(42, ge=0, le=MAX_SEED)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"  # kohya/OneTrainer default on modern GPUs
    clip_skip: int = Field(1, ge=1, le=4)  # 1 = last layer; anime-style SD1 models use 2
    max_token_length: Literal[75, 150, 225] = Field(
        75, description="Caption tokens the text encoder reads: 75 (one CLIP window; a longer caption's end is cut "
        "off), or kohya's 150 / 225 for long tag captions (read in windows of 75).",
    )  # fmt: skip
    weighted_captions: bool = Field(
        False, description="Read A1111's emphasis in training captions, (tag:1.3), as previews read it in prompts "
        "(kohya's weighted_captions); off: brackets are text. Keep commas out of brackets when tags shuffle.",
    )  # fmt: skip
    gradient_checkpointing: bool = False
    fp8_base: bool = Field(
        False, description="Keep the UNet's frozen weights in 8-bit floats (float8 e4m3) and widen each layer's to "
        "the training precision only while it runs (kohya's fp8_base / fp8_base_unet): the UNet takes half the GPU "
        "memory of bf16 (SDXL: 2.4 instead of 4.8 GiB). The base is rounded to 8 bits, so results differ a little "
        "from a bf16 base; needs gradient checkpointing. Frozen text encoders that stay on the GPU (uncached "
        "captions) are narrowed too; the LoRA, norms and cached or trained text encoders keep their precision.",
    )  # fmt: skip
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
    compile_mode: Literal["default", "reduce-overhead"] = Field(
        "default",
        description="With torch_compile on a GPU: 'reduce-overhead' also records each bucket shape's forward and "
        "backward as CUDA graphs, replayed with one launch instead of hundreds (for small batches, whose steps "
        "wait on launches); it keeps some memory per shape. The same as 'default' on the CPU.",
    )
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optimizer: OptimConfig = Field(default_factory=OptimConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)

    @field_validator("max_token_length", mode="before")
    @classmethod
    def _a_token_count(cls, value: Any) -> Any:
        """The form's dropdown and kohya_ss's saves give the count as text ("150")."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("version")
    @classmethod
    def _current_version(cls, value: int) -> int:
        if value != CONFIG_VERSION:
            raise ValueError(f"must be {CONFIG_VERSION} after migration, got {value}")
        return value

    @property
    def validation_seed(self) -> int:
        """The seed of the validation split and noise: validation.seed, else the run's."""
        return self.seed if self.validation.seed is None else self.validation.seed

    def frozen_parts_off_device(self) -> set[str]:
        """The frozen parts no training step needs once the caches are full, so training keeps them off the GPU:
        the VAE with cached latents, the text encoders with cached embeddings (refused unless they are frozen
        and the captions static, so every step hits the cache)."""
        parts = {"vae"} if self.dataset.cache_latents else set()
        if self.dataset.cache_text_embeddings and not self.lora.train_text_encoder:
            parts.add("text_encoders")
        return parts

    def fp8_text_encoders(self) -> bool:
        """Whether fp8_base narrows the text encoders too: only frozen ones that stay on the GPU while training
        (captions that change each step, so their outputs are not cached). Cached ones leave the GPU, and keep
        their precision for the cache; a trained one would keep a widened copy of each weight for the backward."""
        frozen_on_device = not self.lora.train_text_encoder and "text_encoders" not in self.frozen_parts_off_device()
        return self.fp8_base and frozen_on_device

    def text_cache_refusal(self) -> str | None:
        """Why text-encoder outputs cannot be cached with these settings, or None if they can."""
        if self.lora.train_text_encoder:
            return (
                "the text encoder is being trained, so its outputs change every step; "
                "set lora.train_text_encoder = false"
            )
        if not self.dataset.captions_are_static:
            return (
                "captions change every step (shuffle_caption, caption dropout, caption_dropout_every_n_epochs or "
                "enable_wildcard is on); turn those off to cache text embeddings"
            )
        return None

    def combination_problems(self) -> list[str]:
        """Settings that are each valid but cannot train together. "Check settings", `lora-studio config`
        and the trainer all ask this one place, so what the form accepts is what training accepts."""
        problems = self.prodigy_option_problems() + self.one_rate_problems() + self.regularization_problems()
        problems += self.compile_problems() + self.fp8_problems() + self.text_encoder_stop_problems()
        if self.lora.network != "lora" and self.save.format == "diffusers":
            problems.append(f"`lora.network` = '{self.lora.network}' is written in LyCORIS' format, which "
                            "diffusers' format cannot hold; set save.format = 'kohya' (A1111/Forge and ComfyUI load "
                            "it)")  # fmt: skip
        if len(self.lora.block_ranks) == 25 and self.family == "sdxl":
            problems.append("`lora.block_ranks` has kohya's 25 SD 1.x/2.x blocks, but the family is SDXL, whose UNet "
                            "has other blocks; give kohya's 23 SDXL blocks or 3 values (down, mid, up) "
                            "instead")  # fmt: skip
        if len(self.lora.block_ranks) == 23 and self.family not in ("sdxl", "auto"):
            problems.append("`lora.block_ranks` has kohya's 23 SDXL blocks, but the family is not SDXL; give kohya's "
                            "25 SD 1.x/2.x blocks or 3 values (down, mid, up) instead")  # fmt: skip
        if self.dataset.cache_latents:
            problems += [f"{named} changes every step, so latents cannot be cached; turn dataset.cache_latents off "
                         f"or {AUGMENTATION_OFF[key]}" for named, key in self.dataset.per_step_augmentations()]
        if self.optimizer.zero_terminal_snr and self.prediction_type == "epsilon":
            problems.append(
                "`optimizer.zero_terminal_snr` needs v-prediction (at zero SNR there is no noise left to predict); "
                "set prediction_type = 'v_prediction' (or 'auto' with a v-prediction model), or turn it off"
            )
        if self.optimizer.noise_offset and self.optimizer.multires_noise_iterations:
            problems.append(  # as kohya's sd-scripts: the two reshape the same noise, each assuming plain noise
                "`optimizer.noise_offset` and `optimizer.multires_noise_iterations` cannot both be on; set one to 0"
            )
        if self.optimizer.v_pred_like_loss and self.optimizer.zero_terminal_snr:
            problems.append("`optimizer.v_pred_like_loss` divides each loss by SNR/(SNR+1), which zero_terminal_snr "
                            "makes 0 at the last timestep; set one of them off (v_pred_like_loss is for epsilon "
                            "models, zero_terminal_snr for v-prediction ones)")  # fmt: skip
        if self.optimizer.adaptive_noise_scale and not self.optimizer.noise_offset:
            problems.append("`optimizer.adaptive_noise_scale` grows the noise offset, and noise_offset is 0; set "
                            "noise_offset (e.g. 0.05) or adaptive_noise_scale = 0")  # fmt: skip
        problems += self.schedule_free_problems()
        if self.optimizer.min_timestep >= self.optimizer.max_timestep:
            problems.append(
                f"`optimizer.min_timestep` = {self.optimizer.min_timestep} is not below max_timestep = "
                f"{self.optimizer.max_timestep}: no timestep is left to train on; lower min_timestep or raise "
                "max_timestep"
            )
        if not self.dataset.masked_loss and (self.dataset.alpha_mask or self.dataset.unmasked_weight):
            problems.append(
                "`dataset.alpha_mask` and `dataset.unmasked_weight` act only with masked loss; "
                "set dataset.masked_loss = true, or leave them at false and 0"
            )
        reason = self.text_cache_refusal() if self.dataset.cache_text_embeddings else None
        if reason:
            problems.append(f"`dataset.cache_text_embeddings` cannot be used: {reason}")
        return problems

    def compile_problems(self) -> list[str]:
        """compile_mode without torch_compile, and CUDA graphs with gradient accumulation (not checked yet)."""
        problems = []
        if self.compile_mode != "default" and not self.torch_compile:
            problems.append(f"`compile_mode` = '{self.compile_mode}' acts only on a compiled model; set "
                            "torch_compile = true, or compile_mode = 'default'")  # fmt: skip
        if self.compile_mode == "reduce-overhead" and self.optimizer.gradient_accumulation_steps > 1:
            # A CUDA graph writes each replay's outputs over the last one's; gradients summed over micro-batches
            # would have to outlive a replay, which has not been checked on a GPU yet (bench/compile_equality.py's
            # accumulating case, run by `bench/device_check.sh equal`, is that check; passed on the CPU, no graphs).
            problems.append("`compile_mode` = 'reduce-overhead' (CUDA graphs) cannot accumulate gradients yet; set "
                            "optimizer.gradient_accumulation_steps = 1 (a larger batch instead), or compile_mode = "
                            "'default'")  # fmt: skip
        return problems

    def fp8_problems(self) -> list[str]:
        """fp8_base's need. Each layer widens its 8-bit weights when it reads them, and autograd keeps the wide copy
        for the backward pass: without gradient checkpointing every layer's copy would stay, more memory than the
        bf16 base it replaces; with it only the recomputed block's copies live at once."""
        if not self.fp8_base or self.gradient_checkpointing:
            return []
        return ["`fp8_base` needs gradient_checkpointing: without it the backward pass keeps a widened copy of every "
                "layer's weights, more memory than the base it shrinks; set gradient_checkpointing = true, or "
                "fp8_base = false"]  # fmt: skip

    def regularization_problems(self) -> list[str]:
        """Class images from one source: the base model renders them, or folders hold them."""
        if self.regularization.generate and self.dataset.has_regularization_subsets():
            return ["regularization.generate is on and dataset.subsets has regularization folders; use your own "
                    "folders or generated images, not both"]  # fmt: skip
        return []

    def prodigy_option_problems(self) -> list[str]:
        """Prodigy's options set for another optimizer, which would ignore them."""
        opt = self.optimizer
        if opt.optimizer == "prodigy":
            return []
        given = [f"{name} = {getattr(opt, name)!r}" for name, off in (
            ("prodigy_d_coef", 1.0), ("prodigy_bias_correction", False), ("prodigy_safeguard_warmup", False))
            if getattr(opt, name) != off]  # fmt: skip
        return [f"`optimizer.{s}` acts only with optimizer = 'prodigy' (this is '{opt.optimizer}'); put it back to "
                "its default or choose prodigy" for s in given]  # fmt: skip

    def one_rate_problems(self) -> list[str]:
        """Prodigy and D-Adaptation find one step size for all the weights they train and refuse parameter groups at
        other rates (their first step raises "Setting different lr values in different parameter groups..."); kohya's
        guides set every rate to 1 with them. The settings that would give some weights another rate."""
        opt, lora = self.optimizer, self.lora
        if opt.optimizer not in ONE_RATE_OPTIMIZERS:
            return []
        name = opt.optimizer
        unet = opt.unet_lr or opt.learning_rate
        problems = []
        text = opt.text_encoder_lr or opt.learning_rate
        if lora.train_text_encoder and text != unet:
            problems.append(f"`optimizer.text_encoder_lr` = {text:g} is not the UNet's rate ({unet:g}): {name} finds "
                            "one step size for every weight and cannot train the text encoder at another rate; set "
                            f"text_encoder_lr = {unet:g}, or train the UNet only (lora.train_text_encoder = "
                            "false)")  # fmt: skip
        unet_ratio, text_ratio = lora.loraplus_ratios()
        if (unet_ratio or 1) != 1 or (lora.train_text_encoder and (text_ratio or 1) != 1):
            problems.append("LoRA+ (`lora.loraplus_*lr_ratio`) trains the up matrices at a multiple of the rate, "
                            f"which {name} cannot (it finds one step size for every weight); set the LoRA+ ratios "
                            "to 0, or choose another optimizer")  # fmt: skip
        other = sorted({w for w in lora.block_lr_weights if w not in (0, 1)})
        if other:
            shown = ", ".join(f"{w:g}" for w in other)
            problems.append(f"`lora.block_lr_weights` gives blocks other rates ({shown}), "
                            f"which {name} cannot train (it finds one step size for every weight); use 1 (train) "
                            "and 0 (leave out) only, or choose another optimizer")  # fmt: skip
        return problems

    def text_encoder_stop_problems(self) -> list[str]:
        """optimizer.text_encoder_steps sets the text encoders' rate to 0 from that step on. That holds a weight still
        with AdamW, Adafactor and Lion (their steps and decays scale with the rate); Prodigy and D-Adaptation step
        every trained weight by their shared estimate, and schedule-free AdamW keeps pulling its weights and their
        average together, whatever the rate."""
        opt = self.optimizer
        if not opt.text_encoder_steps:
            return []
        if not self.lora.train_text_encoder:
            return [f"`optimizer.text_encoder_steps` = {opt.text_encoder_steps} stops a text encoder that does not "
                    "train (lora.train_text_encoder = false); set it to 0, or train the text encoder"]  # fmt: skip
        if opt.optimizer in (*ONE_RATE_OPTIMIZERS, "adamw_schedulefree"):
            return [f"`optimizer.text_encoder_steps` cannot stop the text encoder with {opt.optimizer}: at rate 0 its "
                    "step still moves the weights it has trained; set text_encoder_steps = 0, or choose adamw, "
                    "adamw8bit, adafactor, lion or lion8bit"]  # fmt: skip
        return []

    def schedule_free_problems(self) -> list[str]:
        """Schedule-free AdamW replaces the rate schedule and keeps its own average of the weights (the ones
        samples, validation and files use), so it takes no schedule, no second average and no cap on the live
        weights (the cap would not hold on the average that is saved)."""
        if self.optimizer.optimizer != "adamw_schedulefree":
            return []
        problems = []
        if self.optimizer.lr_scheduler not in ("constant", "constant_with_warmup"):
            problems.append(f"`optimizer.lr_scheduler` = '{self.optimizer.lr_scheduler}' cannot be used with "
                            "adamw_schedulefree, which needs no rate schedule; set lr_scheduler = 'constant' "
                            "(lr_warmup_steps still warms up)")  # fmt: skip
        if self.lora.ema_decay:
            problems.append("`lora.ema_decay` cannot be used with adamw_schedulefree, which already averages the "
                            "weights it saves; set ema_decay = 0, or choose another optimizer")  # fmt: skip
        if self.lora.scale_weight_norms:
            problems.append("`lora.scale_weight_norms` cannot be used with adamw_schedulefree: it caps the weights "
                            "being trained, not the averaged ones that are saved; set it to 0, or choose another "
                            "optimizer")  # fmt: skip
        return problems

    def training_problems(self) -> list[str]:
        """Everything training would refuse before loading anything: the combinations, plus the fields a preset
        leaves for the person to fill in (presets ship without a base model)."""
        missing = [] if self.base_model.strip() else ["`base_model` is empty: choose a checkpoint, a diffusers "
                                                       "folder or 'demo'"]  # fmt: skip
        if not self.dataset.has_images():
            missing.append("`dataset.path` is empty: choose your images' folder (or list folders in dataset.subsets)")
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


def shortened(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters with its length said, so a 64 KB value does not fill the message."""
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


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
        shown = "" if isinstance(value, dict) else f" = {shortened(repr(value))}"
        problems.append(f"`{where}`{shown}: {message[0].lower() + message[1:]}")
    return problems


def validate_config(data: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Migrate then validate; raises ConfigError listing every bad field."""
    try:
        config = TrainConfig.model_validate(migrate(dict(data)))
    except ValidationError as exc:
        raise ConfigError(source, describe_errors(exc)) from None
    except ConfigError as exc:  # kohya entries the migration cannot take
        raise ConfigError(source, exc.problems) from None
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
    "vae": "vae",
    "output_dir": "output_dir",
    "seed": "seed",
    "mixed_precision": "mixed_precision",
    "clip_skip": "clip_skip",
    "max_token_length": "max_token_length",
    "weighted_captions": "weighted_captions",
    "gradient_checkpointing": "gradient_checkpointing",
    "fp8_base": "fp8_base",  # and fp8_base_unet, which kohya_gui.from_kohya_ss folds into it
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
    "color_aug": "dataset.color_jitter",  # kohya's flag: hue/saturation/value jitter
    "shuffle_caption": "dataset.shuffle_caption",
    "keep_tokens": "dataset.keep_tokens",
    "keep_tokens_separator": "dataset.keep_tokens_separator",
    "secondary_separator": "dataset.secondary_separator",
    "enable_wildcard": "dataset.enable_wildcard",
    "caption_dropout_rate": "dataset.caption_dropout_rate",
    "caption_dropout_every_n_epochs": "dataset.caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "dataset.caption_tag_dropout_rate",
    "caption_prefix": "dataset.caption_prefix",
    "caption_suffix": "dataset.caption_suffix",
    "dataset_repeats": "dataset.repeats",
    "cache_latents": "dataset.cache_latents",
    "cache_latents_to_disk": "dataset.cache_latents_to_disk",
    "masked_loss": "dataset.masked_loss",
    "alpha_mask": "dataset.alpha_mask",
    "network_dim": "lora.rank",
    "network_alpha": "lora.alpha",
    "network_dropout": "lora.dropout",
    "rank_dropout": "lora.rank_dropout",  # kohya_ss's fields (sd-scripts takes them in network_args)
    "module_dropout": "lora.module_dropout",
    "scale_weight_norms": "lora.scale_weight_norms",
    "loraplus_lr_ratio": "lora.loraplus_lr_ratio",  # kohya_ss's fields (sd-scripts takes them in network_args)
    "loraplus_unet_lr_ratio": "lora.loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio": "lora.loraplus_text_encoder_lr_ratio",
    "network_weights": "lora.network_weights",
    "dim_from_weights": "lora.rank_from_weights",
    "conv_dim": "lora.conv_rank",
    "conv_alpha": "lora.conv_alpha",
    "optimizer_type": "optimizer.optimizer",
    "learning_rate": "optimizer.learning_rate",
    "unet_lr": "optimizer.unet_lr",
    "text_encoder_lr": "optimizer.text_encoder_lr",
    "lr_scheduler": "optimizer.lr_scheduler",
    "lr_warmup_steps": "optimizer.lr_warmup_steps",
    "lr_scheduler_num_cycles": "optimizer.lr_scheduler_num_cycles",
    "lr_scheduler_power": "optimizer.lr_scheduler_power",
    "max_grad_norm": "optimizer.max_grad_norm",
    "gradient_accumulation_steps": "optimizer.gradient_accumulation_steps",
    "max_train_epochs": "optimizer.max_train_epochs",
    "max_train_steps": "optimizer.max_train_steps",
    "noise_offset": "optimizer.noise_offset",
    "zero_terminal_snr": "optimizer.zero_terminal_snr",
    "min_snr_gamma": "optimizer.min_snr_gamma",
    "loss_type": "optimizer.loss_type",
    "huber_schedule": "optimizer.huber_schedule",
    "huber_c": "optimizer.huber_c",
    "huber_scale": "optimizer.huber_scale",
    "multires_noise_iterations": "optimizer.multires_noise_iterations",
    "multires_noise_discount": "optimizer.multires_noise_discount",
    "ip_noise_gamma": "optimizer.ip_noise_gamma",
    "ip_noise_gamma_random_strength": "optimizer.ip_noise_gamma_random_strength",
    "noise_offset_random_strength": "optimizer.noise_offset_random_strength",
    "min_timestep": "optimizer.min_timestep",
    "max_timestep": "optimizer.max_timestep",
    "debiased_estimation_loss": "optimizer.debiased_estimation",
    "adaptive_noise_scale": "optimizer.adaptive_noise_scale",
    "scale_v_pred_loss_like_noise_pred": "optimizer.scale_v_pred_loss_like_noise_pred",
    "v_pred_like_loss": "optimizer.v_pred_like_loss",
    "sample_every_n_steps": "sample.every_n_steps",
    "sample_every_n_epochs": "sample.every_n_epochs",
    "reg_data_dir": "regularization.path",
    "prior_loss_weight": "regularization.prior_loss_weight",
    "validation_split": "validation.fraction",  # kohya sd-scripts' validation PRs (#1858/#1900)
    "validate_every_n_steps": "validation.every_n_steps",
    "validate_every_n_epochs": "validation.every_n_epochs",
    "validation_seed": "validation.seed",
    "max_validation_steps": "validation.max_validation_steps",  # made into validation.max_images below
    "save_precision": "save.precision",
    "save_every_n_epochs": "save.every_n_epochs",
    "save_every_n_steps": "save.every_n_steps",
    "save_last_n_epochs": "save.keep_last",
    "save_last_n_steps": "save.keep_last_steps",
    **{key: f"lora._{key}" for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")},
    "save_state": "save.save_state",
}
# kohya's optimizer_type names (lowercased) -> ours; kohya also takes a module path for schedule-free AdamW.
KOHYA_OPTIMIZERS = {
    "adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor", "lion": "lion",
    "lion8bit": "lion8bit", "adamwschedulefree": "adamw_schedulefree", "dadaptadam": "dadapt_adam",
    "schedulefree.adamwschedulefree": "adamw_schedulefree",
}  # fmt: skip


def _true(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"{text!r} is not True or False")
    return text.lower() == "true"


def _decoupled(text: str) -> None:
    """Prodigy's and D-Adaptation's decouple: True (AdamW-style weight decay, Prodigy's default and kohya's advice for
    DAdaptAdam) is the only kind this app runs."""
    if not _true(text):
        raise ValueError("decouple=False (Adam-style weight decay) is not offered; prodigy and dadapt_adam run with "
                         "decouple=True")


def _numbers(kind: type) -> Callable[[str], list]:
    """kohya's comma-separated list ("2,4,4" or "(0.9, 0.99)") read as numbers of `kind`."""
    return lambda text: [kind(part) for part in text.strip("()[] ").split(",") if part.strip()]


def _one_pattern(text: str) -> str:
    """kohya's include/exclude patterns (a Python list of regular expressions, which kohya reads with
    `ast.literal_eval`) as the one expression we take."""
    patterns = ast.literal_eval(text) if text.strip().startswith("[") else [text]
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError("expected a list of regular expressions")
    return patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)


LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}  # others stay, and are refused
LYCORIS_PRESETS = {"attn-only": "attn", "attn-mlp": "attn-ff", "full": "full"}
# sd-scripts' `network_args` and `optimizer_args` ("key=value" strings) -> (our setting, how to read the value).
KOHYA_BLOCK_LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
KOHYA_NETWORK_ARGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "conv_dim": ("lora.conv_rank", int), "conv_alpha": ("lora.conv_alpha", float),
    "algo": ("lora.network", lambda v: LYCORIS_ALGOS.get(v.lower(), v)),
    "preset": ("lora.unet_targets", lambda v: LYCORIS_PRESETS.get(v.lower(), v)),
    "factor": ("lora.lokr_factor", int), "dropout": ("lora.dropout", float),
    "rank_dropout": ("lora.rank_dropout", float), "module_dropout": ("lora.module_dropout", float),
    "use_dora": ("lora.use_dora", lambda v: v.lower() == "true"),
    "loraplus_lr_ratio": ("lora.loraplus_lr_ratio", float),
    "loraplus_unet_lr_ratio": ("lora.loraplus_unet_lr_ratio", float),
    "loraplus_text_encoder_lr_ratio": ("lora.loraplus_text_encoder_lr_ratio", float),
    "block_dims": ("lora.block_ranks", _numbers(int)), "block_alphas": ("lora.block_alphas", _numbers(float)),
    "conv_block_dims": ("lora.conv_block_ranks", _numbers(int)),
    "conv_block_alphas": ("lora.conv_block_alphas", _numbers(float)),
    **{key: (f"lora._{key}", str) for key in KOHYA_BLOCK_LR_KEYS},  # made into lora.block_lr_weights
    "include_patterns": ("lora.include_modules", _one_pattern),
    "exclude_patterns": ("lora.exclude_modules", _one_pattern),
}  # fmt: skip
KOHYA_OPTIMIZER_ARGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "weight_decay": ("optimizer.weight_decay", float), "betas": ("optimizer.betas", _numbers(float)),
    "eps": ("optimizer.eps", float), "warmup_steps": ("optimizer.lr_warmup_steps", int),  # schedule-free's
    # Prodigy's
    "d_coef": ("optimizer.prodigy_d_coef", float), "use_bias_correction": ("optimizer.prodigy_bias_correction", _true),
    "safeguard_warmup": ("optimizer.prodigy_safeguard_warmup", _true), "decouple": ("", _decoupled),
}  # fmt: skip


def _kohya_args(key: str, value: Any, known: dict[str, tuple[str, Callable[[str], Any]]], out: dict) -> list[str]:
    """Put sd-scripts' "key=value" list (or one space-separated string) into `out`; the entries it cannot take."""
    entries = value.split() if isinstance(value, str) else value if isinstance(value, list) else [value]
    problems = []
    for entry in entries:
        name, sep, text = str(entry).partition("=")
        name, text = name.strip(), text.strip()
        if not sep or name not in known:
            problems.append(f"`{key}` entry {str(entry)!r} is not a setting this app has; remove it (it takes "
                            f"{', '.join(known)})")  # fmt: skip
            continue
        target, read = known[name]
        try:
            value = read(text.strip("\"'"))
            if target:  # "": an entry that only has to be its default
                _set_path(out, target, value)
        except (ValueError, SyntaxError) as exc:
            problems.append(f"`{key}` entry {str(entry)!r}: {exc}; give a value like kohya's")
    return problems


# kohya's dataset config (sd-scripts' `--dataset_config`, docs/config_README): [general], [[datasets]] and their
# [[datasets.subsets]]. A subset's own options become one of dataset.subsets; the options of a whole dataset and
# those every subset shares take the command line's names (batch_size is its train_batch_size).
KOHYA_SUBSET_OWN = {"image_dir": "path", "num_repeats": "repeats", "class_tokens": "class_tokens",
                    "is_reg": "regularization"}  # fmt: skip
KOHYA_DATASET_LEVEL = {"resolution": "resolution", "batch_size": "train_batch_size", "enable_bucket": "enable_bucket",
                       "min_bucket_reso": "min_bucket_reso", "max_bucket_reso": "max_bucket_reso",
                       "bucket_reso_steps": "bucket_reso_steps", "bucket_no_upscale": "bucket_no_upscale",
                       "validation_split": "validation_split"}  # fmt: skip
KOHYA_SUBSET_SHARED = ("caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
                       "secondary_separator", "enable_wildcard", "flip_aug", "color_aug", "random_crop",
                       "caption_prefix", "caption_suffix", "caption_dropout_rate", "caption_tag_dropout_rate",
                       "caption_dropout_every_n_epochs", "alpha_mask")  # fmt: skip
KOHYA_SUBSET_CAN_DIFFER = {**{key: key for key in SUBSET_CAPTION_KEYS}, "flip_aug": "flip_aug",
                           "random_crop": "random_crop", "color_aug": "color_jitter"}  # fmt: skip
KOHYA_COLOR_AUG = {True: [0.1, 0.1, 0.1, 0.02], False: [0.0, 0.0, 0.0, 0.0]}  # on/off: a mild jitter of each kind
KOHYA_NO_EFFECT = ("cache_info",)  # kohya's cache of image sizes: it changes no training, so it is let go


def _flatten_kohya_datasets(data: dict[str, Any]) -> tuple[dict[str, Any], list[dict], list[str]]:
    """A config holding kohya's [general] and [[datasets]] as flat v0 keys, the subsets as dataset.subsets
    entries, and what cannot be taken (named, never dropped). As in kohya, the dataset config's values win over
    the flat ones, and train_data_dir/reg_data_dir give way to its subsets."""
    general, datasets = data.get("general", {}), data.get("datasets", [])
    flat = {k: v for k, v in data.items() if k not in ("general", "datasets", "train_data_dir", "reg_data_dir")}
    if not isinstance(general, dict) or not isinstance(datasets, list) or not all(isinstance(d, dict)
                                                                                  for d in datasets):  # fmt: skip
        return flat, [], ["kohya's dataset config needs a [general] table and [[datasets]] tables; check its layout"]
    if len(datasets) != 1:
        return flat, [], [f"kohya's dataset config has {len(datasets)} [[datasets]]; this app trains one (one "
                          "resolution and batch size): keep one, with all its [[datasets.subsets]]"]  # fmt: skip
    dataset = {**general, **datasets[0]}
    subsets = dataset.pop("subsets", [])
    if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
        return flat, [], ["kohya's [[datasets]] has no [[datasets.subsets]]; add one per folder of images"]
    known = {*KOHYA_SUBSET_OWN, *KOHYA_DATASET_LEVEL, *KOHYA_SUBSET_SHARED, *KOHYA_NO_EFFECT}
    unknown = sorted({key for table in (dataset, *subsets) for key in table if key not in known})
    problems = [f"kohya's dataset option `{key}` is not a setting this app has; remove it (it takes "
                f"{', '.join(sorted(known))})" for key in unknown]  # fmt: skip
    flat.update({KOHYA_DATASET_LEVEL[k]: v for k, v in dataset.items() if k in KOHYA_DATASET_LEVEL})
    own: dict[str, list] = {}  # caption and augmentation settings that differ between subsets: each keeps its own
    for key in KOHYA_SUBSET_SHARED:
        values = [subset.get(key, dataset.get(key)) for subset in subsets]
        if len({repr(v) for v in values}) > 1 and key in KOHYA_SUBSET_CAN_DIFFER:
            own[KOHYA_SUBSET_CAN_DIFFER[key]] = [KOHYA_COLOR_AUG[bool(v)] if key == "color_aug" and v is not None
                                                 else v for v in values]  # fmt: skip
        elif len({repr(v) for v in values}) > 1:
            problems.append(f"kohya's `{key}` differs between subsets ({', '.join(repr(v) for v in values)}); this "
                            "app has one value for all folders: set one in [general]")  # fmt: skip
        elif values[0] is not None:
            flat[key] = values[0]
    entries = []
    for number, subset in enumerate(subsets, 1):
        if "image_dir" not in subset:
            problems.append(f"kohya's subset {number} has no image_dir; name its folder of images")
            continue
        entry = {ours: subset[theirs] for theirs, ours in KOHYA_SUBSET_OWN.items() if theirs in subset}
        entry["repeats"] = subset.get("num_repeats", dataset.get("num_repeats", 1))  # kohya ignores N_ prefixes here
        entry.update({key: values[number - 1] for key, values in own.items() if values[number - 1] is not None})
        entries.append(entry)
    return flat, entries, problems


def _kohya_block_lr_weights(out: dict[str, Any]) -> list[str]:
    """kohya's down_lr_weight / mid_lr_weight / up_lr_weight / block_lr_zero_threshold (network_args, or kohya_ss's
    fields) as lora.block_lr_weights, laid out as kohya's get_block_lr_weight lays them out: SD 1.x/2.x's 12 + 1 + 12
    blocks, SDXL's 1 + 9 + 3 + 9 + 1 (SDXL when the config says so or a list has SDXL's length). A list may be a
    preset (cosine, sine, linear, reverse_linear, zeros, each with an optional +offset); a short list is filled
    with 1, as kohya fills it; weights at or below the threshold become 0 (the block left out). The problems."""
    lora = out.get("lora", {})
    raw = {key: lora.pop(f"_{key}") for key in KOHYA_BLOCK_LR_KEYS if f"_{key}" in lora}
    lists = {key: raw[key] for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
             if str(raw.get(key, "")).strip() not in ("", "[]", "None")}  # fmt: skip
    if not lists:
        return []
    try:
        parsed = {key: _block_list(value) for key, value in lists.items()}
        threshold = float(str(raw.get("block_lr_zero_threshold") or 0).strip() or 0)
    except ValueError as exc:
        return [f"kohya's block learning rates: {exc}; give numbers separated by commas, or one of cosine, sine, "
                "linear, reverse_linear, zeros"]  # fmt: skip
    sdxl = out.get("family") == "sdxl" or any(isinstance(v, list) and len(v) == (3 if k == "mid_lr_weight" else 9)
                                              for k, v in parsed.items())  # fmt: skip
    blocks, mids = (9, 3) if sdxl else (12, 1)
    problems, parts = [], {}
    for key, length in (("down_lr_weight", blocks), ("mid_lr_weight", mids), ("up_lr_weight", blocks)):
        value = parsed.get(key, [1.0] * length)
        if isinstance(value, tuple):  # a preset: (name, offset)
            value = _block_preset(*value, length)
        if len(value) > length:
            problems.append(f"kohya's `{key}` has {len(value)} values, more than the {length} blocks of "
                            f"{'SDXL' if sdxl else 'SD 1.x/2.x'}; give at most {length}")  # fmt: skip
        parts[key] = [w if w > threshold else 0.0 for w in value + [1.0] * (length - len(value))]
    weights = parts["down_lr_weight"] + parts["mid_lr_weight"] + parts["up_lr_weight"]
    _set_path(out, "lora.block_lr_weights", [1.0, *weights, 1.0] if sdxl else weights)
    return problems


def _block_list(value: Any) -> list[float] | tuple[str, float]:
    """A kohya block-weight list ("1,0.5,..." or a TOML list) or preset ("sine+0.5" -> ("sine", 0.5))."""
    if isinstance(value, list | tuple):
        return [float(v) for v in value]
    text = str(value).strip()
    name, _, offset = text.partition("+")
    if name.strip() in BLOCK_PRESETS:
        return name.strip(), float(offset or 0)
    return [float(part) for part in text.strip("[]() ").split(",") if part.strip()]


BLOCK_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def _block_preset(name: str, offset: float, length: int) -> list[float]:
    """kohya's named block-weight curves over `length` blocks, plus `offset`."""
    steps = range(length)
    curve = {
        "cosine": [math.sin(math.pi * (i / (length - 1)) / 2) for i in reversed(steps)],
        "sine": [math.sin(math.pi * (i / (length - 1)) / 2) for i in steps],
        "linear": [i / (length - 1) for i in steps],
        "reverse_linear": [i / (length - 1) for i in reversed(steps)],
        "zeros": [0.0] * length,
    }[name]
    return [w + offset for w in curve]


def _validation_batches(out: dict[str, Any]) -> list[str]:
    """kohya's `max_validation_steps` (validation batches of train_batch_size images; kohya_ss saves it as text) as
    validation.max_images; the problem when it is not a count."""
    steps = out.get("validation", {}).pop("max_validation_steps", None)
    batch = out.get("dataset", {}).get("batch_size", 1)
    try:
        count = int(str(steps).strip()) if steps not in (None, "") else 0
        batch = int(str(batch).strip())
    except ValueError:
        return [f"kohya's `max_validation_steps` = {steps!r} is not a whole number of batches; give one, or 0 for all"]
    if count > 0:
        _set_path(out, "validation.max_images", count * batch)
    return []


def _migrate_v0(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"version": 1}
    subsets, problems = [], []
    if "general" in data or "datasets" in data:
        data, subsets, problems = _flatten_kohya_datasets(data)
    data, gui_problems = from_kohya_ss(data, keep_empty={*TrainConfig.model_fields, "pretrained_model_name_or_path"})
    problems += gui_problems
    args = {k: data[k] for k in ("network_args", "optimizer_args") if k in data}
    for key, value in data.items():
        if key == "version" or key in args:
            continue
        if key == "network_module":  # kohya's plain LoRA and LyCORIS' loader; others are named by validation
            if value not in ("networks.lora", "lycoris.kohya"):
                _set_path(out, "lora.network", value)
            continue
        target = KOHYA_V0_KEYS.get(key, key)  # unknown keys stay, so validation names them
        if key == "resolution" and isinstance(value, str) and value.split(",")[0].strip().isdigit():
            value = int(value.split(",")[0])  # kohya writes "512,512"
        if key == "resolution" and isinstance(value, list) and len(set(value)) == 1:
            value = value[0]  # kohya's dataset config writes [512, 512]
        if key == "optimizer_type" and isinstance(value, str):
            value = KOHYA_OPTIMIZERS.get(value.lower(), value)
        if key == "network_train_unet_only":
            target, value = "lora.train_text_encoder", not value
        if key == "color_aug":
            value = KOHYA_COLOR_AUG[bool(value)]
        if key == "alpha_mask" and value is True:  # kohya's alpha_mask turns masked loss on by itself
            _set_path(out, "dataset.masked_loss", True)
        _set_path(out, target, value)
    problems += _validation_batches(out)
    if out.get("validation", {}).get("seed") in (0, "0"):  # kohya_ss's unset seed; the form's drawn empty box
        del out["validation"]["seed"]
    if "optimizer_type" in data and out["optimizer"]["optimizer"] == "adamw_schedulefree":
        # kohya gives schedule-free optimizers a do-nothing schedule: its lr_scheduler and warm-up do not act
        # (their warm-up comes from optimizer_args' warmup_steps, read below)
        out["optimizer"].update(lr_scheduler="constant", lr_warmup_steps=0)
    if subsets:
        _set_path(out, "dataset.subsets", subsets)
    if "network_args" in args:
        problems += _kohya_args("network_args", args["network_args"], KOHYA_NETWORK_ARGS, out)
    if "optimizer_args" in args:
        problems += _kohya_args("optimizer_args", args["optimizer_args"], KOHYA_OPTIMIZER_ARGS, out)
    problems += _kohya_block_lr_weights(out)  # from network_args or kohya_ss's fields
    if problems:
        raise ConfigError("config", problems)
    lora = out.get("lora", {})
    if lora.get("conv_rank") == 0:  # kohya's "no conv adapters"
        del lora["conv_rank"]
    if (lora.get("conv_rank") or lora.get("conv_block_ranks")) and "unet_targets" not in lora:
        # kohya's conv_dim (or conv_block_dims) adds the convs to its own set
        lora["unet_targets"] = "full"
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
    """A TOML file's tables, or a JSON file's object (kohya_ss saves its settings as JSON; sd-scripts reads both)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(str(path), ["the file does not exist; check the path"]) from None
    except IsADirectoryError:
        raise ConfigError(str(path), ["this is a folder; name a .toml or .json file"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"not valid TOML ({exc}); fix the syntax at that line"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), [f"not valid JSON ({exc}); fix the syntax there"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["the file holds no settings table; a config is a TOML table or a JSON object"])
    return data


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a TOML config or preset (with the kohya dataset config it names), apply `--set` overrides, migrate and
    validate it."""
    data = with_kohya_dataset_config(read_toml(path), Path(path).parent)
    return validate_config(apply_overrides(data, overrides), source=str(path))


def import_config(path: str | Path, name: str) -> TrainConfig:
    """A config file handed over on its own (the Train tab's import of a kohya_ss save, an sd-scripts TOML or a
    config of this app), validated; `name` is what to call it in messages. Any kohya dataset_config it names is
    not read: the file came without it, and a path from an upload is not the app's to open."""
    data = read_toml(path)
    named = str(data.get("dataset_config", "")).strip() if data.get("version", 0) == 0 else ""
    if named:
        raise ConfigError(name, [f"it names the kohya dataset config {shortened(named)!r}, which an import cannot "
                                 "bring along; put its folders in dataset.subsets after importing without it, or "
                                 "train it from the command line: `lora-studio train FILE`"])  # fmt: skip
    return validate_config(data, source=name)


def with_kohya_dataset_config(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A kohya config's `dataset_config` file (TOML, or JSON as kohya also takes; a relative path is looked for
    beside the config, then in the working folder) read into it as the [general] and [[datasets]] tables the
    migration takes."""
    if "dataset_config" not in data or data.get("version", 0) != 0:
        return data  # a current config has no such key: validation names it
    named = str(data["dataset_config"]).strip()
    rest = {k: v for k, v in data.items() if k != "dataset_config"}
    if not named:
        return rest  # kohya_ss writes an empty one when the folders are given as train_data_dir
    # kohya opens it from the working folder; a path relative to the config's own folder is looked for first
    candidates = [folder / Path(named).expanduser(), Path(named).expanduser()]
    path = next((p for p in candidates if p.is_file()), candidates[0])
    included = read_toml(path)
    extra = sorted(k for k in included if k not in ("general", "datasets"))
    if extra:
        raise ConfigError(str(path), [f"a kohya dataset config holds [general] and [[datasets]], not {extra}; check "
                                      "that dataset_config names the right file"])  # fmt: skip
    return {**rest, **included}


def config_to_toml(config: TrainConfig) -> str:
    # TOML has no null: unset optional fields are left out and come back as their default (None).
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def save_config(config: TrainConfig, path: str | Path, header: str = "") -> None:
    text = config_to_toml(config)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + text
    write_text_atomic(path, text)


# --- presets --------------------------------------------------------------------------------------


PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # no separators, no leading dot: stays in its folder


def bundled_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def user_presets() -> list[str]:
    """The presets a person saved: files with a preset's name in the user presets folder, none that would hide a
    bundled one (a leftover or foreign file there is skipped, never fatal)."""
    folder, bundled = user_presets_dir(), set(bundled_presets())
    if not folder.is_dir():
        return []
    names = (p.stem for p in folder.glob("*.toml") if p.is_file() and is_within(p, folder))
    return sorted(n for n in names if PRESET_NAME.fullmatch(n) and n not in bundled)


def list_presets() -> list[str]:
    """Every preset a config may start from: the bundled ones, then the person's own."""
    return bundled_presets() + user_presets()


def preset_path(name: str) -> Path:
    """The preset file of `name`; only the names list_presets gives (a name from a request cannot leave the
    folder: "../x" is no preset)."""
    if name in bundled_presets():
        return PRESETS_DIR / f"{name}.toml"
    if name in user_presets():
        return user_presets_dir() / f"{name}.toml"
    known = list_presets()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(known)}"
    where = f"{PRESETS_DIR} or {user_presets_dir()}"
    raise ConfigError(f"preset {name!r}", [f"there is no {name}.toml in {where}; {hint}"])


def save_user_preset(config: TrainConfig, name: str, based_on: str = "") -> Path:
    """`config` as the person's preset `name` (a new one, or their own of that name replaced); never a bundled one.
    The config's own `name` (what its runs are called) stays as it is."""
    name = (name or "").strip()
    if not PRESET_NAME.fullmatch(name):
        raise ConfigError(f"preset name {name!r}", ["use 1-64 letters, digits, '-', '_' or '.', starting with a "
                                                    "letter or digit (it becomes the file name)"])  # fmt: skip
    if name in bundled_presets():
        raise ConfigError(f"preset name {name!r}", ["a bundled preset has this name and stays as shipped; "
                                                    "choose another name"])  # fmt: skip
    source = f", from the {based_on} preset" if based_on else ""
    header = f"Your preset, saved {time.strftime('%Y-%m-%d %H:%M')}{source}."
    path = user_presets_dir() / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(config, path, header=header)  # the runs keep the name the form gave them
    return path


def delete_user_preset(name: str) -> Path:
    """Remove one of the person's presets; the bundled ones cannot be deleted."""
    if name in bundled_presets():
        raise ConfigError(f"preset {name!r}", ["it is a bundled preset, which cannot be deleted"])
    path = preset_path(name)  # only a listed name: a request cannot name another file
    path.unlink()
    return path


def load_preset(name: str, overrides: Iterable[str] = ()) -> TrainConfig:
    return load_config(preset_path(name), overrides)


def preset_description(name: str) -> str:
    """The leading comment block of a preset: when to use it (a file that cannot be read says so instead)."""
    lines = []
    try:
        text = preset_path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"(cannot read this preset: {exc.__class__.__name__})"
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(line for line in lines if line)
