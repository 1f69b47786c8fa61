"""The local captioner on tiny random-weight models of each kind (a BLIP image-to-text model, a WD14-style ONNX
tagger), captioning real files end to end: modes, trigger word, preview, stop, and the folder listing."""

from pathlib import Path

import pytest
from PIL import Image
from tiny_captioners import save_tiny_blip, save_tiny_blip2, save_tiny_florence2, save_tiny_tagger

from lora_studio.captioner import (
    CaptionerError,
    caption_dataset,
    combined,
    describe_captioner,
    list_captioners,
    load_captioner,
)
from lora_studio.cli import main
from lora_studio.errors import LoraStudioError, StoppedEarly


@pytest.fixture(scope="module")
def captioners(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "readme.txt").write_text("hello")
    return {"blip": save_tiny_blip(root / "tiny-blip"), "tagger": save_tiny_tagger(root / "tiny-wd14"), "root": root}


def dataset(folder, captioned: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in (("a", "red"), ("b", "blue"), ("c", "red")):
        Image.new("RGB", (48, 32), colour).save(folder / f"{name}.png")
    for name, text in (captioned or {}).items():
        (folder / f"{name}.txt").write_text(text + "\n")
    return folder


def captions(folder) -> dict:
    return {p.stem: p.read_text().strip() for p in sorted(folder.glob("*.txt"))}


def test_the_folder_lists_each_kind_and_skips_what_is_no_captioner(captioners):
    found = {c.name: c for c in list_captioners(captioners["root"])}
    assert set(found) == {"tiny-blip", "tiny-wd14"}
    assert found["tiny-blip"].kind == "image-to-text" and found["tiny-blip"].model_type == "blip"
    assert found["tiny-wd14"].kind == "tagger" and found["tiny-wd14"].label == "tiny-wd14 (WD14 tagger)"
    with pytest.raises(CaptionerError, match="holds no captioner"):
        describe_captioner(captioners["root"] / "not-a-model")


def test_a_tagger_captions_by_its_tags_in_every_mode(captioners, tmp_path):
    tagger = load_captioner(captioners["tagger"])
    folder = dataset(tmp_path / "d", {"b": "an old caption"})
    results = caption_dataset(folder, tagger, "missing", "zkz", batch_size=2)
    assert [r.written for r in results] == [True, False, True]
    # red -> red hair; the kaomoji keeps its underscore; the rating and the unsure character tag are left out
    assert captions(folder) == {"a": "zkz, red hair, ^_^", "b": "an old caption", "c": "zkz, red hair, ^_^"}
    caption_dataset(folder, tagger, "prepend", "zkz")
    assert captions(folder)["b"] == "zkz, blue sky, ^_^, an old caption"
    caption_dataset(folder, tagger, "overwrite", "")
    assert captions(folder) == {"a": "red hair, ^_^", "b": "blue sky, ^_^", "c": "red hair, ^_^"}
    (folder / "a.txt").write_text("mine\n")
    caption_dataset(folder, tagger, "append", "zkz", limit=1)
    assert captions(folder)["a"] == "zkz, mine, red hair, ^_^"
    (folder / "a.txt").write_text("tag, " * 13_105 + "\n")  # 10 bytes under the 64 KB a caption may have
    with pytest.raises(LoraStudioError, match="The caption for a.txt would be 64 KB, over the 64 KB"):
        caption_dataset(folder, tagger, "append", "", limit=1)  # the tags would take it over
    assert (folder / "a.txt").read_text() == "tag, " * 13_105 + "\n"  # as it was


def test_a_preview_writes_nothing_and_a_stop_keeps_what_was_written(captioners, tmp_path):
    tagger = load_captioner(captioners["tagger"])
    folder = dataset(tmp_path / "d")
    preview = caption_dataset(folder, tagger, "overwrite", "zkz", limit=2, write=False)
    assert [r.after for r in preview] == ["zkz, red hair, ^_^", "zkz, blue sky, ^_^"] and captions(folder) == {}
    seen = []
    with pytest.raises(StoppedEarly, match="Stopped after 1 of 3 images"):
        caption_dataset(folder, tagger, "overwrite", "", batch_size=1, progress=lambda d, t: seen.append((d, t)),
                        should_stop=lambda: len(seen) >= 1)  # fmt: skip
    assert seen == [(1, 3)] and captions(folder) == {"a": "red hair, ^_^"}
    assert not list(folder.glob("*.tmp*"))  # every write went through a temp file and a rename


def test_a_blip_model_captions_from_its_folder_only(captioners, tmp_path):
    blip = load_captioner(captioners["blip"], device="cpu")
    folder = dataset(tmp_path / "d")
    caption_dataset(folder, blip, "missing", "zkz", batch_size=3)
    written = captions(folder)
    assert set(written) == {"a", "b", "c"} and all(text.startswith("zkz, ") and len(text) > 10
                                                   for text in written.values())  # fmt: skip
    again = caption_dataset(folder, blip, "overwrite", "zkz", write=False)
    assert [r.after for r in again] == [written[k] for k in "abc"]  # greedy decoding: the same words again


def test_a_blip2_model_captions_from_its_folder(tmp_path):
    folder = save_tiny_blip2(tmp_path / "captioners" / "tiny-blip2")
    assert describe_captioner(folder).model_type == "blip-2"
    images = dataset(tmp_path / "d")
    caption_dataset(images, load_captioner(folder, device="cpu"), "missing", "zkz", batch_size=3)
    written = captions(images)
    assert set(written) == {"a", "b", "c"} and all(text.startswith("zkz, ") and len(text) > 10
                                                   for text in written.values())  # fmt: skip


def test_a_florence2_model_answers_its_caption_task_from_its_folder(tmp_path):
    folder = save_tiny_florence2(tmp_path / "captioners" / "tiny-florence2")
    info = describe_captioner(folder)
    assert (info.kind, info.model_type) == ("image-to-text", "florence2")
    florence = load_captioner(folder, device="cpu")
    assert florence.prompt == "<MORE_DETAILED_CAPTION>"  # the task Florence-2 answers with a caption
    images = dataset(tmp_path / "d")
    caption_dataset(images, florence, "overwrite", "zkz", batch_size=2)
    written = captions(images)
    assert set(written) == {"a", "b", "c"} and all(text.startswith("zkz, ") and len(text) > 10
                                                   for text in written.values())  # fmt: skip
    assert not any("<" in text or "Describe" in text for text in written.values())  # no task prompt in the caption


def test_modes_and_bad_requests_are_explained(captioners, tmp_path):
    assert combined("old", "new, tags", "missing", "zkz") is None
    assert combined("", "zkz, new", "overwrite", "zkz") == "zkz, new"  # the trigger is not doubled
    with pytest.raises(CaptionerError, match="unknown"):
        combined("", "x", "replace-all", "")
    with pytest.raises(CaptionerError, match="batch size"):
        caption_dataset(dataset(tmp_path / "d"), load_captioner(captioners["tagger"]), batch_size=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not onnx")
    (broken / "selected_tags.csv").write_text("tag_id,name,category,count\n0,x,0,1\n")
    with pytest.raises(CaptionerError, match="cannot be loaded by onnxruntime"):
        load_captioner(broken)


def test_the_caption_command_previews_then_writes(captioners, tmp_path, capsys):
    folder = dataset(tmp_path / "d")
    model = str(captioners["tagger"])
    assert main(["caption", str(folder), "--model", model, "--trigger", "zkz", "--preview", "2"]) == 0
    out = capsys.readouterr().out
    assert "a.png: zkz, red hair, ^_^" in out and "b.png: zkz, blue sky, ^_^" in out and captions(folder) == {}
    assert main(["caption", str(folder), "--model", model, "--trigger", "zkz"]) == 0
    assert "wrote 3 captions" in capsys.readouterr().out and len(captions(folder)) == 3
    assert main(["caption", str(folder), "--model", str(tmp_path / "nowhere")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_the_dataset_tab_previews_captions_all_and_stops(app_state, captioners):
    import shutil

    from lora_studio.paths import captioners_dir
    from lora_studio.ui import dataset_tab

    shutil.copytree(captioners["tagger"], captioners_dir() / "tiny-wd14")
    assert dataset_tab.captioner_choices().choices == [("tiny-wd14 (WD14 tagger)", "tiny-wd14")]
    from lora_studio.ui.app import captioners_table  # the Models tab lists them as it lists base models

    assert captioners_table() == [["tiny-wd14", "WD14 tagger (ONNX)", str(captioners_dir() / "tiny-wd14")]]
    folder, *_rest = dataset_tab.open_dataset(app_state, "demo", None)
    rows = dataset_tab.preview_captions(app_state, folder, "tiny-wd14", "overwrite", "zkz", 0.35)
    assert len(rows) == dataset_tab.PREVIEW_CAPTIONS and all(r[2].startswith("zkz, ") for r in rows)
    before = {p.name: p.read_text() for p in Path(folder).glob("*.txt")}
    assert {p.name: p.read_text() for p in Path(folder).glob("*.txt")} == before  # the preview wrote nothing
    seen = []
    gallery, _report, _tags, message = dataset_tab.caption_all(
        app_state, folder, "tiny-wd14", "append", "zkz", 0.35, 8, None, progress=lambda *a, **k: seen.append(a[0]))
    images = len(list(Path(folder).glob("*.png")))
    assert message == f"Wrote {images} captions ({images} images, mode append)." and seen[-1] == (images, images)
    assert all(label.startswith("zkz, ") and "^_^" in label for _path, label in gallery)
    dataset_tab.stop_captioning(app_state)  # a Stop before the next run is forgotten when it starts
    app_state.caption_stop.clear()
    stop_after_first = lambda *a, **k: app_state.caption_stop.set()  # noqa: E731 - Stop pressed during batch one
    *_view, message = dataset_tab.caption_all(app_state, folder, "tiny-wd14", "overwrite", "", 0.35, 4, None,
                                              progress=stop_after_first)  # fmt: skip
    assert message.startswith(f"Stopped after 4 of {images} images")
    with pytest.raises(LoraStudioError, match="No captioner named '../tiny-wd14'"):
        dataset_tab.preview_captions(app_state, folder, "../tiny-wd14", "overwrite", "", 0.35)
    with pytest.raises(LoraStudioError, match="Pick a captioner first: .*tiny-wd14"):  # listed, none picked
        dataset_tab.preview_captions(app_state, folder, None, "overwrite", "", 0.35)


def test_captioning_with_no_captioner_on_disk_says_where_one_goes(app_state):
    from lora_studio.paths import captioners_dir
    from lora_studio.ui import dataset_tab

    folder = dataset_tab.open_dataset(app_state, "demo")[0]
    with pytest.raises(LoraStudioError) as refused:
        dataset_tab.preview_captions(app_state, folder, None, "missing", "", 0.35)
    assert str(refused.value).startswith(f"No captioner is in {captioners_dir()}; put a captioning model's folder")
