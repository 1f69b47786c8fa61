"""The Dataset tab's handlers, called directly: open, upload (sanitized), caption edit, bulk edit, report."""

from pathlib import Path

import pytest
from PIL import Image

from lora_studio.errors import LoraStudioError
from lora_studio.ui import dataset_tab
from lora_studio.ui.errors import shown


def test_demo_opens_as_an_editable_copy_that_becomes_the_training_dataset(app_state):
    state, folder, gallery, report, tags, train_dataset = dataset_tab.open_dataset(app_state, "demo", "demo-cpu")
    assert state == folder == train_dataset == str(app_state.roots.datasets / "demo")
    assert len(gallery) == 24 and all(label.startswith("zkz, ") for _path, label in gallery)
    assert "**24 images** usable" in report and "0 errors" in report and "0 warnings" in report
    assert tags[0] == ["zkz", 24]


def test_report_uses_the_chosen_presets_dataset_settings(app_state):
    # The demo's 64 px images are fine for the demo preset and too small for an SD1.5 preset's buckets.
    *_, demo_report, _tags, _ = dataset_tab.open_dataset(app_state, "demo", "demo-cpu")
    *_, sd15_report, _tags, _ = dataset_tab.open_dataset(app_state, "demo", "sd15-character")
    assert "0 warnings" in demo_report and "`demo-cpu` preset" in demo_report
    assert "24 warnings" in sd15_report and "smaller than" in sd15_report


def test_upload_caption_edit_and_bulk_edit(app_state, tmp_path):
    uploads = tmp_path / "gradio-uploads" / "x"
    uploads.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), "red").save(uploads / name)
    (uploads / "a.txt").write_text("a red square")
    (uploads / "broken.png").write_bytes(b"nope")
    files = [str(uploads / n) for n in ("a.png", "b.png", "a.txt", "broken.png")]
    uploaded = dataset_tab.upload(app_state, None, "my set", files)
    state, folder, gallery, report, _tags, message, train_dataset = uploaded
    assert state == folder == train_dataset == str(app_state.roots.datasets / "my_set")
    assert [label for _p, label in gallery] == ["a red square", ""]
    assert "Added 2 images and 1 captions" in message and "broken.png: not a readable image" in message
    assert "b.png" in report and "caption" in report  # the missing caption is reported as a warning

    gallery, message = dataset_tab.save_caption(app_state, state, "/tmp/gradio/xyz/b.png", "a red circle")
    assert message == "Saved b.txt." and gallery[1][1] == "a red circle"
    gallery, _report, tags, message = dataset_tab.apply_bulk_edit(app_state, state, "zkz", "", "", "red", "blue")
    assert message == "Changed 2 captions."
    assert [label for _p, label in gallery] == ["zkz, a blue square", "zkz, a blue circle"]
    assert ["zkz", 2] in tags


def test_the_tab_shows_and_edits_the_caption_files_the_train_form_names(app_state):
    """A kohya dataset with `.caption` files (sd-scripts' default extension): with the Train form's
    `dataset.caption_extension` set to it, the gallery, the report, a caption edit and a bulk edit all use those
    files, which training reads; `.txt` files beside them are left alone. A path in its place is refused."""
    folder = app_state.roots.datasets / "kohya"
    folder.mkdir(parents=True)
    for name, caption, colour in (("a", "a red square", "red"), ("b", "a red circle", "blue")):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
        (folder / f"{name}.caption").write_text(caption)
    (folder / "a.txt").write_text("not what trains")
    state, _shown, gallery, report, tags, _ = dataset_tab.open_dataset(app_state, str(folder), "demo-cpu", "caption")
    assert [label for _p, label in gallery] == ["a red square", "a red circle"]
    assert "0 warnings" in report and ["a red square", 1] in tags  # no "no caption" warning: .caption is read
    gallery, message = dataset_tab.save_caption(app_state, state, "b.png", "a blue circle", ".caption")
    assert message == "Saved b.caption." and (folder / "b.caption").read_text() == "a blue circle\n"
    *_view, message = dataset_tab.apply_bulk_edit(app_state, state, "zkz", "", "", "", "", "demo-cpu", ".caption")
    assert message == "Changed 2 captions." and (folder / "a.caption").read_text() == "zkz, a red square\n"
    assert (folder / "a.txt").read_text() == "not what trains" and not (folder / "b.txt").exists()
    _state, _shown, txt_gallery, *_ = dataset_tab.open_dataset(app_state, str(folder), None, ".txt")  # as before
    assert [label for _p, label in txt_gallery] == ["not what trains", ""]
    for bad in ("/../../x", "", "."):
        with pytest.raises(LoraStudioError, match="`dataset.caption_extension`"):
            dataset_tab.save_caption(app_state, state, "a.png", "x", bad or " ")


