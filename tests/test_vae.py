"""A VAE of the person's own (`vae`, kohya's --vae) on tiny seeded models: every form people have one in loads with
its exact weights, training encodes with it and says so in the file's metadata, and a file that is not a VAE of the
model's shape is refused naming it."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_train import tiny_config
from test_validation import make_images
from tiny_models import tiny_vae

from lora_studio.cache import encode_pixels, must_upcast, plan_latent_entries
from lora_studio.config import validate_config
from lora_studio.errors import ModelLoadError
from lora_studio.layout import VAE_PREFIX, vae_to_ldm
from lora_studio.models import load_base
from lora_studio.sample import read_parameters
from lora_studio.train import prepare, run_training


@pytest.fixture(scope="module")
def own_vae():
    """A VAE of the tiny models' shape with weights of its own (another seed), in fp32."""
    torch.manual_seed(1234)
    vae = tiny_vae()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)  # norms too: nothing left at its initial value
    return vae


def weights(vae) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


def write_forms(vae, folder) -> dict:
    """The VAE as people have it: A1111's layout alone and inside a checkpoint's prefix, diffusers' keys in one
    file, and a diffusers VAE folder."""
    folder.mkdir(parents=True, exist_ok=True)
    ldm = vae_to_ldm(weights(vae), vae.config)
    forms = {
        "ldm file": folder / "vae-ldm.safetensors",
        "checkpoint prefix": folder / "vae-prefixed.safetensors",
        "diffusers file": folder / "diffusion_pytorch_model.safetensors",
        "diffusers folder": folder / "folder",
    }
    save_file({k[len(VAE_PREFIX):]: v for k, v in ldm.items()}, forms["ldm file"])
    save_file(ldm, forms["checkpoint prefix"])
    save_file(weights(vae), forms["diffusers file"])
    vae.save_pretrained(forms["diffusers folder"])
    return forms


@pytest.fixture(scope="module")
def forms(own_vae, tmp_path_factory):
    return write_forms(own_vae, tmp_path_factory.mktemp("vaes"))


@pytest.mark.parametrize("form", ["ldm file", "checkpoint prefix", "diffusers file", "diffusers folder"])
def test_a_vae_in_every_form_replaces_the_model_s_own_with_its_exact_weights(tiny_folders, own_vae, forms, form):
    plain = load_base(tiny_folders["sd1"], device="cpu")
    base = load_base(tiny_folders["sd1"], device="cpu", vae=str(forms[form]))
    mine, expected = base.vae.state_dict(), weights(own_vae)
    assert set(mine) == set(expected)
    assert all(torch.equal(mine[k].reshape(expected[k].shape), expected[k]) for k in expected), form
    assert any(not torch.equal(plain.vae.state_dict()[k], mine[k]) for k in mine), "the base's own VAE differs"
    assert base.vae_source == str(forms[form]) and plain.vae_source == ""
    assert base.vae.config.scaling_factor == plain.vae.config.scaling_factor
    assert not any(p.requires_grad for p in base.vae.parameters()) and not base.vae.training
    assert all(torch.equal(a, b) for a, b in zip(plain.unet.state_dict().values(), base.unet.state_dict().values(),
                                                 strict=True)), "only the VAE is swapped"  # fmt: skip
    assert base.pipeline.vae is base.vae


def test_a_model_folder_gives_its_vae_and_a_half_precision_model_a_half_precision_vae(tiny_folders):
    other = load_base(tiny_folders["sdxl"], device="cpu")
    base = load_base(tiny_folders["sd1"], dtype=torch.float16, device="cpu", vae=str(tiny_folders["sdxl"]))
    assert base.vae.dtype == torch.float16
    theirs = other.vae.state_dict()
    assert all(torch.equal(v, theirs[k].half()) for k, v in base.vae.state_dict().items())


