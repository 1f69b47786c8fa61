"""More folders than one (`dataset.subsets`: kohya's [[datasets.subsets]], OneTrainer's concepts), each with its own
repeats and class tokens, training or regularization images; and kohya's dataset config read into them."""

import json
import random

import pytest
import torch
from test_app import app_page, browser_page, wait_for_text  # noqa: F401 - browser_page: a fixture
from test_train import tiny_config
from test_validation import make_images

from lora_studio.buckets import epoch_batches
from lora_studio.cache import plan_latent_entries
from lora_studio.config import DatasetConfig, TrainConfig, load_config, validate_config
from lora_studio.data import build_caption, dataset_report, make_step_sample, scan, validation_caption
from lora_studio.errors import ConfigError
from lora_studio.outputs import training_facts
from lora_studio.step import cached_latent
from lora_studio.train import prepare, run_training
from lora_studio.ui.config_form import FIELD_BY_KEY, KEYS, config_from_form, form_values


def uncaptioned(folder, count):
    make_images(folder, count)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


def test_each_subset_brings_its_folders_with_its_own_repeats_and_class_tokens(tmp_path):
    main = make_images(tmp_path / "main", 2)
    alice = uncaptioned(tmp_path / "alice", 3)
    kohya = make_images(tmp_path / "bob" / "5_bob man", 2)  # a kohya N_name folder named directly
    parent = tmp_path / "styles"
    make_images(parent / "3_ink", 2)  # a kohya parent: each N_name folder with its count
    config = DatasetConfig(path=str(main), repeats=2, min_bucket_reso=32, trigger_word="zkz", subsets=[
        {"path": str(alice), "repeats": 10, "class_tokens": "alice woman"},
        {"path": str(kohya)},
        {"path": str(parent), "class_tokens": "ink drawing"},
    ])  # fmt: skip
    report = scan(config)
    assert report.errors == []
    folders = {(item.path.parent.name, item.concept, item.repeats) for item in report.items}
    assert folders == {("main", "main", 2), ("alice", "alice woman", 10), ("5_bob man", "bob man", 5),
                       ("3_ink", "ink drawing", 3)}  # fmt: skip
    assert report.images_per_epoch == 2 * 2 + 3 * 10 + 2 * 5 + 2 * 3
    assert report.layout == "plain" and report.root == main
    # an image without a caption file is captioned by its subset's class tokens (kohya's class_tokens)
    alice_item = next(i for i in report.items if i.path.parent == alice)
    assert build_caption(alice_item, config, random.Random(0)) == "zkz, alice woman"
    no_trigger = config.model_copy(update={"trigger_word": ""})
    assert build_caption(alice_item, no_trigger, random.Random(0)) == "alice woman"
    counted = dataset_report(TrainConfig(dataset=config))
    assert [(f["concept"], f["repeats"], f["images"]) for f in counted["folders"]] == [
        ("main", 2, 2), ("alice woman", 10, 3), ("bob man", 5, 2), ("ink drawing", 3, 2)]
    assert counted["images_per_epoch"] == report.images_per_epoch


def test_a_config_of_subsets_alone_trains_and_a_missing_folder_is_named(tmp_path):
    alice = make_images(tmp_path / "alice", 2)
    only = DatasetConfig(min_bucket_reso=32, subsets=[{"path": str(alice), "repeats": 4}])
    report = scan(only)
    assert report.errors == [] and report.images_per_epoch == 8 and report.root == alice
    missing = DatasetConfig(min_bucket_reso=32, subsets=[{"path": str(alice)}, {"path": str(tmp_path / "gone")}])
    errors = scan(missing).errors
    assert len(errors) == 1 and "line 2 of dataset.subsets" in errors[0].message
    assert str(tmp_path / "gone") in errors[0].message
    nothing = scan(DatasetConfig())
    assert [p.message for p in nothing.errors] == ["no folder of images is set; set dataset.path to your images' "
                                                   "folder"]  # fmt: skip