def test_errors_are_sentences(app_state, tmp_path):
    missing = app_state.roots.datasets / "missing"
    with pytest.raises(LoraStudioError, match="is not a folder"):
        dataset_tab.open_dataset(app_state, str(missing))
    with pytest.raises(LoraStudioError, match="No files were uploaded"):
        dataset_tab.upload(app_state, None, "", [])
    with pytest.raises(LoraStudioError, match="No dataset is open"):
        dataset_tab.save_caption(app_state, None, "a.png", "x")
    import gradio as gr

    with pytest.raises(gr.Error, match="is not a folder"):
        shown(dataset_tab.open_dataset, app_state)(str(missing))


def test_folders_outside_the_roots_are_refused(app_state, tmp_path):
    """Opening, and every handler that takes the open folder, resolve it inside the app's folders."""
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (64, 64)).save(outside / "x.png")
    link = app_state.roots.datasets / "link"
    app_state.roots.datasets.mkdir(parents=True)
    link.symlink_to(outside)
    for source in (str(outside), "../outside", str(link), "link", "datasets/../../outside"):
        with pytest.raises(LoraStudioError, match="outside the app's folders"):
            dataset_tab.open_dataset(app_state, source)
    with pytest.raises(LoraStudioError, match="outside the app's folders"):
        dataset_tab.apply_bulk_edit(app_state, str(outside), "zkz", "", "", "", "")
    assert not (outside / "x.txt").exists()


def test_a_dataset_s_plain_name_opens_it_in_the_datasets_folder(app_state):
    """Typing the name an upload gave a new dataset opens datasets/<name> (it resolved against the home, and was
    refused as outside the app's folders); other text is read as a folder as before."""
    folder = app_state.roots.datasets / "mine"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    state, *_rest = dataset_tab.open_dataset(app_state, "mine", "demo-cpu")
    assert state == str(folder)
    assert dataset_tab.open_dataset(app_state, "datasets/mine", "demo-cpu")[0] == str(folder)
    for source in ("not-there", ".."):
        with pytest.raises(LoraStudioError):
            dataset_tab.open_dataset(app_state, source, "demo-cpu")


def test_uploads_only_from_gradios_upload_folder_and_under_the_cap(app_state, tmp_path):
    elsewhere = tmp_path / "secret.png"
    Image.new("RGB", (64, 64)).save(elsewhere)
    with pytest.raises(LoraStudioError, match="secret.png is not an upload"):
        dataset_tab.upload(app_state, None, "x", [str(elsewhere)])
    big = tmp_path / "gradio-uploads" / "big.png"
    big.write_bytes(b"\0" * (app_state.max_upload_mb * 1024 * 1024 + 1))
    with pytest.raises(LoraStudioError, match="over the 50 MB an upload may have"):
        dataset_tab.upload(app_state, None, "x", [str(big)])


def test_a_caption_over_64_kb_or_linked_out_of_the_folder_is_refused_with_its_name(app_state, tmp_path):
    dataset_tab.open_dataset(app_state, "demo")
    folder = app_state.roots.datasets / "demo"
    first, second = sorted(folder.glob("*.png"))[:2]
    first.with_suffix(".txt").write_text("tag, " * 20000)
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    second.with_suffix(".txt").unlink()
    second.with_suffix(".txt").symlink_to(secret)
    _state, _folder, gallery, report, _tags, _ = dataset_tab.open_dataset(app_state, "demo")
    assert f"`{first.name}`: {first.with_suffix('.txt').name} is 98 KB, over the 64 KB" in report
    assert f"`{second.name}`: {second.with_suffix('.txt').name} is a link to a file outside" in report
    assert all("the secret" not in label for _p, label in gallery)


def test_a_mask_is_painted_shown_and_removed_from_the_tab(app_state):
    import numpy as np

    folder, *_ = dataset_tab.open_dataset(app_state, "demo")
    image = sorted(p for p in Path(folder).glob("*.png"))[0]
    picture, editor = dataset_tab.show_mask(app_state, folder, str(image))
    assert picture.size == (64, 64) and editor["layers"] == [] and editor["background"] is picture
    with pytest.raises(LoraStudioError, match="Nothing is painted"):
        dataset_tab.save_mask(app_state, folder, str(image), editor)
    stroke = np.zeros((64, 64, 4), dtype=np.uint8)
    stroke[:, 32:, 3] = 255
    shown_now, _editor, message = dataset_tab.save_mask(app_state, folder, str(image), {**editor, "layers": [stroke]})
    mask = image.with_name(image.stem + ".mask.png")
    assert message.startswith(f"Saved {mask.name}") and mask.is_file()
    assert shown_now.getpixel((48, 32)) != picture.getpixel((48, 32))  # the ignored half is tinted now
    assert len(dataset_tab.gallery_items(Path(folder))) == 24  # the mask is not an image
    assert dataset_tab.remove_mask(app_state, folder, str(image))[2].startswith("Removed") and not mask.exists()
    with pytest.raises(LoraStudioError, match="not an image"):
        dataset_tab.save_mask(app_state, folder, "/etc/passwd", {**editor, "layers": [stroke]})


