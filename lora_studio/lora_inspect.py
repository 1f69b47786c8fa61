"""What a LoRA file holds (format, family, modules, ranks, alphas, hashes), read without torch when it can be.

A kohya file answers from its checked safetensors header plus the bytes of its alpha scalars, read with
numpy: `lora-studio inspect` then takes well under a second, where importing torch and diffusers alone
takes several. Files in other formats (diffusers, PEFT, OneTrainer's SDXL names) need their names
converted, which `lora_read.load_lora` does with the bundled configs, so they take the slow path.
The checks and messages both paths share live here, so the two agree on what is a damaged file.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraStudioError
from .models import BASE_MODEL_VERSION  # models.py imports torch only inside functions
from .safetensors_io import Header, SafetensorsFileError, TensorInfo, read_header

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DOWN, UP, ALPHA, DORA = ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"
SGM_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")

# Width of the text the UNet cross-attends to, and of the text encoder, per family.
CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TEXT_ENCODER_WIDTH = {768: "sd1", 1024: "sd2"}
MODELSPEC_FAMILIES = (("sdxl", "stable-diffusion-xl"), ("sd2-v", "v2-768-v"), ("sd2", "v2"), ("sd1", "v1"))
FAMILY_BY_VERSION = {v: k for k, v in BASE_MODEL_VERSION.items()}


class LoraFileError(LoraStudioError):
    """A LoRA file that cannot be read, does not fit the base model, or cannot be written."""


@dataclass(frozen=True)
class ModuleFacts:
    """One adapted layer as inspect reports it."""

    down_shape: tuple[int, ...]  # [r, in] or [r, in, kh, kw]
    up_shape: tuple[int, ...]  # [out, r] or [out, r, 1, 1]
    alpha: float
    dora: bool
    algo: str = "lora"  # or LyCORIS' loha / lokr, whose shapes here are their plain-LoRA equivalent's

    @property
    def rank(self) -> int:
        return self.down_shape[0]

    @property
    def delta_shape(self) -> list[int]:
        return [self.up_shape[0], *self.down_shape[1:]]


def check_lora_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path} does not exist; give the path of a .safetensors LoRA file.")
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(
            f"{path} is not a .safetensors file; LoRA files in pickle formats (.ckpt/.pt/.bin) are not read, "
            "convert them to .safetensors first."
        )
    return path


def read_lora_header(path: Path) -> Header:
    try:
        return read_header(path)
    except SafetensorsFileError as e:
        raise LoraFileError(str(e)) from None


def check_module_shapes(name: str, down: tuple[int, ...], up: tuple[int, ...], source) -> None:
    if len(down) not in (2, 4) or len(up) != len(down):
        raise LoraFileError(
            f"{source}: module {name} has lora_down of shape {tuple(down)} and lora_up of shape "
            f"{tuple(up)}; they must both be 2-D (linear) or 4-D (conv). The file is damaged."
        )
    if up[1] != down[0]:
        raise LoraFileError(
            f"{source}: module {name} has rank {down[0]} in lora_down but {up[1]} in lora_up; "
            "the file is damaged or was edited, so re-export it."
        )


def missing_half(source, name: str, which: str) -> LoraFileError:
    return LoraFileError(f"{source}: module {name} has no {which.strip('.')} tensor; the file is incomplete.")


def vector_alpha(source, name: str, count: int) -> LoraFileError:
    return LoraFileError(f"{source}: the alpha of module {name} holds {count} values, not one number.")


def unknown_tensors(source, unknown: set[str]) -> LoraFileError:
    return LoraFileError(
        f"{source} has {len(unknown)} tensor(s) this app does not know, e.g. {sorted(unknown)[0]} "
        "(LoRA, DoRA, LoCon and LyCORIS LoHa/LoKr are read; not OFT, IA3 or GLoRA); export it as one of those."
    )


def not_finite(source, name: str, label: str) -> LoraFileError:
    return LoraFileError(
        f"{source}: module {name}'s {label} holds NaN or inf values; the training that made it diverged, "
        "so use an earlier checkpoint."
    )


def kohya_module_name(key: str) -> str:
    """The module a kohya/LyCORIS key belongs to: `name.lora_down.weight`, `name.alpha`, `name.hada_w1_a` -> name."""
    return key.rsplit(".lora_", 1)[0] if ".lora_" in key else key.rsplit(".", 1)[0]


def kohya_module_names(keys) -> list[str]:
    return sorted({kohya_module_name(k) for k in keys})


def is_onetrainer_sdxl(names) -> bool:
    """SDXL written with diffusers block names (`lora_unet_down_blocks_…`) beside lora_te1_: OneTrainer's kohya."""
    names = list(names)
    return (
        any(n.startswith("lora_te1_") for n in names)
        and not any(n.startswith(SGM_BLOCKS) for n in names)
        and any(n.startswith("lora_unet_") for n in names)
    )


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version in FAMILY_BY_VERSION:
        return FAMILY_BY_VERSION[version]
    if version.startswith("sdxl"):
        return "sdxl"
    architecture = metadata.get("modelspec.architecture", "")
    for family, arch in MODELSPEC_FAMILIES:
        if arch in architecture:
            return family
    return None