def test_a_fixed_fp16_vae_folder_keeps_its_no_upcast_and_the_base_model_s_scale(tiny_folders, own_vae, tmp_path):
    """madebyollin's sdxl-vae-fp16-fix says `force_upcast: false` in its config: it encodes in fp16 as it is. Its
    scaling factor, where it differs, gives way to the base model's, which the UNet learned."""
    folder = tmp_path / "fp16-fix"
    own_vae.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"force_upcast": False, "scaling_factor": 0.5}))
    plain = load_base(tiny_folders["sd1"], dtype=torch.float16, device="cpu")
    assert must_upcast(plain.vae), "the tiny models' own VAE asks for the upcast (diffusers' default)"
    base = load_base(tiny_folders["sd1"], dtype=torch.float16, device="cpu", vae=str(folder))
    assert not must_upcast(base.vae)
    assert base.vae.config.scaling_factor == plain.vae.config.scaling_factor != 0.5
    file_based = load_base(tiny_folders["sd1"], dtype=torch.float16, device="cpu",
                           vae=str(folder / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    assert must_upcast(file_based.vae), "a file alone has no config: it gets the base model's, which upcasts"


def refusal(tiny_folders, vae) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_base(tiny_folders["sd1"], device="cpu", vae=str(vae))
    return str(caught.value)


def test_what_is_not_a_vae_of_the_model_s_shape_is_refused_naming_it(tiny_folders, own_vae, tmp_path):
    assert "was not found" in refusal(tiny_folders, tmp_path / "gone.safetensors")

    pickle = tmp_path / "vae.ckpt"
    torch.save(weights(own_vae), pickle)
    message = refusal(tiny_folders, pickle)
    assert str(pickle) in message and "pickle" in message and ".safetensors" in message

    lora = tmp_path / "a-lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, lora)
    message = refusal(tiny_folders, lora)
    assert str(lora) in message and "no VAE weights" in message

    partial = tmp_path / "partial.safetensors"
    everything = weights(own_vae)
    save_file({k: v for k, v in everything.items() if not k.startswith("decoder.up_blocks.1.")}, partial)
    message = refusal(tiny_folders, partial)
    assert str(partial) in message and "holds 106 of the 124 weights" in message

    wide = tiny_vae().__class__(**{**dict(own_vae.config), "latent_channels": 8})
    save_file(weights(wide), tmp_path / "wide.safetensors")
    message = refusal(tiny_folders, tmp_path / "wide.safetensors")
    assert "wide.safetensors" in message and "does not fit" in message
    wide.save_pretrained(tmp_path / "wide")
    message = refusal(tiny_folders, tmp_path / "wide")
    assert "8 channels" in message and "4 channels" in message

    (tmp_path / "empty").mkdir()
    assert "no config.json" in refusal(tiny_folders, tmp_path / "empty")
    message = refusal(tiny_folders, tiny_folders["sd1"] / "unet")
    assert "not an AutoencoderKL" in message and "unet" in message


def test_training_encodes_with_the_vae_and_its_file_says_which(tmp_path, tiny_folders, own_vae, forms):
    images = make_images(tmp_path / "images", 4)
    vae_file = forms["ldm file"]
    plain = prepare(tiny_config(tmp_path / "a", tiny_folders, images))
    own = prepare(tiny_config(tmp_path / "b", tiny_folders, images, vae=str(vae_file)))
    item, entry = own.report.items[0], plan_latent_entries(own.report.items, own.buckets, own.config.dataset)[0]
    cached, before = own.latent_cache.get(item, entry), plain.latent_cache.get(item, entry)
    mean, _ = encode_pixels(own_vae, own.latent_cache.pixels(item, entry)[None])
    assert torch.allclose(cached["mean"], mean[0], atol=1e-5)
    assert not torch.allclose(cached["mean"], before["mean"], atol=1e-3)

    done = run_training(tiny_config(tmp_path / "c", tiny_folders, images, vae=str(vae_file),
                                    optimizer={"max_train_steps": 2},
                                    sample={"every_n_steps": 2, "num_inference_steps": 2, "width": 32, "height": 32,
                                            "strengths": [1.0]}))  # fmt: skip
    (sampled,) = (done.run_dir / "samples" / "step-000002").glob("*.png")
    assert read_parameters(sampled)["VAE"] == vae_file.name
    with safe_open(str(done.lora_path), "pt") as file:
        metadata = file.metadata()
    data = vae_file.read_bytes()
    assert metadata["ss_vae_name"] == vae_file.name
    assert metadata["ss_new_vae_hash"] == hashlib.sha256(data).hexdigest()
    assert metadata["ss_vae_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    without = run_training(tiny_config(tmp_path / "d", tiny_folders, images, optimizer={"max_train_steps": 1}))
    with safe_open(str(without.lora_path), "pt") as file:
        assert "ss_vae_name" not in file.metadata()


def test_kohya_configs_bring_their_vae(tmp_path):
    flat = validate_config({"pretrained_model_name_or_path": "demo", "train_data_dir": "demo",
                            "vae": "/models/sdxl_vae.safetensors"})  # fmt: skip
    assert flat.vae == "/models/sdxl_vae.safetensors"
    gui = validate_config({"pretrained_model_name_or_path": "demo", "train_data_dir": "demo", "vae": "",
                           "LoRA_type": "Standard"})  # fmt: skip
    assert gui.vae == ""


def test_previews_follow_the_run_s_vae_and_render_with_it(tmp_path, tiny_folders, own_vae, forms, capsys):
    """The Preview tab and `lora-studio sample` take the VAE a LoRA's run trained with, as they take its base model:
    the image is the one the base renders with that VAE, not with its own."""
    import shutil

    import numpy as np

    from lora_studio.cli import main
    from lora_studio.paths import Roots
    from lora_studio.ui import preview_tab
    from lora_studio.ui.state import AppState
    from lora_studio.workflows import preview_defaults

    images = make_images(tmp_path / "images", 4)
    vae_file = Path(shutil.copytree(forms["diffusers folder"], tmp_path / "models" / "my-vae"))
    done = run_training(tiny_config(tmp_path, tiny_folders, images, vae=str(vae_file),
                                    optimizer={"max_train_steps": 1}))  # fmt: skip
    assert preview_defaults(done.lora_path).vae == str(vae_file)

    app = AppState(Roots(tmp_path / "runs", tmp_path / "datasets", tmp_path / "models",
                         extra=(tiny_folders["sd1"].parent.resolve(),)))  # fmt: skip
    *updates, _ = preview_tab.follow_lora(app, [str(done.lora_path)], None)
    followed = dict(zip(preview_tab.FOLLOWED, (u.get("value") for u in updates), strict=True))
    assert followed["vae"] == str(vae_file) and followed["base_model"] == str(tiny_folders["sd1"])

    common = ("zkz, a thing", "", "ddim", 2, 5.0, 1, 3, 32, 32)
    lora = [str(done.lora_path)]
    with_vae, text = preview_tab.generate(app, str(tiny_folders["sd1"]), followed["vae"], lora, *common, 1.0)
    own, _ = preview_tab.generate(app, str(tiny_folders["sd1"]), "", lora, *common, 1.0)
    assert np.abs(np.asarray(with_vae, dtype=np.int16) - np.asarray(own, dtype=np.int16)).max() > 10
    assert "Model: sd1, VAE: my-vae," in text  # A1111's infotext names it
    base = load_base(tiny_folders["sd1"], device="cpu", vae=str(vae_file))
    assert all(torch.equal(a, b) for a, b in zip(app.previewer(str(tiny_folders["sd1"]), str(vae_file)).base.vae
                                                 .state_dict().values(), base.vae.state_dict().values(), strict=True))

    out = tmp_path / "sampled.png"
    assert main(["sample", "--lora", str(done.lora_path), "--prompt", "zkz, a thing", "--steps", "2",
                 "--sampler", "ddim", "--seed", "3", "--width", "32", "--height", "32", "--out", str(out)]) == 0
    assert f"VAE {vae_file}" in capsys.readouterr().out
    own_out = tmp_path / "own.png"
    assert main(["sample", "--lora", str(done.lora_path), "--prompt", "zkz, a thing", "--steps", "2", "--vae", "",
                 "--sampler", "ddim", "--seed", "3", "--width", "32", "--height", "32", "--out", str(own_out)]) == 0
    assert "VAE" not in capsys.readouterr().out
    from PIL import Image

    assert np.asarray(Image.open(out)).tobytes() != np.asarray(Image.open(own_out)).tobytes()


def test_the_preview_and_the_train_form_list_the_models_folders_vae_files(tmp_path, tiny_folders, own_vae, forms,
                                                                          monkeypatch):
    """VAE files in the models folder and its VAE/ subfolder (A1111's place for them) are choices, told from
    checkpoints, LoRAs and damaged files by their headers; the base model's own VAE comes first. The Train form's
    `vae` picker lists them too, and reading the folder again keeps what was picked or typed."""
    import shutil

    from lora_studio.paths import Roots
    from lora_studio.ui import preview_tab, train_tab
    from lora_studio.ui.state import AppState

    models = tmp_path / "models"
    (models / "VAE").mkdir(parents=True)
    monkeypatch.setenv("LORA_STUDIO_MODELS", str(models))
    shutil.copy(forms["ldm file"], models / "VAE" / "sharp.safetensors")
    shutil.copy(forms["checkpoint prefix"], models / "prefixed-vae.safetensors")
    save_file({"model.diffusion_model.x": torch.zeros(1), "first_stage_model.encoder.conv_in.weight": torch.zeros(1)},
              str(models / "a-checkpoint.safetensors"))  # fmt: skip
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(models / "a-lora.safetensors"))
    (models / "damaged.safetensors").write_bytes(b"not a header")
    choices = train_tab.vae_choices()
    prefixed, sharp = models / "prefixed-vae.safetensors", models / "VAE" / "sharp.safetensors"
    assert choices == [(train_tab.OWN_VAE, ""), (prefixed.name, str(prefixed)), (sharp.name, str(sharp))]
    app = AppState(Roots(tmp_path / "runs", tmp_path / "datasets", models))
    assert preview_tab.refresh_lists(app)[2].choices == choices
    typed = str(tmp_path / "elsewhere" / "my-vae.safetensors")
    base, vae, _, _ = train_tab.refresh_models("demo", typed)
    assert vae["choices"] == choices and vae["value"] == typed and base["value"] == "demo"
    (models / "VAE" / "sharp.safetensors").unlink()
    assert train_tab.refresh_models("demo", str(sharp))[1]["choices"] == choices[:2]