def test_a_folder_named_twice_in_other_spellings_is_refused_and_read_once(tmp_path, monkeypatch):
    parent = tmp_path / "people"
    make_images(parent / "5_alice woman", 2)
    make_images(parent / "3_bob man", 3, shade=50)
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "bob-link"
    link.symlink_to(parent / "3_bob man")
    config = DatasetConfig(path=str(parent), min_bucket_reso=32, subsets=[
        {"path": "people/5_alice woman", "repeats": 10},  # inside dataset.path's parent, relative spelling
        {"path": str(link)},  # the same folder through a link
    ])  # fmt: skip
    report = scan(config)
    messages = [p.message for p in report.errors]
    assert len(messages) == 2
    assert "read by both dataset.path and line 1 of dataset.subsets" in messages[0]
    assert "read by both dataset.path and line 2 of dataset.subsets" in messages[1]
    assert all("name it once" in m for m in messages)
    # each image read once: no "exact duplicate" warnings, the first naming's repeats
    assert len(report.items) == 5 and not [p for p in report.warnings if "duplicate" in p.message]
    assert sorted(item.repeats for item in report.items) == [3, 3, 3, 5, 5]
    alone = config.model_copy(update={"subsets": config.subsets[:1], "path": ""})
    assert scan(alone).errors == []


def test_the_config_refuses_what_the_folders_cannot_mean():
    with pytest.raises(ConfigError, match="listed more than once"):
        validate_config({"dataset": {"path": "a", "subsets": [{"path": "b"}, {"path": "b"}]}})
    with pytest.raises(ConfigError, match="both dataset.path and a subset"):
        validate_config({"dataset": {"path": "a", "subsets": [{"path": "a"}]}})
    with pytest.raises(ConfigError, match=r"`dataset.subsets.0.path`.*is empty"):
        validate_config({"dataset": {"subsets": [{"path": "  "}]}})
    with pytest.raises(ConfigError, match="`dataset.subsets.0.repeats`"):
        validate_config({"dataset": {"subsets": [{"path": "a", "repeats": 0}]}})
    with pytest.raises(ConfigError, match="`dataset.subsets.0.folder` is not a setting"):
        validate_config({"dataset": {"subsets": [{"path": "a", "folder": "b"}]}})
    generated = {"dataset": {"path": "a", "subsets": [{"path": "r", "regularization": True}]},
                 "regularization": {"generate": True}}  # fmt: skip
    with pytest.raises(ConfigError, match="not both"):
        validate_config(generated)
    empty = validate_config({"base_model": "demo"})
    assert any("`dataset.path` is empty" in p for p in empty.training_problems())
    only_reg = validate_config({"base_model": "demo", "dataset": {"subsets": [{"path": "r", "regularization": True}]}})
    assert any("`dataset.path` is empty" in p for p in only_reg.training_problems())
    assert not validate_config({"base_model": "demo", "dataset": {"subsets": [{"path": "a"}]}}).training_problems()