def family_of(metadata: Mapping[str, str], down_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """From the metadata when it says, else from kohya module names and the layer widths (down's input)."""
    declared = family_from_metadata(metadata)
    if declared:
        return declared
    if any(n.startswith(("lora_te1_", "lora_te2_")) or n.startswith(SGM_BLOCKS) for n in down_shapes):
        return "sdxl"
    for name, shape in down_shapes.items():
        if name.startswith("lora_unet_") and name.endswith("attn2_to_k"):
            return CROSS_ATTENTION_WIDTH.get(shape[1])
    for name, shape in down_shapes.items():
        if name.startswith("lora_te_") and name.endswith("q_proj"):
            return TEXT_ENCODER_WIDTH.get(shape[1])
    return None


def part_of(name: str) -> str:
    return name.split("_", 2)[1] if not name.startswith("lora_unet_") else "unet"


def unet_block_of(name: str) -> str | None:
    """down, mid or up for a kohya UNet module name (diffusers paths for SD 1.x/2.x, SGM for SDXL); None else."""
    for block, marks in (("down", ("_down_blocks_", "_input_blocks_")), ("mid", ("_mid_block_", "_middle_block_")),
                         ("up", ("_up_blocks_", "_output_blocks_"))):  # fmt: skip
        if name.startswith("lora_unet") and any(mark in name for mark in marks):
            return block
    return None


def ranks_by_block(modules: Mapping[str, ModuleFacts]) -> dict[str, dict[str, int]]:
    """{down|mid|up: {rank: modules}}: where per-block ranks (kohya's block_dims) put their rank, at a glance."""
    found: dict[str, Counter] = {}
    for name, module in modules.items():
        block = unet_block_of(name)
        if block is not None:
            found.setdefault(block, Counter())[module.rank] += 1
    return {block: {str(r): n for r, n in sorted(found[block].items())} for block in ("down", "mid", "up")
            if block in found}  # fmt: skip


def summarise(modules: Mapping[str, ModuleFacts], metadata: Mapping[str, str], fmt: str, family, path, notes) -> dict:
    """What `inspect` prints: family, format, module counts, rank and alpha (the most common ones)."""
    ranks = Counter(m.rank for m in modules.values())
    alphas = Counter(m.alpha for m in modules.values())
    return {
        "path": str(path) if path else None,
        "family": family,
        "format": fmt,
        "modules": len(modules),
        "modules_per_part": dict(Counter(part_of(n) for n in modules)),
        "rank": ranks.most_common(1)[0][0] if ranks else None,
        "alpha": alphas.most_common(1)[0][0] if alphas else None,
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "ranks_by_block": ranks_by_block(modules),
        "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
        "dora": any(m.dora for m in modules.values()),
        "network": dict(Counter(m.algo for m in modules.values())),
        "sshs_model_hash": metadata.get("sshs_model_hash"),
        "sshs_legacy_hash": metadata.get("sshs_legacy_hash"),
        "metadata": dict(metadata),
        "notes": list(notes),
    }


def inspect_lora(path: str | os.PathLike) -> dict:
    """Everything a person asks of a LoRA file, plus `per_module` (rank, alpha, delta shape, DoRA) and
    `hashes_match` (whether sshs_model_hash is the hash of its tensor bytes)."""
    path = check_lora_path(path)
    header = read_lora_header(path)
    keys = list(header.tensors)
    names = kohya_module_names(keys)
    # LyCORIS (LoHa, LoKr, a LoCon's Tucker core): their checks multiply factors, so they take torch's path
    lycoris = any(".hada_" in k or ".lokr_" in k or ".lora_mid." in k for k in keys)
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys) and not is_onetrainer_sdxl(names) and not lycoris:
        modules = kohya_facts(header, names)
        family = family_of(header.metadata, {n: m.down_shape for n, m in modules.items()})
        summary = summarise(modules, header.metadata, "kohya", family, path, [])
    else:
        from .lora_read import load_lora  # converts diffusers/PEFT/OneTrainer names: needs torch

        lora = load_lora(path)
        modules = {name: m.facts() for name, m in lora.modules.items()}
        summary = summarise(modules, lora.metadata, lora.format, lora.family, path, lora.notes)
    summary["per_module"] = {
        name: {"rank": m.rank, "alpha": m.alpha, "shape": m.delta_shape, "dora": m.dora, "network": m.algo}
        for name, m in modules.items()
    }
    summary["hashes_match"] = hashes_match(header)
    return summary


