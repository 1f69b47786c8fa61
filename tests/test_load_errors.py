"""Bad base-model input gets one clear sentence naming the file, what is wrong and what to do."""

import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_single_file import assert_same_weights

from lora_studio.catalogue import describe_source
from lora_studio.errors import ModelLoadError
from lora_studio.models import load_base
from lora_studio.tools import save_single_file, to_ldm_state_dict


@pytest.fixture(scope="module")
def sd1_single_file(tiny_folders, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    save_single_file(load_base(tiny_folders["sd1"], device="cpu"), path)
    return path


def expect_error(source, *fragments, **kwargs):
    with pytest.raises(ModelLoadError) as info:
        load_base(source, device="cpu", **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "nope.safetensors", "was not found", "give the path")


def test_non_safetensors_file(tmp_path):
    path = tmp_path / "photo.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    expect_error(path, str(path), "is not a safetensors file", "give a .safetensors checkpoint")


def test_empty_file(tmp_path):
    path = tmp_path / "zero.safetensors"
    path.touch()
    expect_error(path, "zero.safetensors", "is empty (0 bytes)", "copy it again")


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some notes, not a model")
    expect_error(path, "notes.txt", "is not a safetensors file")


def test_truncated_safetensors(sd1_single_file, tmp_path):
    data = sd1_single_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    message = expect_error(cut, "cut.safetensors", "is truncated", "copy the file again")
    assert f"{len(data):,}" in message and f"{len(data) - 1000:,}" in message


def test_lora_file_given_as_base(tmp_path):
    path = tmp_path / "my_lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    expect_error(path, "my_lora.safetensors", "is a LoRA adapter", "load this file as an adapter")


def test_peft_lora_file_given_as_base(tmp_path):
    path = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}, str(path))
    expect_error(path, "is a LoRA adapter")


@pytest.mark.parametrize(
    "key, what",
    [
        ("foo.bar.weight", "not a Stable Diffusion checkpoint"),
        ("double_blocks.0.img_attn.qkv.weight", "a Flux model"),
        ("joint_blocks.0.x_block.attn.qkv.weight", "an SD3 model"),
        ("down_blocks.0.resnets.0.conv1.weight", "a diffusers-format UNet"),
    ],
)
def test_unknown_architecture(tmp_path, key, what):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(path))
    expect_error(path, "other.safetensors", what, "give an SD 1.x, SD 2.x or SDXL checkpoint")


def test_a_vae_given_as_base_says_where_it_goes(tmp_path):
    path = tmp_path / "sdxl_vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(2, 2)}, str(path))
    expect_error(path, "sdxl_vae.safetensors", "a VAE on its own", "give an SD 1.x, SD 2.x or SDXL checkpoint",
                 "as its `vae`")


def test_unet_without_text_encoder(sd1_single_file, tmp_path):
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(sd1_single_file)).items() if k.startswith("model.diffusion_model.")}
    path = tmp_path / "unet-only.safetensors"
    save_file(state, str(path))
    expect_error(path, "unet-only.safetensors", "no text encoder", "use the complete model file")


def test_inpainting_unet_is_refused(tmp_path):
    path = tmp_path / "inpaint.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32),
        },
        str(path),
    )
    expect_error(path, "inpaint.safetensors", "9-channel UNet")


def test_sdxl_refiner_is_refused(tmp_path):
    path = tmp_path / "refiner.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
            "conditioner.embedders.0.model.text_projection": torch.zeros(8, 8),
        },
        str(path),
    )
    expect_error(path, "SDXL refiner")


def test_pickle_checkpoint_refused_by_default(tiny_folders, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": to_ldm_state_dict(load_base(tiny_folders["sd1"], device="cpu"))}, path)
    expect_error(path, "old.ckpt", "pickle", "refused", "convert it to .safetensors")


def test_pickle_checkpoint_loads_when_allowed(tiny_folders, tmp_path):
    base = load_base(tiny_folders["sd1"], device="cpu")
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {k: v.clone() for k, v in to_ldm_state_dict(base).items()}}, path)
    back = load_base(path, device="cpu", config=tiny_folders["sd1"], allow_pickle=True)
    assert back.family == "sd1"
    assert_same_weights(base, back)


class RunsCode:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_not_executed_even_when_allowed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": RunsCode(marker)}}, f)
    expect_error(path, "evil.ckpt", "could not be read as a weights-only checkpoint", allow_pickle=True)
    assert not marker.exists()


def test_incomplete_diffusers_folder(tiny_folders, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_folders["sd1"], folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    expect_error(folder, "partial", "missing unet/*.safetensors")


def test_folder_without_model_index(tmp_path):
    expect_error(tmp_path, "missing model_index.json", "give the folder that holds model_index.json")


def test_demo_missing_says_so(monkeypatch, tmp_path):
    import lora_studio.models as models

    monkeypatch.setattr(models, "DEMO_MODEL_DIR", tmp_path / "demo-model")
    expect_error("demo", "demo model is missing", "give the path to a checkpoint")


def test_describe_source_reads_headers_only(sd1_single_file, tiny_folders):
    assert describe_source(sd1_single_file).family == "sd1"
    summary = describe_source(tiny_folders["sd2-v"])
    assert (summary.kind, summary.family, summary.prediction_type) == ("diffusers folder", "sd2-v", "v_prediction")


# --- hub ids: only from the local cache ----------------------------------------------------------


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_cache(cache, repo_id, folder):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_id_not_in_cache(hub_cache):
    message = expect_error("someone/sd-model", "'someone/sd-model' is neither a file or folder here nor a model in")
    assert "model_index.json" in message and str(hub_cache) in message and "give its path" in message


def test_hub_id_in_cache_loads(hub_cache, tiny_folders):
    put_in_cache(hub_cache, "someone/tiny-sd2", tiny_folders["sd2"])
    base = load_base("someone/tiny-sd2", device="cpu")
    assert base.family == "sd2" and base.source == "someone/tiny-sd2"
    assert describe_source("someone/tiny-sd2").kind == "hub cache"


def test_hub_id_partly_in_cache_names_missing_files(hub_cache, tiny_folders):
    snapshot = put_in_cache(hub_cache, "someone/partial", tiny_folders["sd1"])
    shutil.rmtree(snapshot / "vae")
    expect_error("someone/partial", "only partly in the local Hugging Face cache", "vae/config.json")