def test_subsets_train_with_their_repeats_and_class_folders_as_regularization(tmp_path, tiny_folders):
    main = make_images(tmp_path / "main", 2)
    extra = uncaptioned(tmp_path / "extra", 2)
    reg = uncaptioned(tmp_path / "people", 2)
    config = tiny_config(tmp_path, tiny_folders, main, dataset={"subsets": [
        {"path": str(extra), "repeats": 3, "class_tokens": "zkz thing"},
        {"path": str(reg), "regularization": True, "class_tokens": "a person", "repeats": 2},
    ]}, validation={"fraction": 0.5})  # fmt: skip
    session = prepare(config)
    by_folder = {(i.path.parent.name, i.repeats, i.regularization) for i in session.items}
    # one image of each training folder held out for validation; the class images balanced to the 4 training
    # images an epoch (1 x 1 + 1 x 3), starting from their own 2 repeats each
    assert by_folder == {("main", 1, False), ("extra", 3, False), ("people", 2, True)}
    assert {image.item.path.parent.name for image in session.validation.images} == {"main", "extra"}
    reg_item = next(i for i in session.items if i.regularization)
    assert build_caption(reg_item, config.dataset, random.Random(0)) == "a person"  # no trigger word
    repeats = [i.repeats for i in session.items]
    epoch = [index for batch in epoch_batches(session.buckets, repeats, 2, 7, 0) for index in batch]
    assert sorted(session.items[i].path.parent.name for i in epoch) == ["extra"] * 3 + ["main"] + ["people"] * 4
    facts = training_facts(session)  # kohya's metadata: one entry per folder with its repeats
    assert facts.dataset_dirs == {"main": {"n_repeats": 1, "img_count": 1}, "extra": {"n_repeats": 3, "img_count": 1}}
    assert facts.reg_dataset_dirs == {"people": {"n_repeats": 2, "img_count": 2}}


def test_each_folder_augments_with_its_own_settings(tmp_path, tiny_folders):
    main = make_images(tmp_path / "main", 2)
    faces = make_images(tmp_path / "faces", 2, shade=60)
    flipped = tiny_config(tmp_path / "a", tiny_folders, main, dataset={"subsets": [
        {"path": str(faces), "flip_aug": True}]})  # fmt: skip
    session = prepare(flipped)
    entries = plan_latent_entries(session.items, session.buckets, flipped.dataset)
    # mirrored copies are cached for the subset's images only
    assert sorted((session.items[e.item_index].subset, e.flip) for e in entries) == [
        (0, False), (0, False), (1, False), (1, False), (1, True), (1, True)]
    for index, (item, bucket) in enumerate(zip(session.items, session.buckets, strict=True)):  # a step's draw
        means = [cached_latent(session.latent_cache, item, bucket, index, flipped.dataset, random.Random(k))["mean"]
                 for k in range(6)]  # fmt: skip
        assert any(not torch.equal(means[0], other) for other in means[1:]) == (item.subset == 1), item.path
    assert run_training(flipped).lora_path.exists()
    # without a cache, crops and colour jitter act on the folder that sets them, and nothing else changes
    jittered = tiny_config(tmp_path / "b", tiny_folders, main, dataset={"cache_latents": False, "subsets": [
        {"path": str(faces), "random_crop": True, "color_jitter": [0.3, 0.3, 0.3, 0.1]}]})  # fmt: skip
    session = prepare(jittered)
    for item, bucket in zip(session.items, session.buckets, strict=True):
        pixels = [make_step_sample(item, bucket, jittered.dataset, random.Random(k)).pixels for k in range(4)]
        changes = any(not torch.equal(pixels[0], other) for other in pixels[1:])
        assert changes == (item.subset == 1), item.path
    # the dataset's own augmentation reaches a subset that does not set its own, and a subset can turn it off
    both = jittered.dataset.model_copy(update={"flip_aug": True, "subsets": [
        jittered.dataset.subsets[0].model_copy(update={"flip_aug": False})]})  # fmt: skip
    assert (both.for_subset(0).flip_aug, both.for_subset(1).flip_aug) == (True, False)
    assert [named for named, _ in both.per_step_augmentations()] == [
        "`random_crop` on line 1 of dataset.subsets", "`color_jitter` on line 1 of dataset.subsets"]


def write_kohya(tmp_path, dataset_toml: str, extra: str = "") -> object:
    (tmp_path / "sets").mkdir(exist_ok=True)
    (tmp_path / "sets" / "dataset.toml").write_text(dataset_toml)
    config = tmp_path / "kohya.toml"
    config.write_text(f'pretrained_model_name_or_path = "demo"\ntrain_data_dir = "/ignored"\nnetwork_dim = 8\n'
                      f'dataset_config = "sets/dataset.toml"\n{extra}')  # fmt: skip
    return config


