"""The one safetensors header reader, and the one writer, for every file LoRA Studio reads or writes.

The header is parsed and checked here before safetensors (or torch) sees the file, so that a damaged,
cut-short or hostile file (string or overlapping offsets, giant shapes, a deeply nested header,
non-text metadata) is refused with one sentence naming the file, never a raw library error. Needs
neither torch nor safetensors: the CLI's read-only commands use it without importing them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraStudioError
from .fsutil import atomic_path

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class SafetensorsFileError(LoraStudioError):
    """A file that is not a readable safetensors file; the message names it and says what to do."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section, which begins at data_start
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # 8 + the header's length
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}


def read_header(path: str | os.PathLike) -> Header:
    """The checked header of a safetensors file; SafetensorsFileError for anything malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            _check_length(path, length, size)
            raw = f.read(length)
    except OSError as exc:
        reason = exc.strerror or exc
        raise SafetensorsFileError(f"{path} cannot be read ({reason}); check the path and its permissions.") from None
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, 8 + length, size)
    return Header(path, 8 + length, tensors, metadata)


def _check_length(path: Path, length: int, size: int) -> None:
    if size == 0:
        raise SafetensorsFileError(f"{path} is empty (0 bytes); the download or copy failed, so copy it again.")
    if length < 2 or length > size - 8:
        raise not_safetensors(path, "its header length does not fit the file")
    if length > MAX_HEADER:
        raise SafetensorsFileError(
            f"{path} declares a {length / 1e6:,.0f} MB header, over the 100 MB safetensors allows; the file is "
            "damaged or was not written by a safetensors library, so fetch or export it again."
        )


def _parse_json(path: Path, raw: bytes) -> dict:
    if not raw.lstrip().startswith(b"{"):
        raise not_safetensors(path, "its header is not a JSON object")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: a deeply nested header
        raise not_safetensors(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise not_safetensors(path, "its header is not a JSON object")
    return header


def _metadata(path: Path, metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise not_safetensors(path, "its __metadata__ must map names to text")
    return metadata


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict):
        raise not_safetensors(path, f"the entry of tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise not_safetensors(path, f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise not_safetensors(path, f"tensor {name!r} has a shape that is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise not_safetensors(path, f"tensor {name!r} has data_offsets that are not two byte positions")
    start, end = offsets
    if end < start or end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise not_safetensors(path, f"the byte range of tensor {name!r} does not match its shape and dtype")
    return TensorInfo(dtype, tuple(shape), start, end)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The tensors' byte ranges must not overlap and must lie inside the file."""
    ranges = sorted((info.start, info.end, name) for name, info in tensors.items())
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:], strict=False):
        if start < end:
            raise not_safetensors(path, f"the data of tensors {first!r} and {second!r} overlap")
    expected = data_start + max((end for _, end, _ in ranges), default=0)
    if size < expected:
        raise SafetensorsFileError(
            f"{path} is truncated: it should be {expected:,} bytes but is {size:,}; the download or copy did not "
            "finish, so fetch or copy the file again."
        )


def not_safetensors(path: Path, why: str) -> SafetensorsFileError:
    return SafetensorsFileError(
        f"{path} is not a safetensors file ({why}); it is damaged or another kind of file, so give a "
        ".safetensors checkpoint or LoRA written by a safetensors library."
    )


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write torch tensors to `path` atomically; a full disk is a WriteError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # an I/O error inside the Rust writer, e.g. "... (os error 28)"
            code = re.search(r"os error (\d+)|code: (\d+)", str(exc))
            number = int(next(g for g in code.groups() if g)) if code else errno.EIO
            raise OSError(number, os.strerror(number) if code else str(exc)) from exc
    return path
