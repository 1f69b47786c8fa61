"""A person's own presets: saved from the form or the CLI, listed beside the bundled ones, deleted again; a name
cannot leave the folder or replace a bundled preset, and a foreign file there never stops anything."""

import pytest

from lora_studio.cli import main
from lora_studio.config import (
    bundled_presets,
    delete_user_preset,
    list_presets,
    load_config,
    load_preset,
    preset_description,
    save_user_preset,
    user_presets,
)
from lora_studio.errors import ConfigError, LoraStudioError
from lora_studio.paths import PRESETS_DIR, user_presets_dir


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_saved_preset_round_trips_and_is_listed_after_the_bundled_ones(home):
    config = load_preset("sd15-style", ["lora.rank=24", "dataset.trigger_word=zqx", "optimizer.learning_rate=3e-4"])
    path = save_user_preset(config, "my-style.v2", based_on="sd15-style")
    assert path == home / "user-presets" / "my-style.v2.toml" and path.parent == user_presets_dir()
    assert list_presets() == [*bundled_presets(), "my-style.v2"] and user_presets() == ["my-style.v2"]
    assert load_preset("my-style.v2") == config  # its runs keep their name (sd15-style)
    assert preset_description("my-style.v2").startswith("Your preset, saved ") and "sd15-style" in path.read_text()
    changed = config.model_copy(update={"seed": 7})
    save_user_preset(changed, "my-style.v2")  # one's own preset may be replaced
    assert load_preset("my-style.v2").seed == 7
    assert delete_user_preset("my-style.v2") == path and not path.exists() and user_presets() == []


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65, "spa ce", "demo-cpu", "sd15-style"])
def test_a_name_that_would_leave_the_folder_or_replace_a_bundled_preset_is_refused(home, name):
    bundled = {p.name: p.read_bytes() for p in PRESETS_DIR.glob("*.toml")}
    with pytest.raises(ConfigError, match="bundled preset has this name|use 1-64 letters"):
        save_user_preset(load_preset("demo-cpu"), name)
    assert {p.name: p.read_bytes() for p in PRESETS_DIR.glob("*.toml")} == bundled
    assert not (home / "evil.toml").exists() and not (home / "user-presets").exists()


def test_bundled_and_unknown_presets_cannot_be_deleted(home):
    with pytest.raises(ConfigError, match="bundled preset, which cannot be deleted"):
        delete_user_preset("demo-cpu")
    with pytest.raises(ConfigError, match="there is no"):
        delete_user_preset("../presets/demo-cpu")
    assert (PRESETS_DIR / "demo-cpu.toml").is_file()


def test_foreign_files_in_the_user_presets_folder_are_skipped_or_reported(home, tmp_path):
    folder = home / "user-presets"
    folder.mkdir(parents=True)
    (folder / "bad name!.toml").write_text('name = "x"\n')  # not a preset's name: not listed
    (folder / "demo-cpu.toml").write_text('name = "mine"\n')  # would hide the bundled one: not listed
    (folder / "folder.toml").mkdir()
    (tmp_path / "outside.toml").write_text('name = "outside"\n')
    (folder / "link.toml").symlink_to(tmp_path / "outside.toml")  # leads out of the folder: not listed
    (folder / "garbled.toml").write_bytes(b"# \xff\xfe not text\n")
    assert user_presets() == ["garbled"]
    assert preset_description("garbled") == "(cannot read this preset: UnicodeDecodeError)"
    with pytest.raises(LoraStudioError):
        load_preset("garbled")  # a clear error (a config error naming the file), nothing else
    assert load_preset("demo-cpu") == load_config(PRESETS_DIR / "demo-cpu.toml")  # the bundled one, not "mine"


def test_the_cli_saves_lists_and_deletes_them(home, capsys):
    assert main(["config", "demo-cpu", "--set", "lora.rank=8", "--save", "demo-r8"]) == 0
    assert "saved your preset demo-r8" in capsys.readouterr().out
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert "demo-r8" in listed and "(yours) Your preset, saved" in listed and "from the demo-cpu preset" in listed
    assert load_preset("demo-r8").lora.rank == 8
    assert main(["config", "demo-cpu", "--save", "../x"]) == 1
    assert "use 1-64 letters" in capsys.readouterr().err
    assert main(["presets", "--delete", "demo-r8"]) == 0 and user_presets() == []
    assert main(["presets", "--delete", "sd15-style"]) == 1


def test_the_train_tab_saves_the_form_as_a_preset_and_deletes_it(app_state):
    from test_train_tab import form

    from lora_studio.ui import train_tab

    picker, message = train_tab.save_preset("mine", "demo-cpu", *form(lora__rank=6, seed=11))
    assert picker["value"] == "mine" and "mine" in picker["choices"] and "Saved your preset **mine**" in message
    saved = load_preset("mine")
    assert saved.lora.rank == 6 and saved.seed == 11 and saved.name == "demo"  # the runs' name, not the preset's
    assert train_tab.preset_values("mine") == form(lora__rank=6, seed=11)
    with pytest.raises(LoraStudioError, match="not one of your presets"):
        train_tab.delete_preset("demo-cpu")
    picker, message = train_tab.delete_preset("mine")
    assert picker["value"] == "demo-cpu" and "mine" not in picker["choices"] and "Deleted your preset mine" in message
