"""Scanning and validation on files the test makes: every format, every bad case, both layouts."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from lora_studio.config import DatasetConfig, TrainConfig, validate_config
from lora_studio.data import Item, build_caption, dataset_report, load_image, scan


def save(path, size=(300, 200), color=(200, 30, 30), mode="RGB", **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def scan_folder(folder, **settings):
    return scan(DatasetConfig(path=str(folder), min_bucket_reso=64, **settings))


def problems_for(report, name):
    return [p for p in report.problems if p.path.endswith(name)]


def test_every_format_is_read(tmp_path):
    for n, suffix in enumerate(("jpg", "jpeg", "png", "webp", "bmp")):
        save(tmp_path / f"img_{suffix}.{suffix}", color=(200, 30, 10 * n))
        (tmp_path / f"img_{suffix}.txt").write_text(f"a red {suffix}")
    report = scan_folder(tmp_path)
    assert report.errors == [] and report.warnings == []
    assert len(report.items) == 5
    assert {i.caption for i in report.items} == {f"a red {s}" for s in ("jpg", "jpeg", "png", "webp", "bmp")}


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (120, 60), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 60, 60))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    item = scan_folder(tmp_path).items[0]
    assert (item.width, item.height) == (60, 120)
    loaded = load_image(path)
    assert loaded.size == (60, 120)
    top = np.asarray(loaded)[5, 30]
    assert top[2] > 200 and top[0] < 60, "the blue half is on top once rotated 90 degrees clockwise"


def test_rgba_is_composited_on_the_background_colour(tmp_path):
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 50, 100))
    save_path = tmp_path / "alpha.png"
    image.save(save_path)
    loaded = np.asarray(load_image(save_path, background="#00ff00"))
    assert loaded.shape == (100, 100, 3)
    assert tuple(loaded[50, 10]) == (255, 0, 0) and tuple(loaded[50, 90]) == (0, 255, 0)


def test_grayscale_palette_and_16_bit(tmp_path):
    save(tmp_path / "gray.png", mode="L", color=128)
    save(tmp_path / "palette.png", mode="P", color=3)
    sixteen = Image.fromarray(np.full((80, 80), 65535 // 2, dtype=np.uint16))
    sixteen.save(tmp_path / "deep.png")
    report = scan_folder(tmp_path)
    assert report.errors == [] and len(report.items) == 3
    assert tuple(np.asarray(load_image(tmp_path / "gray.png"))[0, 0]) == (128, 128, 128)
    assert load_image(tmp_path / "palette.png").mode == "RGB"
    deep = np.asarray(load_image(tmp_path / "deep.png"))
    assert deep.shape == (80, 80, 3) and abs(int(deep[0, 0, 0]) - 128) <= 1, "16-bit is scaled, not clipped"


def corrupt_png_crc(path):
    data = bytearray(path.read_bytes())
    ihdr_crc = 8 + 8 + 13  # signature, IHDR length+type, IHDR data
    data[ihdr_crc] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bad_files_are_errors_with_reasons(tmp_path, monkeypatch):
    good = save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is a text file, not an image")
    full = save(tmp_path / "whole.jpg", size=(256, 256)).read_bytes()
    (tmp_path / "whole.jpg").unlink()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    save(tmp_path / "badcrc.png")
    corrupt_png_crc(tmp_path / "badcrc.png")
    save(tmp_path / "bomb.png", size=(400, 400))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300)

    report = scan_folder(tmp_path)

    assert [i.path for i in report.items] == [good]
    reasons = {
        name: problems_for(report, name)
        for name in ("empty.png", "notes.png", "truncated.jpg", "badcrc.png", "bomb.png")
    }
    for name, found in reasons.items():
        assert found and found[0].severity == "error", name
    assert "empty (0 bytes)" in reasons["empty.png"][0].message
    assert "not a readable image" in reasons["notes.png"][0].message
    assert "damaged" in reasons["truncated.jpg"][0].message
    assert "damaged" in reasons["badcrc.png"][0].message
    assert "decompression-bomb limit of 90,000 pixels" in reasons["bomb.png"][0].message


def test_empty_folder_is_an_error(tmp_path):
    report = scan_folder(tmp_path)
    assert report.items == [] and "no usable images" in report.errors[0].message


def test_missing_folder_is_an_error(tmp_path):
    report = scan_folder(tmp_path / "nowhere")
    assert report.errors[0].message == f"the folder {tmp_path / 'nowhere'} does not exist; set dataset.path to your " \
        "images' folder"
    (tmp_path / "file").write_text("x")
    report = scan(DatasetConfig(path=str(tmp_path / "file")), setting="regularization.path")
    assert report.errors[0].message == f"the folder {tmp_path / 'file'} is a file, not a folder; set " \
        "regularization.path to your images' folder"


def test_warnings_do_not_stop_the_run(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "copy.png")  # same pixels and encoder: byte-identical
    save(tmp_path / "tiny.png", size=(40, 30), color=(1, 2, 3))
    (tmp_path / "tiny.txt").write_text("   ")
    (tmp_path / "a.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    report = scan_folder(tmp_path, trigger_word="zkz")
    assert report.errors == [] and len(report.items) == 3
    assert "exact duplicate of a.png" in " ".join(p.message for p in problems_for(report, "copy.png"))
    assert "40x30 is smaller than the minimum bucket side 64" in " ".join(
        p.message for p in problems_for(report, "tiny.png")
    )
    assert "caption file is empty" in " ".join(p.message for p in problems_for(report, "tiny.png"))
    assert "not UTF-8" in " ".join(p.message for p in problems_for(report, "a.png"))
    assert [i for i in report.items if i.path.name == "a.png"][0].caption == "café au lait"


def test_no_upscale_skips_small_images(tmp_path):
    save(tmp_path / "big.png")
    save(tmp_path / "tiny.png", size=(40, 30))
    report = scan_folder(tmp_path, bucket_no_upscale=True)
    assert [i.path.name for i in report.items] == ["big.png"]
    assert "skipped" in problems_for(report, "tiny.png")[0].message


def test_missing_caption_falls_back(tmp_path):
    save(tmp_path / "a.png")
    report = scan_folder(tmp_path, trigger_word="zkz")
    assert "no .txt caption; 'zkz' is used" in report.warnings[0].message  # not the plain folder's name
    assert "'" + tmp_path.name + "' is used" in scan_folder(tmp_path).warnings[0].message  # without a trigger: it is
    # a kohya folder's class tokens are the caption, with the trigger word before them unless they hold it
    save(tmp_path / "kohya" / "3_sks dog" / "b.png")
    assert "'zkz, sks dog' is used" in scan_folder(tmp_path / "kohya", trigger_word="zkz").warnings[0].message
    assert "'sks dog' is used" in scan_folder(tmp_path / "kohya", trigger_word="sks").warnings[0].message


def test_without_buckets_only_images_below_the_training_resolution_are_said_to_be_upscaled(tmp_path):
    save(tmp_path / "a.png", size=(64, 64))
    save(tmp_path / "b.png", size=(64, 48), color=(1, 2, 3))
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("a shape")
    settings = {"enable_bucket": False, "resolution": 64, "min_bucket_reso": 256}  # the demo's size, buckets off
    report = scan(DatasetConfig(path=str(tmp_path), **settings))
    assert problems_for(report, "a.png") == [] and len(report.items) == 2
    assert ["64x48 is smaller than the training resolution 64; it will be upscaled, so it may look soft"] == [
        p.message for p in problems_for(report, "b.png")]  # fmt: skip
    with_buckets = scan(DatasetConfig(path=str(tmp_path), min_bucket_reso=256))
    assert "smaller than the minimum bucket side 256" in problems_for(with_buckets, "a.png")[0].message


def test_kohya_layout_counts_repeats(tmp_path):
    for i in range(3):
        save(tmp_path / "10_zkz dog" / f"{i}.png", color=(i, 0, 0))
    save(tmp_path / "2_style" / "s.png", color=(9, 9, 9))
    save(tmp_path / "notes" / "x.png", color=(8, 8, 8))
    report = scan_folder(tmp_path)
    assert report.layout == "kohya" and len(report.items) == 4
    assert report.images_per_epoch == 3 * 10 + 2
    assert {i.concept: i.repeats for i in report.items} == {"zkz dog": 10, "style": 2}
    assert any("not a kohya N_name folder" in p.message for p in report.warnings)
    # The LoRA file's metadata keys the folders by their names, as kohya does.
    assert {report.folder_name(i) for i in report.items} == {"10_zkz dog", "2_style"}
    assert set(report.tag_frequency()) == {"10_zkz dog", "2_style"}


def test_a_kohya_count_out_of_range_is_an_error_naming_the_folder(tmp_path):
    """A folder `0_x` trains nothing and `99999999999_x` would list 10^11 entries an epoch (memory runs out at the
    start): both are errors naming the folder, and only the folders in range are read."""
    save(tmp_path / "3_zkz" / "a.png", color=(1, 0, 0))
    save(tmp_path / "0_empty" / "b.png", color=(2, 0, 0))
    save(tmp_path / "99999999999_huge" / "c.png", color=(3, 0, 0))
    report = scan_folder(tmp_path)
    assert [(i.concept, i.repeats) for i in report.items] == [("zkz", 3)] and report.images_per_epoch == 3
    errors = {p.path.rpartition("/")[2]: p.message for p in report.errors}
    assert errors == {"0_empty": "0 repeats: a kohya folder's count must be 1 to 10000; rename the folder",
                      "99999999999_huge": "99999999999 repeats: a kohya folder's count must be 1 to 10000; rename "
                      "the folder"}  # fmt: skip


def test_pointing_at_the_kohya_concept_folder_explains_the_fix(tmp_path):
    save(tmp_path / "10_zkz" / "a.png")
    report = scan_folder(tmp_path / "10_zkz")
    message = report.errors[0].message
    assert "kohya concept folder (10 repeats of 'zkz')" in message and str(tmp_path) in message


def test_pointing_above_the_kohya_parent_explains_the_fix(tmp_path):
    save(tmp_path / "project" / "10_zkz" / "a.png")
    report = scan_folder(tmp_path)
    assert "set dataset.path to" in report.errors[0].message and "project" in report.errors[0].message


def item(caption="red, star, white background", concept="shapes"):
    return Item(path=None, caption=caption, concept=concept, repeats=1, width=64, height=64, content_hash="x")


def test_caption_trigger_prefix_suffix():
    config = DatasetConfig(trigger_word="zkz", caption_prefix="photo", caption_suffix="high quality")
    assert build_caption(item(), config, random.Random(0)) == "zkz, photo, red, star, white background, high quality"
    assert build_caption(item("zkz, red"), DatasetConfig(trigger_word="zkz"), random.Random(0)) == "zkz, red"


def test_shuffle_keeps_the_first_tokens_and_the_trigger():
    config = DatasetConfig(trigger_word="zkz", shuffle_caption=True, keep_tokens=1)
    captions = {build_caption(item("red, star, on, white, background"), config, random.Random(s)) for s in range(20)}
    assert len(captions) > 5
    assert all(c.startswith("zkz, red, ") for c in captions)
    assert all(sorted(c.split(", ")) == sorted("zkz, red, star, on, white, background".split(", ")) for c in captions)


def test_keep_tokens_separator_keeps_a_head_and_a_tail_and_never_reaches_the_text_encoder():
    """kohya's keep_tokens_separator: tags before it stay first, tags after a second one stay last, only those
    between shuffle and drop; the separator itself is never in the caption (kohya leaves it in when nothing
    shuffles, which the text encoder would read as three tokens)."""
    text = "sks girl, solo ||| red hair, smile, outdoors, tree, sky ||| masterpiece"
    config = DatasetConfig(trigger_word="zkz", keep_tokens_separator="|||", shuffle_caption=True, keep_tokens=3)
    captions = {build_caption(item(text), config, random.Random(s)) for s in range(30)}
    assert len(captions) > 5
    assert all(c.startswith("zkz, sks girl, solo, ") and c.endswith(", masterpiece") for c in captions)
    assert all("|" not in c for c in captions)
    plain = config.model_copy(update={"shuffle_caption": False})
    assert build_caption(item(text), plain, random.Random(0)) == ("zkz, sks girl, solo, red hair, smile, outdoors, "
                                                                  "tree, sky, masterpiece")  # fmt: skip
    dropped = config.model_copy(update={"caption_tag_dropout_rate": 1.0})
    assert build_caption(item(text), dropped, random.Random(0)) == "zkz, sks girl, solo, masterpiece"
    # a caption without the separator: keep_tokens decides (here 3 tags stay first)
    kept = build_caption(item("a, b, c, d, e"), config.model_copy(update={"trigger_word": ""}), random.Random(1))
    assert kept.startswith("a, b, c, ")
    # secondary_separator: tags joined by it move and drop as one, then read as separate tags
    joined = DatasetConfig(secondary_separator=";;;", shuffle_caption=True)
    for seed in range(20):
        caption = build_caption(item("long hair;;;blue hair, smile, sky, tree"), joined, random.Random(seed))
        assert "long hair, blue hair" in caption and ";" not in caption
    assert DatasetConfig(keep_tokens_separator="|||").captions_are_static  # it adds no randomness by itself
    for bad in (",", " ", "a b", "x" * 17):
        with pytest.raises(ValidationError, match="cannot separate tags"):
            DatasetConfig(keep_tokens_separator=bad)
    kohya = validate_config({"train_data_dir": "x", "keep_tokens_separator": "|||", "secondary_separator": ";;;"})
    assert (kohya.dataset.keep_tokens_separator, kohya.dataset.secondary_separator) == ("|||", ";;;")


def test_wildcards_pick_a_line_and_an_option_per_step_and_only_when_enabled(tmp_path):
    """kohya's enable_wildcard: a caption file of several lines is one caption a line, {a|b} one option of each
    (drawn from the step's generator: the same draws, the same caption); {{ }} are literal braces. Off: the lines
    are joined as before and braces are text."""
    from lora_studio.data import first_caption

    save(tmp_path / "a.png", color=(9, 9, 9))
    (tmp_path / "a.txt").write_text("a {red|blue|green} star\n\nzkz, tags, {{braces}}\n")
    wild = DatasetConfig(path=str(tmp_path), enable_wildcard=True)
    (picked,) = scan(wild).items
    assert picked.caption == "a {red|blue|green} star\nzkz, tags, {{braces}}"
    captions = [build_caption(picked, wild, random.Random(seed)) for seed in range(40)]
    assert set(captions) == {"a red star", "a blue star", "a green star", "zkz, tags, {braces}"}
    assert captions == [build_caption(picked, wild, random.Random(seed)) for seed in range(40)]  # resume: the same
    assert first_caption(picked, wild) == "a red star"  # a prompt's: the first line and options
    assert not wild.captions_are_static
    assert scan(wild).tag_frequency() == {tmp_path.name: {"a {red|blue|green} star": 1, "zkz": 1, "tags": 1,
                                                          "{{braces}}": 1}}  # fmt: skip
    plain = wild.model_copy(update={"enable_wildcard": False})
    (joined,) = scan(plain).items
    assert joined.caption == "a {red|blue|green} star zkz, tags, {{braces}}"  # one caption, as before
    assert build_caption(joined, plain, random.Random(0)) == joined.caption
    assert first_caption(joined, plain) == joined.caption
    kohya = validate_config({"train_data_dir": "x", "enable_wildcard": True})
    assert kohya.dataset.enable_wildcard


def test_dropouts():
    always = DatasetConfig(trigger_word="zkz", caption_dropout_rate=1.0)
    assert build_caption(item(), always, random.Random(0)) == ""
    tags = DatasetConfig(trigger_word="zkz", caption_tag_dropout_rate=1.0)
    assert build_caption(item(), tags, random.Random(0)) == "zkz"
    assert not tags.captions_are_static and DatasetConfig().captions_are_static


def test_concept_name_used_without_caption_or_trigger():
    assert build_caption(item(caption="", concept="sks dog"), DatasetConfig(), random.Random(0)) == "sks dog"


def test_tag_frequency_per_folder(tmp_path):
    save(tmp_path / "3_a" / "1.png", color=(1, 1, 1))
    (tmp_path / "3_a" / "1.txt").write_text("red, star")
    save(tmp_path / "3_a" / "2.png", color=(2, 2, 2))
    (tmp_path / "3_a" / "2.txt").write_text("Red, circle")
    # kohya's ss_tag_frequency: keyed by the folder's name, tags lower-cased
    assert scan_folder(tmp_path).tag_frequency() == {"3_a": {"red": 2, "star": 1, "circle": 1}}


def test_dataset_report_counts_steps_and_buckets(tmp_path):
    for i in range(5):
        save(tmp_path / f"wide{i}.png", size=(600, 300), color=(i, 0, 0))
    for i in range(3):
        save(tmp_path / f"tall{i}.png", size=(300, 600), color=(0, i, 0))
    config = TrainConfig(
        dataset={
            "path": str(tmp_path),
            "batch_size": 2,
            "repeats": 2,
            "resolution": 256,
            "min_bucket_reso": 128,
            "max_bucket_reso": 512,
        },
        optimizer={"max_train_epochs": 3},
    )
    report = dataset_report(config)
    assert report["items"] == 8 and report["images_per_epoch"] == 16
    assert [(b["width"] > b["height"], b["count"]) for b in report["buckets"]] in (
        [(False, 3), (True, 5)],
        [(True, 5), (False, 3)],
    )
    assert report["steps_per_epoch"] == report["batches_per_epoch"] == 5 + 3  # ceil(10/2) + ceil(6/2)
    assert report["total_steps"] == 24
    assert report["errors"] == [] and isinstance(report["warnings"], list)

    accumulated = dataset_report(config.model_copy(update={"optimizer": config.optimizer.model_copy(
        update={"gradient_accumulation_steps": 3})}))  # fmt: skip
    assert accumulated["batches_per_epoch"] == 8 and accumulated["steps_per_epoch"] == 2.67  # 3 batches a step
    assert accumulated["total_steps"] == 8  # 24 batches over the 3 epochs


def test_step_samples_are_reproducible_and_carry_sdxl_conditioning(tmp_path):
    from lora_studio.buckets import Bucket
    from lora_studio.data import make_step_sample

    image = Image.new("RGB", (300, 200), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 200))  # left third blue
    image.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red, blue, flag")
    config = DatasetConfig(
        path=str(tmp_path),
        min_bucket_reso=64,
        random_crop=True,
        flip_aug=True,
        shuffle_caption=True,
        trigger_word="zkz",
    )
    item = scan(config).items[0]
    bucket = Bucket(192, 128)
    first = make_step_sample(item, bucket, config, random.Random(5))
    again = make_step_sample(item, bucket, config, random.Random(5))
    assert torch.equal(first.pixels, again.pixels) and first.caption == again.caption and first.crop == again.crop
    assert first.pixels.shape == (3, 128, 192) and -1.0 <= first.pixels.min() and first.pixels.max() <= 1.0
    assert first.crop.original_size == (200, 300) and first.crop.target_size == (128, 192)
    samples = [make_step_sample(item, bucket, config, random.Random(s)) for s in range(12)]
    assert {s.flip for s in samples} == {True, False}
    for s in samples:
        left_is_blue = s.pixels[2, 64, 5] > 0.5
        assert left_is_blue != s.flip, "a flipped sample has the blue third on the right"


def counting_decodes(monkeypatch) -> list:
    """What data.open_image decodes from now on, one entry a call (the real function still runs)."""
    from lora_studio import data

    decoded, real = [], data.open_image

    def counted(source):
        decoded.append(source)
        return real(source)

    monkeypatch.setattr(data, "open_image", counted)
    return decoded


def test_a_scan_again_reads_only_the_images_that_changed(tmp_path, monkeypatch):
    """Every Dataset tab select and Train tab estimate scans the folder; an unchanged image is not read and decoded
    again (100 photos of 12 MP took ~10 s each time). A rewrite of the same size (a BMP), a damaged replacement
    and a new file are each read."""
    import time

    from lora_studio import data

    monkeypatch.setattr(data, "SETTLED_NS", 0)  # every file counts as settled at once
    for name, color in (("a.png", (200, 30, 30)), ("b.bmp", (30, 200, 30)), ("c.jpg", (30, 30, 200))):
        save(tmp_path / name, color=color)
    decoded = counting_decodes(monkeypatch)
    first = scan_folder(tmp_path)
    assert len(first.items) == 3 and len(decoded) == 3
    again = scan_folder(tmp_path)
    assert len(decoded) == 3 and [(i.path, i.width, i.height, i.content_hash) for i in again.items] == [
        (i.path, i.width, i.height, i.content_hash) for i in first.items]

    time.sleep(0.05)  # past the kernel's timestamp tick
    size = (tmp_path / "b.bmp").stat().st_size
    save(tmp_path / "b.bmp", color=(250, 250, 250))  # in place, the same byte size
    assert (tmp_path / "b.bmp").stat().st_size == size
    (tmp_path / "c.jpg").write_bytes((tmp_path / "c.jpg").read_bytes()[:200])
    save(tmp_path / "d.png", size=(256, 320))
    third = scan_folder(tmp_path)
    assert len(decoded) == 6  # b, c and d: a is remembered
    hashes = {i.path.name: i.content_hash for i in third.items}
    assert set(hashes) == {"a.png", "b.bmp", "d.png"}
    assert hashes["b.bmp"] != {i.path.name: i.content_hash for i in first.items}["b.bmp"]
    assert "damaged" in problems_for(third, "c.jpg")[0].message


def test_an_image_written_a_moment_ago_is_read_at_each_scan(tmp_path, monkeypatch):
    """Within a timestamp tick a rewrite of the same size keeps the file's times, so a fresh file is not remembered
    until it has settled (data.SETTLED_NS)."""
    save(tmp_path / "fresh.png")
    decoded = counting_decodes(monkeypatch)
    scan_folder(tmp_path)
    scan_folder(tmp_path)
    assert len(decoded) == 2
