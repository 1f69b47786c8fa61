"""The typed config: presets, TOML round trip, migrations, overrides, all-errors-at-once validation."""

import pytest

from lora_studio.config import (
    CONFIG_VERSION,
    TrainConfig,
    apply_overrides,
    config_to_toml,
    load_config,
    load_preset,
    migrate,
    preset_path,
    save_config,
    validate_config,
)
from lora_studio.errors import ConfigError
from lora_studio.fsutil import WriteError
from lora_studio.paths import PRESETS_DIR

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
REQUIRED_PRESETS = {
    "sd15-character",
    "sd15-style",
    "sdxl-character",
    "sdxl-style",
    "sd15-low-vram",
    "sdxl-low-vram",
    "demo-cpu",
}


def test_required_presets_exist():
    assert REQUIRED_PRESETS <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    config = load_preset(name)
    assert isinstance(config, TrainConfig)
    assert config.version == CONFIG_VERSION
    first_line = preset_path(name).read_text().splitlines()[0]
    assert first_line.startswith("# ") and len(first_line) > 20, "a preset starts by saying when to use it"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_round_trips_through_toml(name, tmp_path):
    config = load_preset(name)
    save_config(config, tmp_path / "c.toml", header="saved by a test")
    assert load_config(tmp_path / "c.toml") == config


def test_presets_match_their_family():
    assert load_preset("sdxl-character").dataset.resolution == 1024
    assert load_preset("sd15-character").dataset.resolution == 512
    assert load_preset("demo-cpu").base_model == "demo"
    assert not load_preset("sdxl-low-vram").lora.train_text_encoder


def test_the_prior_presets_are_the_character_presets_with_generated_class_images():
    for family in ("sd15", "sdxl"):
        plain, prior = load_preset(f"{family}-character"), load_preset(f"{family}-character-prior")
        assert prior.regularization.generate and not plain.regularization.enabled
        assert prior.model_copy(update={"name": plain.name, "regularization": plain.regularization}) == plain