KOHYA_DATASET = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
cache_info = true

[[datasets]]
resolution = [768, 768]
batch_size = 4
num_repeats = 2

  [[datasets.subsets]]
  image_dir = '/data/5_hoge'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = '/data/fuga'

  [[datasets.subsets]]
  is_reg = true
  image_dir = '/data/reg'
  class_tokens = 'girl'
  num_repeats = 1
"""


def test_kohyas_dataset_config_becomes_subsets(tmp_path, monkeypatch):
    config = load_config(write_kohya(tmp_path, KOHYA_DATASET))
    dataset = config.dataset
    assert dataset.path == ""  # kohya: a dataset config replaces train_data_dir
    assert [s.model_dump(exclude_none=True) for s in dataset.subsets] == [
        {"path": "/data/5_hoge", "repeats": 10, "class_tokens": "hoge girl", "regularization": False},
        {"path": "/data/fuga", "repeats": 2, "class_tokens": "", "regularization": False},  # the dataset's repeats
        {"path": "/data/reg", "repeats": 1, "class_tokens": "girl", "regularization": True},
    ]
    assert (dataset.resolution, dataset.batch_size, dataset.shuffle_caption, dataset.keep_tokens) == (768, 4, True, 1)
    assert config.lora.rank == 8 and config.base_model == "demo"
    # kohya's JSON form of the same file, named by an absolute path
    as_json = tmp_path / "dataset.json"
    import tomllib

    as_json.write_text(json.dumps(tomllib.loads(KOHYA_DATASET)))
    (tmp_path / "k2.toml").write_text(f'pretrained_model_name_or_path = "demo"\ndataset_config = "{as_json}"\n')
    assert load_config(tmp_path / "k2.toml").dataset == dataset
    # kohya opens a relative dataset_config from the working folder: found there when not beside the config
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "k4.toml").write_text('pretrained_model_name_or_path = "demo"\n'
                                                     'dataset_config = "sets/dataset.toml"\n')  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert load_config(tmp_path / "elsewhere" / "k4.toml").dataset == dataset
    # kohya_ss writes an empty dataset_config when train_data_dir holds the folders
    (tmp_path / "k3.toml").write_text('train_data_dir = "/data/img"\ndataset_config = ""\n')
    assert load_config(tmp_path / "k3.toml").dataset.path == "/data/img"


def test_kohyas_dataset_config_what_cannot_be_taken_is_named(tmp_path):
    two = KOHYA_DATASET + "[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = '/x'\n"
    with pytest.raises(ConfigError, match=r"has 2 \[\[datasets\]\]; this app trains one"):
        load_config(write_kohya(tmp_path, two))
    # a caption setting of kohya's that differs between subsets: each subset keeps its own (kohya's own example)
    differing = KOHYA_DATASET.replace("  class_tokens = 'girl'\n", "  class_tokens = 'girl'\n  keep_tokens = 3\n")
    subsets = load_config(write_kohya(tmp_path, differing)).dataset.subsets
    assert [s.keep_tokens for s in subsets] == [1, 1, 3]
    # so does an augmentation (kohya's color_aug becomes a mild colour jitter)
    augmented = KOHYA_DATASET.replace("  class_tokens = 'girl'\n", "  class_tokens = 'girl'\n  flip_aug = true\n"
                                      "  color_aug = true\n  random_crop = true\n")  # fmt: skip
    subsets = load_config(write_kohya(tmp_path, augmented, "cache_latents = false\n")).dataset.subsets
    assert [(s.flip_aug, s.random_crop, s.color_jitter) for s in subsets] == [
        (None, None, None), (None, None, None), (True, True, (0.1, 0.1, 0.1, 0.02))]
    with pytest.raises(ConfigError) as cached:  # one folder's per-step augmentation: no latent cache for any
        load_config(write_kohya(tmp_path, augmented))
    assert [line.strip() for line in str(cached.value).splitlines()[1:]] == [
        "- `random_crop` on line 3 of dataset.subsets changes every step, so latents cannot be cached; turn "
        "dataset.cache_latents off or turn random_crop off",
        "- `color_jitter` on line 3 of dataset.subsets changes every step, so latents cannot be cached; turn "
        "dataset.cache_latents off or set color_jitter to [0, 0, 0, 0]"]
    # a setting that is one for all folders here (alpha_mask decides how masks are read) is refused by name,
    # never averaged or dropped
    masked = KOHYA_DATASET.replace("  class_tokens = 'girl'\n", "  class_tokens = 'girl'\n  alpha_mask = true\n")
    with pytest.raises(ConfigError, match=r"`alpha_mask` differs between subsets \(None, None, True\)"):
        load_config(write_kohya(tmp_path, masked))
    face_crop = KOHYA_DATASET.replace("[general]", "[general]\nface_crop_aug_range = [2.0, 4.0]")
    with pytest.raises(ConfigError, match="`face_crop_aug_range` is not a setting"):
        load_config(write_kohya(tmp_path, face_crop))
    missing = tmp_path / "missing.toml"
    missing.write_text('dataset_config = "no/such.toml"\n')
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_config(missing)
    assert str(tmp_path / "no" / "such.toml") in str(caught.value)


def test_the_form_shows_subsets_one_a_line_and_reads_them_back(tmp_path):
    alice = {"path": "/data/alice", "repeats": 10, "class_tokens": 'alice "ally" woman'}
    config = validate_config({"dataset": {"path": "a", "subsets": [alice, {"path": "/data/reg",
                                                                           "regularization": True}]}})  # fmt: skip
    values = form_values(config)
    shown = values[KEYS.index("dataset.subsets")]
    assert FIELD_BY_KEY["dataset.subsets"].kind == "tables"
    assert shown.splitlines() == ['{ path = "/data/alice", repeats = 10, class_tokens = "alice \\"ally\\" woman" }',
                                  '{ path = "/data/reg", regularization = true }']  # fmt: skip
    assert config_from_form(values).dataset.subsets == config.dataset.subsets
    values[KEYS.index("dataset.subsets")] = shown + "\n\n/data/bob\n"
    values[KEYS.index("dataset.batch_size")] = 0
    with pytest.raises(ConfigError) as caught:
        config_from_form(values)
    problems = caught.value.problems  # the unreadable line and every other bad field, at once
    assert any("line 4 ('/data/bob') is not a TOML inline table" in p for p in problems)
    assert any("`dataset.batch_size`" in p for p in problems)


def test_the_command_line_counts_each_folder_and_a_saved_config_keeps_the_subsets(tmp_path, capsys):
    from lora_studio.cli import main
    from lora_studio.config import save_config

    main_folder, alice = make_images(tmp_path / "main", 2), make_images(tmp_path / "alice", 3)
    config = validate_config({"dataset": {"path": str(main_folder), "min_bucket_reso": 32, "subsets": [
        {"path": str(alice), "repeats": 4, "class_tokens": "alice"}]}})  # fmt: skip
    save_config(config, tmp_path / "cfg.toml")
    assert "[[dataset.subsets]]" in (tmp_path / "cfg.toml").read_text()
    assert load_config(tmp_path / "cfg.toml") == config
    assert main(["dataset", str(main_folder), "--config", str(tmp_path / "cfg.toml")]) == 0
    out = capsys.readouterr().out
    assert "5 images, 14 per epoch with repeats" in out
    assert f"{alice}: 3 images x 4 repeats ('alice')" in out and f"{main_folder}: 2 images x 1 repeats" in out


def test_each_folder_captions_with_its_own_settings(tmp_path):
    """kohya's per-subset caption options: extension, keep_tokens, shuffle, dropout, prefix; unset ones are the
    dataset's. The validation caption never draws, whatever the folder says."""
    main, tagged = make_images(tmp_path / "main", 2), make_images(tmp_path / "tagged", 2, shade=60)
    for caption in tagged.glob("*.txt"):
        caption.rename(caption.with_suffix(".tags"))
        caption.with_suffix(".tags").write_text("a, b, c, d, e, f")
    config = DatasetConfig(path=str(main), min_bucket_reso=32, trigger_word="zkz", subsets=[
        {"path": str(tagged), "caption_extension": "tags", "keep_tokens": 1, "shuffle_caption": True,
         "caption_prefix": "photo"}])  # fmt: skip
    report = scan(config)
    assert report.errors == [] and report.warnings == []  # the .tags files are the second folder's captions
    main_item, tagged_item = report.items[0], report.items[-1]
    assert (main_item.subset, tagged_item.subset, tagged_item.caption) == (0, 1, "a, b, c, d, e, f")
    assert build_caption(main_item, config, random.Random(0)) == "zkz, a thing number 0"  # not shuffled
    drawn = {build_caption(tagged_item, config, random.Random(seed)) for seed in range(20)}
    assert len(drawn) > 5 and all(c.startswith("zkz, photo, ") for c in drawn)  # trigger and kept tag stay first
    assert validation_caption(tagged_item, config) == "zkz, photo, a, b, c, d, e, f"
    assert config.captions_are_static is False and DatasetConfig(path="x").captions_are_static
    with pytest.raises(ConfigError, match="text embeddings"):
        validate_config({"dataset": {**config.model_dump(), "cache_text_embeddings": True}, "lora": {
            "train_text_encoder": False}})  # fmt: skip


