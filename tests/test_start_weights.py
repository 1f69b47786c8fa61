"""A run started from a LoRA file (`lora.network_weights`, kohya's --network_weights) on a tiny seeded model: it
begins exactly where the file is (also under another alpha), layers the file lacks start at zero, a resume needs
the file no more, and every file that cannot start the run is refused with what to change, before a model loads."""

import pytest
import torch
from test_train import stopper, tiny_config
from test_validation import make_images

from lora_studio.config import ConfigError, validate_config
from lora_studio.lora_file import lora_from_models
from lora_studio.lora_read import load_lora
from lora_studio.session import trained_models
from lora_studio.train import TrainingError, prepare, run_training


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("train"), 4)


@pytest.fixture(scope="module")
def unet_only_file(tmp_path_factory, tiny_folders, images):
    """A trained rank-4 LoRA of the UNet only (alpha 4), saved in fp32."""
    tmp = tmp_path_factory.mktemp("first")
    config = tiny_config(tmp, tiny_folders, images, lora={"train_text_encoder": False},
                         optimizer={"max_train_steps": 4})  # fmt: skip
    return run_training(config).lora_path


def deltas(lora) -> dict[str, torch.Tensor]:
    return {name: module.delta() for name, module in lora.modules.items()}


def test_a_run_starts_exactly_where_the_file_is_and_trains_on(tmp_path, tiny_folders, images, unet_only_file):
    started = {"network_weights": str(unet_only_file), "alpha": 1.0}  # another alpha: the scale is folded in
    session = prepare(tiny_config(tmp_path, tiny_folders, images, lora=started))
    now = lora_from_models(trained_models(session), session.base.family, session.base.unet.config)
    before = deltas(load_lora(unet_only_file))
    assert set(before) < set(now.modules)
    for name, delta in before.items():
        assert delta.abs().max() > 0
        assert torch.allclose(now.modules[name].delta(), delta, atol=1e-7, rtol=1e-5), name
    fresh = [m for n, m in now.modules.items() if n not in before]
    assert fresh and all(m.up.abs().max() == 0 for m in fresh), "the text encoder's layers start at zero"
    assert all(n.startswith("lora_te") for n in now.modules if n not in before)

    done = run_training(tiny_config(tmp_path / "b", tiny_folders, images, lora=started,
                                    optimizer={"max_train_steps": 3}))  # fmt: skip
    after = deltas(load_lora(done.lora_path))
    assert any(not torch.allclose(after[n], before[n]) for n in before), "training went on from the file"
    assert any(after[n].abs().max() > 0 for n in after if n not in before)


def test_a_resume_needs_the_file_no_more(tmp_path, tiny_folders, images, unet_only_file):
    copy = tmp_path / "start.safetensors"
    copy.write_bytes(unet_only_file.read_bytes())
    commands, stop_at_5 = stopper(5)
    config = tiny_config(tmp_path, tiny_folders, images, lora={"network_weights": str(copy)})
    stopped = run_training(config, on_event=stop_at_5, commands=commands)
    copy.unlink()  # moved away after the run began: the saved state holds the weights
    assert run_training(config, resume_from=stopped.run_dir).step == 8


def test_files_that_cannot_start_the_run_are_refused_before_a_model_loads(tmp_path, tiny_folders, images,
                                                                           unet_only_file):
    def refused(lora: dict, phrase: str, folder: str) -> None:
        config = tiny_config(tmp_path / folder, tiny_folders, images, lora=lora)
        with pytest.raises(TrainingError, match=phrase):
            run_training(config)

    refused({"network_weights": str(tmp_path / "nothing.safetensors")},
            r"lora.network_weights: .*nothing.safetensors is not a file", "missing")  # fmt: skip
    assert not (tmp_path / "missing" / "runs").exists(), "refused before the run folder was made"
    refused({"network_weights": str(unet_only_file), "rank": 8},
            r"has rank 4, but this run trains it at rank 8; set lora.rank .* `lora-studio resize`", "rank")
    whole = run_training(tiny_config(tmp_path / "whole", tiny_folders, images, optimizer={"max_train_steps": 1}))
    refused({"network_weights": str(whole.lora_path), "train_text_encoder": False},
            r"modules of .* are layers these settings do not train \(e.g. lora_te_.*turn lora.train_text_encoder on",
            "lost")  # fmt: skip
    loha = run_training(tiny_config(tmp_path / "loha", tiny_folders, images, lora={"network": "loha"},
                                    optimizer={"max_train_steps": 1}))  # fmt: skip
    refused({"network_weights": str(loha.lora_path)}, r"is a loha \(LyCORIS\) file; only a plain LoRA", "lyco")
    sd2 = tiny_config(tmp_path / "sd2", tiny_folders, images, base_model=str(tiny_folders["sd2"]), family="sd2",
                      lora={"network_weights": str(unet_only_file)})  # fmt: skip
    with pytest.raises(TrainingError, match="lora.network_weights: .*SD 1.x LoRA but the base model"):
        run_training(sd2)


