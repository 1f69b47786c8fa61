"""Resumable training state in safetensors, never pickle.

Optimizer, scheduler and RNG states are nested dicts, lists and tuples of tensors, numpy arrays
and plain numbers. `save_state` stores every tensor/array in one safetensors file and the
structure around them as JSON in its header; `load_state` rebuilds the exact objects.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .safetensors_io import read_header, save_tensors

STRUCTURE_KEY = "lora_studio.state"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in training state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__float__" in value:
        return float(value["__float__"])
    return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}


def save_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    save_tensors(tensors, path, metadata={STRUCTURE_KEY: json.dumps(structure)})


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    read_header(path)  # a damaged or hostile file is refused in one sentence before safetensors reads it
    with safe_open(str(path), "pt") as f:
        structure = json.loads(f.metadata()[STRUCTURE_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return _decode(structure, tensors)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