def test_round_trip_with_every_section_changed(tmp_path):
    config = TrainConfig(
        name="x1",
        base_model="/models/a.safetensors",
        dataset={"path": "/data", "trigger_word": "zkz", "flip_aug": True},
        lora={"rank": 4, "alpha": 2.0, "unet_targets": "full", "conv_rank": 4, "conv_alpha": 1.0},
        optimizer={"optimizer": "prodigy", "learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": 1.0,
                   "max_train_steps": 10},
        sample={"prompts": ["zkz, a cat"], "strengths": [0.0, 0.5, 1.0], "seeds": [1, 2]},
        save={"format": "diffusers", "precision": "bf16", "keep_last": 3},
    )
    path = tmp_path / "full.toml"
    save_config(config, path)
    assert load_config(path) == config
    assert "conv_rank = 4" in path.read_text()


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    save_config(TrainConfig(name="first"), path)
    before = path.read_text()

    def broken_write(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", broken_write)
    with pytest.raises(WriteError, match="c.toml: No space left on device"):
        save_config(TrainConfig(name="second"), path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.toml"], "no temp file left behind"


def test_bad_preset_lists_every_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        """
name = "has spaces!"
mixed_precision = "fp8"
[lora]
rank = 0
rnak = 4
[optimizer]
learning_rate = -1
betas = [0.9, 1.5]
[dataset]
min_bucket_reso = 2048
max_bucket_reso = 512
[sample]
strengths = [3.0]
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 8, problems
    text = str(info.value)
    assert "bad.toml has 8 problem(s)" in text
    for expected in (
        "`name` = 'has spaces!'",
        "`mixed_precision` = 'fp8'",
        "`lora.rank` = 0: input should be greater than or equal to 1",
        "`lora.rnak` is not a setting; remove it (did you mean `rank`?)",
        "`optimizer.learning_rate` = -1",
        "both betas must lie in [0, 1), got [0.9, 1.5]",
        "min_bucket_reso (2048) is above max_bucket_reso (512)",
        "strengths must lie in [-2, 2], got [3.0]",
    ):
        assert expected in text, expected


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[lora\nrank = 4")
    with pytest.raises(ConfigError, match="(?s)broken.toml.*not valid TOML"):
        load_config(path)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'sdxl-style'"):
        load_preset("sdxl-styel")


def test_set_overrides_are_typed_and_validated(tmp_path):
    config = load_preset(
        "demo-cpu",
        [
            "lora.rank=32",
            "lora.alpha=16",
            "dataset.trigger_word=sks dog",
            "sample.strengths=[0.25, 1]",
            "dataset.flip_aug=true",
            'name="run-2"',
        ],
    )
    assert config.lora.rank == 32 and config.lora.alpha == 16.0
    assert config.dataset.trigger_word == "sks dog"
    assert config.sample.strengths == [0.25, 1.0]
    assert config.dataset.flip_aug is True and config.name == "run-2"
    with pytest.raises(ConfigError, match="lora.rank"):
        load_preset("demo-cpu", ["lora.rank=-5"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="`lora` is a value, not a section"):
        apply_overrides({"version": 1, "lora": 3}, ["lora.rank=4"])


def test_migration_from_version_0_kohya_style_dict():
    v0 = {
        "output_name": "old-run",
        "pretrained_model_name_or_path": "/models/sd15.safetensors",
        "train_data_dir": "/data/10_zkz",
        "resolution": "768,768",
        "network_dim": 32,
        "network_alpha": 16,
        "optimizer_type": "AdamW8bit",
        "learning_rate": 2e-4,
        "network_train_unet_only": True,
        "max_train_epochs": 4,
        "save_precision": "bf16",
    }
    migrated = migrate(dict(v0))
    assert migrated["version"] == CONFIG_VERSION
    config = validate_config(v0)
    assert config.name == "old-run"
    assert config.base_model == "/models/sd15.safetensors"
    assert config.dataset.path == "/data/10_zkz" and config.dataset.resolution == 768
    assert (config.lora.rank, config.lora.alpha, config.lora.train_text_encoder) == (32, 16.0, False)
    assert config.optimizer.optimizer == "adamw8bit" and config.optimizer.learning_rate == 2e-4
    assert config.optimizer.max_train_epochs == 4 and config.save.precision == "bf16"


def test_sd_scripts_network_and_optimizer_args_migrate():
    """sd-scripts' TOML keeps LoRA and optimizer options as "key=value" lists; each one we have moves into place
    (conv_dim brings kohya's conv adapters, i.e. unet_targets 'full'), and every other is refused by name."""
    config = validate_config({
        "network_module": "networks.lora", "network_dim": 16, "train_data_dir": "d",
        "network_args": ["conv_dim=4", "conv_alpha=1", "loraplus_lr_ratio=16",
                         "include_patterns=['lora_unet_.*attn', 'lora_te_.*']"],
        "optimizer_type": "AdamWScheduleFree", "lr_scheduler": "cosine",
        "optimizer_args": ["weight_decay=0.1", "betas=0.9,0.99", "warmup_steps=50"],
    })  # fmt: skip
    lora, optimizer = config.lora, config.optimizer
    assert (lora.conv_rank, lora.conv_alpha, lora.unet_targets, lora.loraplus_lr_ratio) == (4, 1.0, "full", 16.0)
    assert lora.include_modules == "(?:lora_unet_.*attn)|(?:lora_te_.*)"
    assert (optimizer.optimizer, optimizer.lr_scheduler, optimizer.lr_warmup_steps) == ("adamw_schedulefree",
                                                                                          "constant", 50)
    assert (optimizer.betas, optimizer.weight_decay) == ((0.9, 0.99), 0.1)
    lycoris = validate_config({"network_module": "lycoris.kohya",
                               "network_args": "algo=lokr factor=8 preset=attn-mlp"})  # fmt: skip
    assert (lycoris.lora.network, lycoris.lora.lokr_factor, lycoris.lora.unet_targets) == ("lokr", 8, "attn-ff")
    assert validate_config({"network_args": ["block_dims=2,4,4"]}).lora.block_ranks == [2, 4, 4]
    assert validate_config({"conv_dim": 0, "network_dim": 8}).lora.conv_rank is None  # kohya_ss's "no convs"

    with pytest.raises(ConfigError) as refused:
        validate_config({"network_args": ["train_norm=True", "conv_dim=x"], "optimizer_args": ["growth_rate=2"]},
                        source="old.toml")  # fmt: skip
    assert refused.value.source == "old.toml" and len(refused.value.problems) == 3
    assert "`network_args` entry 'train_norm=True' is not a setting this app has; remove it" in str(refused.value)
    assert "`network_args` entry 'conv_dim=x': invalid literal" in str(refused.value)
    assert "`optimizer_args` entry 'growth_rate=2' is not a setting" in str(refused.value)
    with pytest.raises(ConfigError, match="`lora.network` = 'networks.dylora': input should be 'lora', 'loha' or"):
        validate_config({"network_module": "networks.dylora"})


def test_unknown_version_0_keys_are_reported_not_dropped():
    # (xformers, logging_dir and the like are known: they change no weights, test_kohya_configs)
    with pytest.raises(ConfigError, match="`network_fancy` is not a setting"):
        validate_config({"network_dim": 8, "network_fancy": True})


def test_unreadable_kohya_resolution_is_reported():
    with pytest.raises(ConfigError, match="`dataset.resolution` = 'big'"):
        validate_config({"resolution": "big"})


def test_newer_version_is_refused():
    with pytest.raises(ConfigError, match="`version` = 99"):
        validate_config({"version": 99})


def test_toml_leaves_out_unset_optionals():
    text = config_to_toml(TrainConfig())
    assert "\nunet_lr" not in text and "[lora]" in text


def test_min_snr_can_be_turned_off_from_toml():
    """TOML has no null, so 0 is how a preset or --set turns min-SNR weighting off."""
    from lora_studio.config import load_preset

    assert load_preset("demo-cpu", ["optimizer.min_snr_gamma=0"]).optimizer.min_snr_gamma == 0
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        load_preset("demo-cpu", ["optimizer.min_snr_gamma=-1"])


def test_the_caption_extension_is_an_extension_and_never_a_path():
    """The caption of `a.png` is `a` plus the extension: one that names another folder, or none, is refused as a
    setting with the field's name (it used to fail later, inside the dataset scan, with pathlib's 'Invalid suffix')."""
    assert load_preset("demo-cpu", ["dataset.caption_extension=caption"]).dataset.caption_extension == ".caption"
    assert load_preset("demo-cpu", ["dataset.caption_extension=.tags.txt"]).dataset.caption_extension == ".tags.txt"
    for bad in ("", ".", "/../../etc/passwd", ".txt/../x", "..", ".txt\\..\\x"):
        with pytest.raises(ConfigError, match="`dataset.caption_extension`.*is not a file extension"):
            load_preset("demo-cpu", [f"dataset.caption_extension={bad!r}".replace("'", '"')])


def test_sampling_is_bounded_by_the_images_it_renders():
    """prompts x seeds x strengths, where a prompt's own `--d` seed renders it once: 64 images pass, 72 do not."""
    eight_strengths = "sample.strengths=[0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]"
    eight_seeds = "sample.seeds=[1, 2, 3, 4, 5, 6, 7, 8]"
    at_cap = load_preset("demo-cpu", [eight_strengths, eight_seeds])
    assert at_cap.sample.images_per_sampling() == 64
    own_seeds = load_preset("demo-cpu", [eight_strengths, 'sample.prompts=["a --d 5", "b --d 6"]', eight_seeds])
    assert own_seeds.sample.images_per_sampling() == 16
    with pytest.raises(ConfigError, match=r"`sample`: 72 images at each sampling .* over the 64"):
        load_preset("demo-cpu", [eight_strengths, 'sample.prompts=["a", "b --d 5"]', eight_seeds])


def test_seeds_stay_in_the_range_torch_and_a1111_take():
    """A seed past 2^64 made torch raise "Overflow when unpacking long" at the first step (past 2^44, once the step's
    noise seed multiplied it): every seed is a setting in A1111's range, refused with its field's name."""
    assert load_preset("demo-cpu", ["seed=4294967295", "sample.seeds=[0, 4294967295]"]).seed == 2**32 - 1
    for override, field in (("seed=4294967296", "`seed`"), ("sample.seeds=[-1]", "`sample.seeds`"),
                            ("sample.seeds=[1, 18446744073709551616]", "`sample.seeds`")):  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            load_preset("demo-cpu", [override])


def test_no_number_is_infinite_or_nan():
    """An infinite learning rate or alpha (TOML takes `inf` and `nan`) only turns the loss into NaN a step later."""
    for override, field in (("optimizer.learning_rate=inf", "`optimizer.learning_rate`"),
                            ("lora.alpha=nan", "`lora.alpha`"),
                            ("optimizer.max_grad_norm=inf", "`optimizer.max_grad_norm`"),
                            ("sample.strengths=[1.0, nan]", "`sample.strengths.1`")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{field}.*finite number"):
            load_preset("demo-cpu", [override])


def test_texts_are_capped_and_a_long_value_is_shortened_in_the_message():
    """Every text setting (paths, prompt lines, trigger words) is at most 64 K characters, and the problem quotes the
    start of a long value with its length instead of all of it."""
    with pytest.raises(ConfigError) as info:
        load_preset("demo-cpu", [f'dataset.trigger_word="{"x" * 70_000}"', f'sample.prompts=["{"y" * 70_000}"]'])
    text = str(info.value)
    assert "`dataset.trigger_word` = 'xxxx" in text and "`sample.prompts.0` = 'yyyy" in text
    assert text.count("... (70,002 characters): string should have at most 65536 characters") == 2
    assert len(text) < 600
    assert len(load_preset("demo-cpu", [f'dataset.trigger_word="{"x" * 65_536}"']).dataset.trigger_word) == 65_536