def test_the_config_refuses_a_starting_file_for_other_networks():
    with pytest.raises(ConfigError, match="network_weights starts a plain LoRA from a file; network = 'lokr'"):
        validate_config({"version": 1, "lora": {"network": "lokr", "network_weights": "x.safetensors"}})
    with pytest.raises(ConfigError, match="network_weights starts a plain LoRA from a file; use_dora"):
        validate_config({"version": 1, "lora": {"use_dora": True, "network_weights": "x.safetensors"}})
    assert validate_config({"network_weights": "x.safetensors"}).lora.network_weights == "x.safetensors"  # kohya


def test_rank_from_weights_trains_at_the_files_rank_and_records_it(tmp_path, tiny_folders, images, unet_only_file):
    """kohya's dim_from_weights: the rank-4 file starts a run whose lora.rank says 16; the run trains at rank 4,
    starts where the file is, records rank 4, and resumes from that record."""
    from lora_studio.config import load_config
    from lora_studio.runs import RunFolder

    started = {"network_weights": str(unet_only_file), "rank": 16, "rank_from_weights": True}
    session = prepare(tiny_config(tmp_path / "a", tiny_folders, images, lora=started))
    assert session.config.lora.rank == 4
    now = lora_from_models(trained_models(session), session.base.family, session.base.unet.config)
    for name, delta in deltas(load_lora(unet_only_file)).items():
        assert torch.allclose(now.modules[name].delta(), delta, atol=1e-7, rtol=1e-5), name
    assert load_config(RunFolder(session.run.path).config).lora.rank == 4
    session.lock.release()
    commands, stop_at_5 = stopper(5)
    stopped = run_training(tiny_config(tmp_path / "b", tiny_folders, images, lora=started), on_event=stop_at_5,
                           commands=commands)  # fmt: skip
    recorded = load_config(RunFolder(stopped.run_dir).config)
    assert run_training(recorded, resume_from=stopped.run_dir).step == 8
    with pytest.raises(ConfigError, match="rank_from_weights takes the rank of the file network_weights names"):
        validate_config({"version": 1, "lora": {"rank_from_weights": True}})
    kohya = validate_config({"network_weights": "x.safetensors", "dim_from_weights": True})
    assert kohya.lora.rank_from_weights


def test_rank_from_weights_reads_the_conv_rank_and_refuses_a_file_of_several_ranks():
    from pathlib import Path

    from lora_studio.lora_file import LoraFile, LoraModule
    from lora_studio.start_weights import with_file_ranks

    def module(rank: int, kernel: int | None = None) -> LoraModule:
        down = torch.zeros(rank, 8) if kernel is None else torch.zeros(rank, 8, kernel, kernel)
        return LoraModule(down=down, up=torch.zeros(8, rank) if kernel is None else torch.zeros(8, rank, 1, 1),
                          alpha=float(rank))  # fmt: skip
    config = validate_config({"version": 1, "lora": {"network_weights": "x.safetensors", "rank_from_weights": True}})
    locon = LoraFile({"lora_unet_a": module(8), "lora_unet_b": module(8, kernel=1), "lora_unet_c": module(2, 3)},
                     path=Path("locon.safetensors"))  # fmt: skip
    taken = with_file_ranks(config, locon).lora
    assert (taken.rank, taken.conv_rank, taken.unet_targets) == (8, 2, "full")  # a 1x1 conv is a layer's rank
    resized = LoraFile({"lora_unet_a": module(8), "lora_unet_b": module(4)}, path=Path("resized.safetensors"))
    with pytest.raises(TrainingError, match=r"the layers of resized.safetensors have several ranks \(4 "
                                            r"\(lora_unet_b\), 8 \(lora_unet_a\), \.\.\.\)"):  # fmt: skip
        with_file_ranks(config, resized)