def kohya_facts(header: Header, names: list[str]) -> dict[str, ModuleFacts]:
    """Each module's shapes and alpha, checked as `lora_read.load_lora` checks them."""
    source, tensors = header.path, header.tensors
    modules = {}
    for name in names:
        down, up = tensors.get(name + DOWN), tensors.get(name + UP)
        if down is None or up is None:
            raise missing_half(source, name, DOWN if down is None else UP)
        alpha = tensors.get(name + ALPHA)
        if alpha is not None and len(read_numbers(header, alpha)) != 1:
            raise vector_alpha(source, name, len(read_numbers(header, alpha)))
        # kohya's rule: no alpha means scale 1, i.e. alpha = rank.
        value = float(read_numbers(header, alpha)[0]) if alpha is not None else float(down.shape[0])
        modules[name] = ModuleFacts(down.shape, up.shape, value, name + DORA in tensors)
    unknown = set(tensors) - {n + s for n in modules for s in (DOWN, UP, ALPHA, DORA)}
    if unknown:
        raise unknown_tensors(source, unknown)
    for name, m in modules.items():
        check_module_shapes(name, m.down_shape, m.up_shape, source)
        for label, suffix in (("lora_down", DOWN), ("lora_up", UP)):
            if not all_finite(header, tensors[name + suffix]):
                raise not_finite(source, name, label)
    return modules


# Exponent bits of each float dtype: all ones means inf or NaN.
EXPONENT_MASK = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
                 "F64": ("<u8", 0x7FF0000000000000)}  # fmt: skip


def _raw(header: Header, info: TensorInfo, dtype: str):
    import numpy as np

    count = (info.end - info.start) // np.dtype(dtype).itemsize
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(header.path, dtype=dtype, mode="r", offset=header.data_start + info.start, shape=(count,))


def all_finite(header: Header, info: TensorInfo) -> bool:
    """No inf or NaN in a tensor's bytes (integer tensors are always finite)."""
    if info.dtype not in EXPONENT_MASK:
        return True
    dtype, mask = EXPONENT_MASK[info.dtype]
    return not bool(((_raw(header, info, dtype) & mask) == mask).any())


NUMPY_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "U8": "u1", "I16": "<i2", "U16": "<u2",
                "I32": "<i4", "U32": "<u4", "I64": "<i8", "U64": "<u8", "BOOL": "?"}  # fmt: skip


def read_numbers(header: Header, info: TensorInfo) -> list[float]:
    """A small tensor's values (an alpha), as floats."""
    import numpy as np

    if info.dtype == "BF16":  # numpy has no bfloat16: its bits are the top half of a float32's
        return (_raw(header, info, "<u2").astype(np.uint32) << 16).view(np.float32).tolist()
    if info.dtype not in NUMPY_DTYPES:
        raise LoraFileError(f"{header.path}: an alpha is stored as {info.dtype}, which no LoRA writer uses.")
    return [float(v) for v in _raw(header, info, NUMPY_DTYPES[info.dtype])]


def hashes_match(header: Header) -> bool | None:
    """Whether the file's sshs_model_hash is the hash of its tensor bytes (None when it has none)."""
    stored = header.metadata.get("sshs_model_hash")
    if not stored:
        return None
    with open(header.path, "rb") as f:
        f.seek(header.data_start)
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == stored
