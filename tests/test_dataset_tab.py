"""The Dataset tab's handlers, called directly: open, upload (sanitized), caption edit, bulk edit, report."""

import pytest
from PIL import Image

from lora_studio.errors import LoraStudioError
from lora_studio.ui import dataset_tab
from lora_studio.ui.errors import shown


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_tab, "DATASETS_DIR", tmp_path / "datasets")
    return tmp_path


def test_demo_opens_as_an_editable_copy_that_becomes_the_training_dataset(home):
    folder, gallery, report, tags, train_dataset = dataset_tab.open_dataset("demo", "demo-cpu")
    assert folder == train_dataset == str(home / "datasets" / "demo")
    assert len(gallery) == 24 and all(label.startswith("zkz, ") for _path, label in gallery)
    assert "**24 images** usable" in report and "0 errors" in report and "0 warnings" in report
    assert tags[0] == ["zkz", 24]


def test_report_uses_the_chosen_presets_dataset_settings(home):
    # The demo's 64 px images are fine for the demo preset and too small for an SD1.5 preset's buckets.
    _folder, _gallery, demo_report, _tags, _ = dataset_tab.open_dataset("demo", "demo-cpu")
    _folder, _gallery, sd15_report, _tags, _ = dataset_tab.open_dataset("demo", "sd15-character")
    assert "0 warnings" in demo_report and "`demo-cpu` preset" in demo_report
    assert "24 warnings" in sd15_report and "smaller than" in sd15_report


def test_upload_caption_edit_and_bulk_edit(home, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), "red").save(uploads / name)
    (uploads / "a.txt").write_text("a red square")
    (uploads / "broken.png").write_bytes(b"nope")
    files = [str(uploads / n) for n in ("a.png", "b.png", "a.txt", "broken.png")]
    folder, gallery, report, _tags, message, train_dataset = dataset_tab.upload("", "my set", files)
    assert folder == train_dataset == str(home / "datasets" / "my_set")
    assert [label for _p, label in gallery] == ["a red square", ""]
    assert "Added 2 images and 1 captions" in message and "broken.png: not a readable image" in message
    assert "b.png" in report and "caption" in report  # the missing caption is reported as a warning

    gallery, message = dataset_tab.save_caption(folder, "/tmp/gradio/xyz/b.png", "a red circle")
    assert message == "Saved b.txt." and gallery[1][1] == "a red circle"
    gallery, _report, tags, message = dataset_tab.apply_bulk_edit(folder, "zkz", "", "", "red", "blue")
    assert message == "Changed 2 captions."
    assert [label for _p, label in gallery] == ["zkz, a blue square", "zkz, a blue circle"]
    assert ["zkz", 2] in tags


def test_errors_are_sentences(home, tmp_path):
    with pytest.raises(LoraStudioError, match="is not a folder"):
        dataset_tab.open_dataset(str(tmp_path / "missing"))
    with pytest.raises(LoraStudioError, match="No files were uploaded"):
        dataset_tab.upload(str(tmp_path), "", [])
    import gradio as gr

    with pytest.raises(gr.Error, match="is not a folder"):
        shown(dataset_tab.open_dataset)(str(tmp_path / "missing"))