def test_opening_a_subsets_folder_in_the_dataset_tab_leaves_dataset_path_alone(app_state):
    """The Dataset tab makes the folder it opens the Train form's dataset.path, except a folder the form already
    lists as a subset (which would then be both, and refused): its captions are edited in place, the path stays."""
    from lora_studio.ui import dataset_tab

    alice = make_images(app_state.roots.datasets / "alice", 2)
    other = make_images(app_state.roots.datasets / "other", 2, shade=60)
    subsets = '{ path = "datasets/alice", repeats = 4 }'
    *_, became = dataset_tab.open_dataset(app_state, str(alice), None, ".txt", subsets)
    assert became == {"__type__": "update"}  # skipped: dataset.path keeps what it was
    *_, became = dataset_tab.open_dataset(app_state, str(other), None, ".txt", subsets)
    assert became == str(other)
    *_, became = dataset_tab.open_dataset(app_state, str(alice), None, ".txt", "not a table")  # unreadable: none
    assert became == str(alice)


def test_the_dataset_tab_shows_and_edits_a_subsets_folder_as_that_subset_trains(app_state):
    """A subset's own caption extension is the one the tab reads and writes for its folder (and for the kohya
    `N_name` folders of a subset that is their parent); its class tokens and repeats are what the report checks."""
    from lora_studio.ui import dataset_tab

    faces = uncaptioned(app_state.roots.datasets / "faces", 2)
    (faces / "0.caption").write_text("a face, smiling")
    parent = app_state.roots.datasets / "styles"
    ink = make_images(parent / "3_ink", 2, shade=60)
    for caption in ink.glob("*.txt"):
        caption.rename(caption.with_suffix(".caption"))
    subsets = ('{ path = "datasets/faces", caption_extension = ".caption", class_tokens = "zkz face", repeats = 5 }\n'
               '{ path = "datasets/styles", caption_extension = "caption" }')  # fmt: skip
    state, _shown, gallery, report, _tags, became = dataset_tab.open_dataset(app_state, "datasets/faces", None,
                                                                             ".txt", subsets)  # fmt: skip
    assert became == {"__type__": "update"}
    assert sorted(label for _path, label in gallery) == ["", "a face, smiling"]
    assert "**2 images**" in report and "zkz face" in report  # the uncaptioned one: the subset's class tokens
    gallery, message = dataset_tab.save_caption(app_state, state, "1.png", "a face, frowning", ".txt", subsets)
    assert message == "Saved 1.caption." and not (faces / "1.txt").exists()
    assert (faces / "1.caption").read_text().strip() == "a face, frowning"
    dataset_tab.apply_bulk_edit(app_state, state, "", "", "", "face", "head", None, ".txt", subsets)
    assert (faces / "1.caption").read_text().strip() == "a head, frowning"
    gallery, *_ = dataset_tab.current_view(app_state, state, None, ".txt", "")  # no longer a subset: the form's .txt
    assert [label for _path, label in gallery] == ["", ""]
    # an N_name folder of a subset that is a kohya parent reads that subset's extension
    _state, _shown, gallery, *_ = dataset_tab.open_dataset(app_state, str(ink), None, ".txt", subsets)
    assert sorted(label for _path, label in gallery) == ["a thing number 0", "a thing number 1"]
    # a subset line that cannot train (a bad extension) is no subset here: the form names the problem
    bad = '{ path = "datasets/faces", caption_extension = "../x" }'
    *_, became = dataset_tab.open_dataset(app_state, "datasets/faces", None, ".txt", bad)
    assert became == str(faces)


