"""Atomic writes: flushed to disk, the right mode, and a full disk leaves the previous file and no temp file."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from PIL import Image

from lora_studio import fsutil
from lora_studio.config import TrainConfig, save_config
from lora_studio.dataset_edit import write_caption
from lora_studio.export import save_kohya
from lora_studio.fsutil import WriteError, atomic_path, write_text_atomic
from lora_studio.lora_file import LoraFile, LoraModule
from lora_studio.sample import save_png
from lora_studio.state import save_state


def test_file_and_folder_are_flushed_around_the_rename(tmp_path, monkeypatch):
    flushed = []
    real = fsutil._fsync
    monkeypatch.setattr(fsutil, "_fsync", lambda path: flushed.append(path) or real(path))
    write_text_atomic(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert len(flushed) == 2 and flushed[0].name.startswith(".a.txt.") and flushed[1] == tmp_path


def test_a_new_file_gets_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "kept.txt"
    target.write_text("old")
    target.chmod(0o640)
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640


def test_an_error_while_writing_leaves_the_previous_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["x.txt"]


def tiny_lora() -> LoraFile:
    return LoraFile({"lora_unet_a": LoraModule(torch.ones(2, 4), torch.ones(4, 2), 2.0)}, {"ss_network_dim": "2"})


WRITERS = {
    "LoRA file": lambda folder: save_kohya(tiny_lora(), folder / "file.safetensors"),
    "training state": lambda folder: save_state({"step": 3, "t": torch.ones(64)}, folder / "file.safetensors"),
    "config": lambda folder: save_config(TrainConfig(), folder / "file.toml"),
    "sample image": lambda folder: save_png(Image.new("RGB", (64, 64), "red"), folder / "file.png", "params"),
    "caption": lambda folder: write_caption(folder, "image.png", "a new caption"),
}
TARGETS = {"LoRA file": "file.safetensors", "training state": "file.safetensors", "config": "file.toml",
           "sample image": "file.png", "caption": "image.txt"}  # fmt: skip


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_leaves_the_previous_file_and_says_so(writer, small_disk):
    folder = small_disk.folder
    Image.new("RGB", (8, 8)).save(folder / "image.png")
    WRITERS[writer](folder)  # the previous version
    target = folder / TARGETS[writer]
    before = target.read_bytes()
    small_disk.fill()
    with pytest.raises(WriteError, match=f"Could not write .*{target.name}: No space left on device; free some disk"):
        WRITERS[writer](folder)
    assert target.read_bytes() == before
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