def test_large_photos_show_as_small_copies_that_still_name_their_image(app_state, monkeypatch):
    """A 12-48 MP photo is shown through a copy at most THUMBNAIL_SIDE a side (the browser decoded each in full),
    made once per version of the file, under the runs folder's cache; the copy has the photo's name, so a pick in the
    gallery edits the photo's caption and mask. Small images are shown as they are."""
    import os
    import time

    from lora_studio import data
    from lora_studio.dataset_edit import THUMBNAIL_SIDE
    from lora_studio.runs import thumbnail_folder

    monkeypatch.setattr(data, "SETTLED_NS", 0)  # the photos count as written long ago: a copy is made once

    folder = app_state.roots.datasets / "photos"
    folder.mkdir(parents=True)
    photo = folder / "beach.jpg"
    Image.new("RGB", (2000, 1200), (20, 120, 220)).save(photo)
    Image.new("RGBA", (1000, 900), (250, 10, 10, 128)).save(folder / "logo.png")
    Image.new("RGB", (640, 480), (10, 200, 10)).save(folder / "small.webp")
    def pictures() -> dict[str, Path]:
        return {Path(path).name: Path(path) for path, _label in dataset_tab.gallery_items(folder)}

    shown = pictures()
    assert shown["small.webp"] == folder / "small.webp"
    for name in ("beach.jpg", "logo.png"):
        copy = shown[name]
        assert copy.is_relative_to(thumbnail_folder()) and copy.name == name
        with Image.open(copy) as small, Image.open(folder / name) as big:
            assert max(small.size) == THUMBNAIL_SIDE and small.format == big.format
            assert abs(small.width / small.height - big.width / big.height) < 0.01
            assert small.convert("RGB").getpixel((5, 5)) == pytest.approx(big.convert("RGB").getpixel((5, 5)), abs=3)
    made = shown["beach.jpg"].stat().st_mtime_ns
    assert pictures()["beach.jpg"] == shown["beach.jpg"]
    assert shown["beach.jpg"].stat().st_mtime_ns == made  # made once

    _gallery, message = dataset_tab.save_caption(app_state, str(folder), str(shown["beach.jpg"]), "a beach at noon")
    assert (folder / "beach.txt").read_text().strip() == "a beach at noon" and "beach.txt" in message
    assert not (thumbnail_folder() / "beach.txt").exists() and not list(thumbnail_folder().rglob("*.txt"))

    time.sleep(0.05)
    Image.new("RGB", (1200, 2000), (200, 200, 20)).save(photo)  # the photo replaced: a copy of the new one
    os.utime(photo)
    again = pictures()["beach.jpg"]
    assert again != shown["beach.jpg"] and Image.open(again).size == (THUMBNAIL_SIDE * 1200 // 2000, THUMBNAIL_SIDE)


def test_the_gallery_s_old_copies_are_let_go(app_state, monkeypatch):
    """The copies' cache does not grow with every photo ever shown: a copy made over THUMBNAIL_DAYS ago goes (with its
    folder), at the next gallery after an hour; recent copies and anything else in the folder stay."""
    import os
    import time

    from lora_studio import dataset_edit
    from lora_studio.runs import thumbnail_folder

    old, recent = thumbnail_folder() / "a" / "old.jpg", thumbnail_folder() / "b" / "recent.jpg"
    for copy in (old, recent):
        copy.parent.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(copy)
    stray = thumbnail_folder() / "notes.txt"
    stray.write_text("not a copy")
    long_ago = time.time() - (dataset_edit.THUMBNAIL_DAYS + 1) * 86400
    os.utime(old, (long_ago, long_ago))
    folder = app_state.roots.datasets / "small"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "x.png")

    monkeypatch.setattr(dataset_edit, "_pruned_at", time.monotonic())  # pruned a moment ago: not yet again
    dataset_tab.gallery_items(folder)
    assert old.exists()
    monkeypatch.setattr(dataset_edit, "_pruned_at", time.monotonic() - dataset_edit.PRUNE_EVERY_S - 1)
    dataset_tab.gallery_items(folder)
    assert not old.parent.exists() and recent.exists() and stray.read_text() == "not a copy"