def test_the_dataset_tab_lists_the_train_forms_folders():
    from lora_studio.ui.dataset_tab import form_folders

    listed = form_folders("/home/me/datasets/main", '{ path = "datasets/alice", repeats = 4 }\n\n'
                                                    '{ path = "/data/reg", regularization = true }')  # fmt: skip
    assert listed.choices == [("dataset.path: /home/me/datasets/main", "/home/me/datasets/main"),
                              ("subset 1: datasets/alice", "datasets/alice"), ("subset 2: /data/reg", "/data/reg")]
    assert form_folders("", "not a table").choices == []  # the form reports its unreadable line itself


@pytest.mark.browser
def test_picking_a_subset_in_the_dataset_tab_opens_it_and_leaves_dataset_path(browser_page, app_state):  # noqa: F811
    make_images(app_state.roots.datasets / "alice", 2, shade=90)
    with app_page(browser_page) as page:
        wait_for_text(page, "#dataset-report", "24 images")  # the demo opened, and became dataset.path
        page.get_by_role("tab", name="Train").click()
        demo = page.locator("#cfg-dataset-path textarea").input_value()
        page.locator("#train-advanced > button").first.click()
        page.locator("#train-section-dataset > button").first.click()
        # Typed, not `fill`ed: a filled Gradio textbox has been seen to skip its input event, which is what puts the
        # typed value in the page's state (the picker then never heard of the subset).
        page.locator("#cfg-dataset-subsets textarea").press_sequentially('{ path = "datasets/alice", repeats = 4 }')
        page.locator("#cfg-dataset-subsets textarea").press("Tab")
        page.get_by_role("tab", name="Dataset").click()
        subset = page.get_by_role("option", name="subset 1: datasets/alice")
        picker = page.locator("#dataset-form-folder input")
        for _ in range(60):  # the picker's choices follow the form (the tab's select, or the picker's focus)
            picker.click()
            page.wait_for_timeout(300)
            if subset.count():
                break
            page.keyboard.press("Escape")
            picker.blur()  # so that the next click focuses it again: each focus asks the server for the choices
            page.wait_for_timeout(500)
        subset.click()
        wait_for_text(page, "#dataset-report", "2 images")
        assert page.locator("#dataset-gallery .thumbnail-item").count() == 2
        assert page.locator("#dataset-folder textarea").input_value().endswith("/datasets/alice")
        page.get_by_role("tab", name="Train").click()
        assert page.locator("#cfg-dataset-path textarea").input_value() == demo
