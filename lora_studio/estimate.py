"""A rough GPU memory (VRAM) estimate for a training config; the Train tab shows it before Start.

The memory formula (all sizes in GiB, 1 GiB = 2**30 bytes):

    VRAM = frozen weights + LoRA training state + activations + workspace

    frozen weights  = (UNet + text encoder(s) + VAE parameters) x weight bytes
                      weight bytes: 2 with mixed_precision fp16/bf16, 4 with "no" (fp32)
    LoRA state      = LoRA parameters x optimizer bytes per parameter
                      (fp32 weight 4 + fp32 gradient 4 + optimizer state: AdamW 8, AdamW8bit 2,
                       Prodigy 16, D-Adaptation Adam 12, Adafactor 4, Lion 4, Lion8bit 1, schedule-free
                       AdamW 12: its z and second moment, and the copy of the weights kept while samples and
                       files use the average); LoRA parameters = rank x sum(in + out) over the
                      targeted layers (+ conv_rank x sum(in*k*k + out) for LoCon convs)
    activations     = batch x A[family] x (width x height / native pixels) x targets factor
                      x (checkpointing factor if gradient checkpointing) x (weight bytes / 2)
    workspace       = 0.1 (cuBLAS/SDPA workspaces and allocator slack)

LoHa / LoKr (`lora.network`): peft rebuilds each adapted layer's weight change in every forward and keeps it, in
the compute dtype, for the backward, so their activations add the targeted layers' weight count x weight bytes
(x the checkpointing factor with gradient checkpointing); LoHa has twice LoRA's parameters (two pairs), LoKr is
counted as LoRA (more than its Kronecker factors hold). Derived from peft's code, not measured on a GPU.

fp8_base stores the UNet's Linear/Conv2d weights in 1 byte each (FP8_STORED) and widens each to the weight bytes
when it runs; autograd keeps the wide copies of the layers outside the checkpointed units (FP8_OUTSIDE_UNITS:
embeddings, proj_in/out, samplers, conv_in/out) and, while one unit is recomputed, that unit's (FP8_LARGEST_UNIT);
both are counted with the weights. Frozen text encoders that stay on the GPU are narrowed too
(FP8_TEXT_ENCODERS_STORED), without wide copies (nothing flows back through them). Counted on the meta device; the
config requires gradient checkpointing with fp8_base.

A[family], the checkpointing factors and the attn-ff factor are fitted to the H100 peaks measured by
the reference step benchmark (`../shared/bench/h100-reference.json`, recorded in CALIBRATION below):
A is the peak's growth per extra sample (batch 1 -> 4), the factors are the ratios of the
activation parts. `tests/test_estimate.py` checks the formula against every one of those peaks.
Not measured, so taken from the nearest measured case: SD2 uses SD1.5's activations per pixel
(same widths), 'full' (LoCon) uses the attn-ff factor, and the text encoders' own activations
(77 tokens) are left out. torch.compile lowers the real peak (2.43 vs 2.84 GiB); the estimate ignores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig

GIB = 2**30
WORKSPACE_GIB = 0.1

# Parameter counts of the full-size diffusers models (counted on the meta device from assets/sd-configs).
PARAMETERS = {
    "sd1": {"unet": 859_520_964, "text_encoders": 123_060_480, "vae": 83_653_863},
    "sd2": {"unet": 865_910_724, "text_encoders": 340_387_840, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "text_encoders": 123_060_480 + 694_659_840, "vae": 83_653_863},
}
# sum(in + out) over the targeted linear (and 1x1 conv) layers (a LoRA of rank r has r times this many parameters),
# and sum(in*k*k + out) over the LoCon convs of 'full'. Counted on the meta device; see the tests.
UNET_LORA_WIDTH = {
    "sd1": {"attn": 199_296, "attn-ff": 423_936, "full": 423_936},
    "sd2": {"attn": 207_488, "attn-ff": 432_128, "full": 432_128},
    "sdxl": {"attn": 1_451_520, "attn-ff": 2_659_840, "full": 2_659_840},
}
UNET_CONV_WIDTH = {"sd1": 544_000, "sd2": 544_000, "sdxl": 355_840}
# sum(out * in * kh * kw) over the targeted layers: what LoHa/LoKr rebuild every step (counted on the meta device).
UNET_TARGET_WEIGHTS = {
    "sd1": {"attn": 93_511_680, "attn-ff": 266_977_280, "full": 807_956_480},
    "sd2": {"attn": 99_901_440, "attn-ff": 273_367_040, "full": 814_346_240},
    "sdxl": {"attn": 955_187_200, "attn-ff": 2_207_744_000, "full": 2_527_539_200},
}
TEXT_ENCODER_TARGET_WEIGHTS = {"sd1": 84_934_656, "sd2": 289_406_976, "sdxl": 714_080_256}
TEXT_ENCODER_LORA_WIDTH = {"sd1": 165_888, "sd2": 423_936, "sdxl": 165_888 + 737_280}

# fp8_base: the UNet's Linear/Conv2d weights (stored in 1 byte), those of the layers outside diffusers' checkpointed
# units (ResnetBlock2D, BasicTransformerBlock) and the largest unit's. Counted on the meta device; see the tests.
FP8_STORED = {"sd1": 859_077_120, "sd2": 865_466_880, "sdxl": 2_565_880_320}
FP8_OUTSIDE_UNITS = {"sd1": 79_383_040, "sd2": 79_383_040, "sdxl": 54_110_720}
FP8_LARGEST_UNIT = {"sd1": 49_152_000, "sd2": 49_152_000, "sdxl": 49_152_000}
# and the text encoders' Linear weights, narrowed when they are frozen and stay on the GPU
FP8_TEXT_ENCODERS_STORED = {"sd1": 84_934_656, "sd2": 289_406_976, "sdxl": 715_718_656}

NATIVE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
# GiB of activations per sample at the native size with the 'attn' targets, bf16.
ACTIVATIONS_GIB = {"sd1": 1.08, "sd2": 1.08 * (768 / 512) ** 2, "sdxl": 7.26}
CHECKPOINTING_FACTOR = {"sd1": 0.205, "sd2": 0.205, "sdxl": 0.092}
TARGETS_FACTOR = {"attn": 1.0, "attn-ff": 1.156, "full": 1.156}
OPTIMIZER_STATE_BYTES = {
    "adamw": 8, "adamw8bit": 2, "prodigy": 16, "dadapt_adam": 12, "adafactor": 4, "lion": 4, "lion8bit": 1,
    "adamw_schedulefree": 12,
}  # fmt: skip

# The measured H100 peaks the constants above are fitted to (reference step: bf16 UNet, fp32 rank-16 LoRA,
# fused AdamW, SDPA, latents and text embeddings given, i.e. VAE and text encoders not on the GPU).
CALIBRATION = [
    # family, size, batch, targets, gradient checkpointing, peak GiB
    ("sd1", 512, 1, "attn", False, 2.84),
    ("sd1", 512, 4, "attn", False, 6.08),
    ("sd1", 512, 1, "attn-ff", False, 3.06),
    ("sd1", 512, 1, "attn", True, 1.98),
    ("sdxl", 1024, 1, "attn", False, 12.49),
    ("sdxl", 1024, 4, "attn", False, 34.26),
    ("sdxl", 1024, 1, "attn", True, 5.90),
]


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    lora_state_gib: float
    activations_gib: float
    lora_parameters: int

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.lora_state_gib + self.activations_gib + WORKSPACE_GIB

    def sentence(self) -> str:
        return (f"about {self.total_gib:.1f} GiB of GPU memory: weights {self.weights_gib:.1f}, "
                f"LoRA + optimizer {self.lora_state_gib:.2f}, activations {self.activations_gib:.1f}, "
                f"workspace {WORKSPACE_GIB:.1f} ({self.lora_parameters / 1e6:.1f}M LoRA parameters)")  # fmt: skip


def lora_parameter_count(family: str, config: TrainConfig) -> int:
    lora = config.lora
    count = lora.rank * UNET_LORA_WIDTH[family][lora.unet_targets]
    if lora.unet_targets == "full":
        count += (lora.conv_rank or lora.rank) * UNET_CONV_WIDTH[family]
    if lora.train_text_encoder:
        count += lora.rank * TEXT_ENCODER_LORA_WIDTH[family]
    return 2 * count if lora.network == "loha" else count


def rebuilt_weights(family: str, config: TrainConfig) -> int:
    """How many weight elements LoHa/LoKr rebuild and keep per step (0 for LoRA, which multiplies its factors)."""
    lora = config.lora
    if lora.network == "lora":
        return 0
    count = UNET_TARGET_WEIGHTS[family][lora.unet_targets]
    return count + (TEXT_ENCODER_TARGET_WEIGHTS[family] if lora.train_text_encoder else 0)


def estimate_memory(
    family: str,
    config: TrainConfig,
    width: int | None = None,
    height: int | None = None,
    with_vae_and_text_encoders: bool | None = None,
) -> MemoryEstimate:
    """The formula above for a full-size model of `family` (sd1, sd2, sdxl), trained as `config` says.

    Width and height default to the dataset resolution (else the family's native size); the biggest
    bucket sets the peak, so pass the largest bucket when you know it. The VAE and text encoders count
    unless the config keeps them off the GPU while training (`frozen_parts_off_device`); True or False
    counts both or neither.
    """
    if family not in PARAMETERS:
        raise ValueError(f"no memory figures for family {family!r}; known: {', '.join(PARAMETERS)}")
    size = config.dataset.resolution or NATIVE_SIZE[family]
    pixels = (width or size) * (height or size)
    weight_bytes = 4 if config.mixed_precision == "no" else 2
    counts = PARAMETERS[family]
    if with_vae_and_text_encoders is None:
        off = config.frozen_parts_off_device()
    else:
        off = set() if with_vae_and_text_encoders else {"vae", "text_encoders"}
    frozen = counts["unet"] + sum(counts[part] for part in ("text_encoders", "vae") if part not in off)
    lora_parameters = lora_parameter_count(family, config)
    per_parameter = 8 + OPTIMIZER_STATE_BYTES[config.optimizer.optimizer]
    activations = (config.dataset.batch_size * ACTIVATIONS_GIB[family] * pixels / NATIVE_SIZE[family] ** 2
                   * TARGETS_FACTOR[config.lora.unet_targets] * weight_bytes / 2)  # fmt: skip
    activations += rebuilt_weights(family, config) * weight_bytes / GIB
    if config.gradient_checkpointing:
        activations *= CHECKPOINTING_FACTOR[family]
    return MemoryEstimate(
        weights_gib=frozen_weight_bytes(family, config, frozen, weight_bytes, "text_encoders" not in off) / GIB,
        lora_state_gib=lora_parameters * per_parameter / GIB,
        activations_gib=activations,
        lora_parameters=lora_parameters,
    )


def frozen_weight_bytes(family: str, config: TrainConfig, frozen: int, weight_bytes: int, encoders_in: bool) -> int:
    """The frozen parameters' bytes: `frozen` parameters at `weight_bytes`, except that with fp8_base the UNet's
    Linear/Conv2d weights take 1 byte, plus the wide copies autograd keeps of them (see the module's text), and so
    do the text encoders' when they are counted (`encoders_in`) and fp8_base narrows them (frozen, uncached)."""
    if not config.fp8_base:
        return frozen * weight_bytes
    narrow = FP8_STORED[family]
    if encoders_in and config.fp8_text_encoders():
        narrow += FP8_TEXT_ENCODERS_STORED[family]  # no wide copies: they run without autograd
    wide_copies = FP8_OUTSIDE_UNITS[family] + FP8_LARGEST_UNIT[family]
    return narrow + (frozen - narrow + wide_copies) * weight_bytes


CARD_SIZES_GIB = (8, 12, 16, 24, 48, 80)
HEADROOM = 0.9  # of the card: the desktop, the CUDA context and fragmentation take the rest
MOST_BATCH = 64  # guidance stops counting here ("64+")


def largest_batch(family: str, config: TrainConfig, card_gib: float, most: int = MOST_BATCH) -> int:
    """The biggest batch size whose estimate fits in HEADROOM of a card of `card_gib` GiB (0: not even 1).
    Only the activations grow with the batch, linearly, so the answer is one division."""
    one = estimate_memory(family, config.model_copy(update={"dataset": config.dataset.model_copy(
        update={"batch_size": 1})}))  # fmt: skip
    room = HEADROOM * card_gib - (one.total_gib - one.activations_gib)
    return max(0, min(most, math.floor(room / one.activations_gib)))


def batch_guidance(family: str, config: TrainConfig, card: tuple[str, float] | None = None) -> str:
    """Which batch fits on common cards, and on this machine's GPU when nvidia-smi names one."""
    sizes = " · ".join(f"{gib} GiB: {shown_batch(largest_batch(family, config, gib))}" for gib in CARD_SIZES_GIB)
    card = card or local_gpu()
    mine = ""
    if card is not None:
        name, gib = card
        fits = largest_batch(family, config, gib)
        mine = (f"On this machine's {name} ({gib:.0f} GiB): up to batch {shown_batch(fits)}. " if fits else
                f"This machine's {name} ({gib:.0f} GiB) is too small for these settings: try the low-VRAM preset. ")
    return f"{mine}Largest batch by card size: {sizes}."


def shown_batch(fits: int) -> str:
    return "none" if not fits else f"{fits}+" if fits >= MOST_BATCH else str(fits)


_local_gpu: list = []


def local_gpu() -> tuple[str, float] | None:
    """The first NVIDIA GPU's name and memory, from nvidia-smi (no torch import; None without one). Asked once."""
    if not _local_gpu:
        import shutil
        import subprocess

        found = None
        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=True).stdout  # fmt: skip
                name, mib = out.strip().splitlines()[0].rsplit(",", 1)
                found = (name.strip(), float(mib) / 1024)
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                found = None
        _local_gpu.append(found)
    return _local_gpu[0]
