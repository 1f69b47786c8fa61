"""Dataset edits from the app: sanitized uploads that stay inside the folder, atomic caption edits, bulk edits."""

import pytest
from PIL import Image

from lora_studio.dataset_edit import (
    BulkEdit,
    DatasetEditError,
    bulk_edit,
    import_files,
    inside,
    safe_name,
    write_caption,
)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("../../x.png", "x.png"),
        ("..\\..\\windows\\x.PNG", "x.png"),
        ("/etc/passwd", "passwd"),
        (".bashrc", "bashrc"),
        ("my photo (1).JPG", "my_photo__1_.jpg"),
        ("caf\u00e9\u0000.png", "café_.png"),
        ("..", "file"),
        ("a" * 300 + ".png", "a" * 116 + ".png"),
    ],
)
def test_safe_names(sent, expected):
    assert safe_name(sent) == expected


def test_traversal_upload_stays_inside_the_dataset_folder(tmp_path):
    folder, outside = tmp_path / "data", tmp_path / "x.png"
    upload = tmp_path / "upload.bin"
    Image.new("RGB", (8, 8), "red").save(upload, format="PNG")
    report = import_files(folder, [upload], ["../../x.png"])
    assert report.images == ["x.png"] and (folder / "x.png").is_file() and not outside.exists()
    assert inside(folder, "../x.png") == (folder / "x.png").resolve()


def test_import_checks_images_and_keeps_captions(tmp_path):
    folder = tmp_path / "data"
    good, bad, caption, other = (tmp_path / n for n in ("g", "b", "c", "o"))
    Image.new("RGB", (8, 8), "red").save(good, format="PNG")
    bad.write_bytes(b"not an image")
    caption.write_text("a red square")
    other.write_text("#!/bin/sh")
    report = import_files(folder, [good, bad, caption, other], ["one.png", "two.png", "one.txt", "run.sh"])
    assert report.images == ["one.png"] and report.captions == ["one.txt"]
    assert [s.split(":")[0] for s in report.skipped] == ["two.png", "run.sh"]
    assert sorted(p.name for p in folder.iterdir()) == ["one.png", "one.txt"]


def test_caption_edit_is_saved_and_refuses_unknown_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write_caption(tmp_path, "a.png", "  zkz,   a  thing \n")
    assert (tmp_path / "a.txt").read_text() == "zkz, a thing\n"
    with pytest.raises(DatasetEditError, match="is not an image in"):
        write_caption(tmp_path, "missing.png", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.txt"]  # no temp files left behind


def test_bulk_edit_find_replace_prefix_suffix_trigger(tmp_path):
    for name, caption in (("a", "a red square"), ("b", "zkz, a red circle"), ("c", None)):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        if caption is not None:
            (tmp_path / f"{name}.txt").write_text(caption)
    changed = bulk_edit(tmp_path, BulkEdit(find="red", replace="blue", suffix=", flat", trigger_word="zkz"))
    assert changed == ["a.txt", "b.txt", "c.txt"]
    assert (tmp_path / "a.txt").read_text() == "zkz, a blue square, flat\n"
    assert (tmp_path / "b.txt").read_text() == "zkz, a blue circle, flat\n"  # the trigger is not doubled
    assert (tmp_path / "c.txt").read_text() == "zkz, flat\n"  # no empty tags from an empty caption
    assert bulk_edit(tmp_path, BulkEdit(trigger_word="zkz")) == []  # already there: nothing rewritten


def test_a_caption_of_several_lines_keeps_them_through_edits(tmp_path):
    """One caption a line (kohya's enable_wildcard): a save keeps the lines, a bulk edit edits each line."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write_caption(tmp_path, "a.png", "a red star\n\n  zkz,  star, red \n")
    assert (tmp_path / "a.txt").read_text() == "a red star\nzkz, star, red\n"
    assert bulk_edit(tmp_path, BulkEdit(find="red", replace="blue", trigger_word="zkz")) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "zkz, a blue star\nzkz, star, blue\n"


def test_a_caption_over_the_cap_is_refused_before_anything_is_written(tmp_path):
    """The scan refuses captions over 64 KB, so the editor must not write one: a long caption from the page, or a
    bulk edit that makes one caption too long, is one sentence naming the file, and every caption stays as it was."""
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("short\n")
    (tmp_path / "b.txt").write_text("tag, " * 13000 + "\n")  # 65,001 bytes: under the cap until the edit below
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(DatasetEditError, match=r"for a.txt would be 98 KB, over the 64 KB .* Nothing was saved"):
        write_caption(tmp_path, "a.png", "x" * 100_000)
    with pytest.raises(DatasetEditError, match="caption for b.txt would be"):
        bulk_edit(tmp_path, BulkEdit(find="tag", replace="a longer tag", prefix="new, "))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # a.txt too: all are checked first
    write_caption(tmp_path, "a.png", "x" * 60_000)  # under the cap: saved
    assert (tmp_path / "a.txt").stat().st_size == 60_001
