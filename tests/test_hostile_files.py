"""Hostile and damaged safetensors files: every reader turns them into one LoraStudioError sentence.

The same bytes go through the shared header reader, the LoRA reader (`load_lora`, which `inspect`,
`export`, `resize` and the Preview tab use), the base-model reader (`describe_source`, which the
models folder listing uses) and the resumable-state reader. None may raise anything but a
LoraStudioError naming the file.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_studio.catalogue import describe_source
from lora_studio.errors import LoraStudioError
from lora_studio.lora_inspect import inspect_lora
from lora_studio.lora_read import load_lora
from lora_studio.safetensors_io import SafetensorsFileError, read_header
from lora_studio.state import load_state

GOOD = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def with_header(header, data: bytes = b"\0" * 64, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def deep(depth: int) -> bytes:
    return b'{"x": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE = {
    "empty file": b"",
    "shorter than its length field": b"\x01\x02",
    "header length past the end": with_header({"a": GOOD}, length=10**6),
    "header length over 100 MB": struct.pack("<Q", 200 * 1024 * 1024) + b"{}",
    "header not JSON": with_header(b"{not json at all"),
    "header a JSON list": with_header(b"[1, 2, 3]"),
    "header not UTF-8": with_header(b'{"\xff\xfe": 1}'),
    "100k-deep JSON": with_header(deep(100_000)),
    "string offsets": with_header({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]}}),
    "negative offsets": with_header({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}}),
    "float offsets": with_header({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0.0, 16.0]}}),
    "boolean offsets": with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, True]}}),
    "one offset": with_header({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16]}}),
    "offsets that overflow 64 bits": with_header(
        {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [2**70, 2**70 + 16]}}
    ),
    "end before start": with_header({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}),
    "range does not match the shape": with_header({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}),
    "overlapping ranges": with_header({"a": GOOD, "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}),
    "giant shape": with_header({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}),
    "negative shape": with_header({"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}),
    "string shape": with_header({"a": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}),
    "unknown dtype": with_header({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}),
    "tensor entry not an object": with_header({"a": [1, 2, 3]}),
    "non-string metadata": with_header({"__metadata__": {"ss_network_dim": 16}, "a": GOOD}),
    "metadata a list": with_header({"__metadata__": ["x"], "a": GOOD}),
    "truncated data": with_header({"a": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}}),
}


@pytest.fixture
def hostile(tmp_path, request):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(HOSTILE[request.param])
    return path


@pytest.mark.parametrize("hostile", sorted(HOSTILE), indirect=True)
def test_every_hostile_header_is_one_sentence_from_every_reader(hostile):
    with pytest.raises(SafetensorsFileError) as raised:
        read_header(hostile)
    assert str(hostile) in str(raised.value) and "Traceback" not in str(raised.value)
    for reader in (load_lora, inspect_lora, describe_source, load_state):
        with pytest.raises(LoraStudioError, match="hostile.safetensors"):
            reader(hostile)


def test_the_table_covers_what_the_issue_lists():
    assert len(HOSTILE) >= 15


def test_a_good_file_reads_with_its_shapes_and_metadata(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(path), metadata={"k": "v"})
    header = read_header(path)
    assert header.shapes == {"a": (2, 3), "b": (4,)} and header.metadata == {"k": "v"}
    assert header.data_start == 8 + int.from_bytes(path.read_bytes()[:8], "little")


def lora_with(tmp_path, tensors: dict, metadata: dict | None = None):
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_vector_alpha_is_refused_in_one_sentence(tmp_path):
    path = lora_with(
        tmp_path,
        {
            "lora_unet_a.lora_down.weight": torch.ones(2, 4),
            "lora_unet_a.lora_up.weight": torch.ones(4, 2),
            "lora_unet_a.alpha": torch.ones(4),
        },
    )
    with pytest.raises(LoraStudioError, match="alpha of module lora_unet_a holds 4 values"):
        load_lora(path)


def test_up_and_down_that_do_not_multiply_are_refused_in_one_sentence(tmp_path):
    path = lora_with(
        tmp_path, {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(4, 3)}
    )
    with pytest.raises(LoraStudioError, match="lora.safetensors"):
        inspect_lora(path)


def test_a_damaged_adapter_config_in_the_header_is_one_sentence(tmp_path):
    path = lora_with(
        tmp_path,
        {"unet.a.lora_A.weight": torch.ones(2, 4), "unet.a.lora_B.weight": torch.ones(4, 2)},
        metadata={"lora_adapter_metadata": "{not json"},
    )
    with pytest.raises(LoraStudioError, match="lora.safetensors"):
        load_lora(path)
