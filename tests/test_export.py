"""LoRA files: kohya export with metadata and hashes, the diffusers option, import of any format, and errors."""

import hashlib
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from packaging.version import Version
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from test_train import tiny_config
from tiny_models import caption_images
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_studio import export, lora_file, lora_read, outputs
from lora_studio import session as session_module
from lora_studio import step as step_module
from lora_studio import train as train_module
from lora_studio.config import LoraConfig
from lora_studio.fsutil import WriteError
from lora_studio.lora import text_encoder_target_names, unet_target_names
from lora_studio.lora_file import LoraFileError, kohya_name, lora_from_models
from lora_studio.lora_read import load_lora
from lora_studio.models import load_base
from lora_studio.paths import sd_config_dir
from lora_studio.sample import render, use_sampler

KOHYA_COUNTS = {"sd1": {"attn": 128, "attn-ff": 192, "full": 242}, "sdxl": {"attn": 560, "attn-ff": 722, "full": 760}}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return caption_images(tmp_path_factory.mktemp("data"))


def trained_session(tmp_path, tiny_folders, images, family="sd1", steps=4, **sections):
    """A tiny model after a few steps of a fast learning rate, so every LoRA B has moved off zero."""
    sections.setdefault("lora", {"rank": 4, "alpha": 2.0})
    config = tiny_config(
        tmp_path,
        tiny_folders,
        images,
        base_model=str(tiny_folders[family]),
        optimizer={"max_train_steps": steps, "learning_rate": 3e-2, "text_encoder_lr": 3e-2},
        **sections,
    )
    session = train_module.prepare(config)
    for _ in range(steps):
        step_module.training_step(session, [0, 1])
        session.step += 1
    return session


def trained_file(tmp_path_factory, tiny_folders, images, family, lora):
    tmp = tmp_path_factory.mktemp(family)
    session = trained_session(tmp, tiny_folders, images, family, lora=lora)
    return session, outputs.save_lora_file(session, tmp / f"{family}.safetensors")


@pytest.fixture(scope="module")
def sd1_full(tmp_path_factory, tiny_folders, images):
    """SD1-structured, the `full` preset: 1x1-conv proj_in/out and 3x3 LoCon convs, conv alpha != linear alpha."""
    lora = {"rank": 4, "alpha": 2.0, "unet_targets": "full", "conv_rank": 2, "conv_alpha": 1.0}
    return trained_file(tmp_path_factory, tiny_folders, images, "sd1", lora)


@pytest.fixture(scope="module")
def sdxl_attn_ff(tmp_path_factory, tiny_folders, images):
    return trained_file(tmp_path_factory, tiny_folders, images, "sdxl", {"rank": 4, "alpha": 8.0})


@pytest.fixture(scope="module")
def sd2v_attn_ff(tmp_path_factory, tiny_folders, images):
    """SD2 768-v structure: linear proj_in/out, a v-prediction base."""
    return trained_file(tmp_path_factory, tiny_folders, images, "sd2-v", {"rank": 4, "alpha": 4.0})


def session_parts(session):
    return session_module.trained_models(session)


# --- key names on the real architectures ---------------------------------------------------------------------


def full_size_models(family):
    config_dir = sd_config_dir(family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))}
        if family == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2")
            )
    return unet, encoders


def diffusers_reading(names, family, unet_config):
    """Run diffusers' own kohya key conversion over our names; returns its output keys (an independent reader)."""
    state = {}
    for name in names:
        state[f"{name}.lora_down.weight"] = torch.zeros(1, 1)
        state[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    if family == "sdxl":
        state = _maybe_map_sgm_blocks_to_diffusers(state, unet_config)
    converted, _alphas = _convert_non_diffusers_lora_to_diffusers(state)
    return converted


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", ["attn", "attn-ff", "full"])
def test_every_written_name_maps_to_a_real_module(family, preset):
    unet, encoders = full_size_models(family)
    unet_paths = unet_target_names(unet, preset)
    names = [kohya_name("unet", p, family, unet.config) for p in unet_paths]
    te_targets = LoraConfig().text_encoder_targets
    te_paths = [(part, p) for part, e in encoders.items() for p in text_encoder_target_names(e, te_targets)]
    te_names = [kohya_name(part, p, family) for part, p in te_paths]
    assert len(names) == KOHYA_COUNTS[family][preset]
    assert len(te_names) == (264 if family == "sdxl" else 72)
    assert len(set(names + te_names)) == len(names) + len(te_names)

    if family == "sdxl":  # SGM block names, as kohya writes them
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in names
        assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q" in names
        assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
        assert {n.split("_text_model_")[0] for n in te_names} == {"lora_te1", "lora_te2"}
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in te_names)
    assert all("_text_model_encoder_layers_" in n for n in te_names)  # never the flat transformers-5 spelling

    # diffusers' reader turns every name back into a module that exists in the real model.
    converted = diffusers_reading(names + te_names, family, unet.config)
    modules = {"unet": dict(unet.named_modules())}
    modules |= {part: dict(e.named_modules()) for part, e in encoders.items()}
    found = set()
    for part in modules:
        prefix = f"{part}."
        ours = {k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)}
        convert = convert_unet_state_dict_to_peft if part == "unet" else convert_state_dict_to_peft
        peft_keys = convert(ours)
        for key in peft_keys:
            path = key.split(".lora_")[0]
            target = modules[part].get(path) or modules[part].get(path.removeprefix("text_model."))
            assert isinstance(target, torch.nn.Linear | torch.nn.Conv2d), f"{part}: {key}"
            found.add((part, path))
    assert len(found) == len(names) + len(te_names)


# --- the kohya file ---------------------------------------------------------------------------------------------


def read_file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_kohya_file_keys_alphas_and_conv_shapes(sd1_full):
    session, path = sd1_full
    tensors, metadata = read_file(path)
    assert all(k.startswith(lora_file.KOHYA_PREFIXES) for k in tensors)
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    assert all(f"{m}.alpha" in tensors for m in modules)
    injected = sum(isinstance(m, LoraLayer) for part in session_parts(session).values() for m in part.modules())
    assert len(modules) == injected
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tensors[f"{proj_in}.lora_down.weight"].shape == (4, 32, 1, 1)  # SD1's 1x1 conv keeps conv shapes
    locon = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{locon}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{locon}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert tensors[f"{locon}.alpha"].item() == 1.0  # conv alpha
    assert tensors[f"{proj_in}.alpha"].item() == 2.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_adapter_metadata" not in metadata


def test_metadata_is_strings_with_kohya_and_modelspec_keys(sd1_full):
    _session, path = sd1_full
    _tensors, metadata = read_file(path)
    assert all(isinstance(v, str) for v in metadata.values())
    for key in ("ss_output_name", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_resolution",
                "ss_clip_skip", "ss_num_train_images", "ss_num_epochs", "ss_steps", "ss_learning_rate",
                "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler", "ss_seed",
                "ss_mixed_precision", "ss_training_started_at", "ss_training_finished_at", "ss_dataset_dirs",
                "ss_bucket_info", "ss_sd_model_name", "ss_network_module", "modelspec.title",
                "modelspec.date", "modelspec.resolution", "modelspec.encoder_layer",
                "modelspec.description"):  # fmt: skip
        assert key in metadata, key
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"  # kohya writes str(float)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert metadata["ss_steps"] == "4" and metadata["ss_num_train_images"] == "4"
    frequency = json.loads(metadata["ss_tag_frequency"])
    assert frequency[next(iter(frequency))]["a thing"] == 4
    # Keyed by the dataset folder's own name, as kohya keys them (`10_zkz` in its layout: tests/test_data.py).
    folder = _session.report.root.resolve().name
    assert list(frequency) == [folder] and json.loads(metadata["ss_dataset_dirs"]) == {
        folder: {"n_repeats": 1, "img_count": 4}}  # fmt: skip
    assert metadata["ss_epoch"].isdigit() and metadata["ss_max_train_steps"] == "4"
    assert metadata["ss_num_reg_images"] == "0" and json.loads(metadata["ss_reg_dataset_dirs"]) == {}
    assert "ss_sd_model_hash" not in metadata  # a diffusers folder: kohya has no file to hash either
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.implementation"] == "diffusers"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.trigger_phrase"] == "zkz"


def kohya_hashes(path) -> tuple[str, str]:
    """The two hashes as kohya's `train_util.precalculate_safetensors_hashes` computes them when it saves a file:
    the tensors re-serialised with only the `ss_*` metadata, then sd-webui-additional-networks' two hashes of it
    (`addnet_hash_safetensors`: sha256 after the header; `addnet_hash_legacy`: bytes 0x100000-0x110000)."""
    import io

    from safetensors import safe_open
    from safetensors.torch import load_file, save

    with safe_open(str(path), "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k.startswith("ss_")}
    b = io.BytesIO(save(load_file(str(path)), metadata))
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    model_hash = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    return model_hash, hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]


def test_a_single_file_base_model_gets_kohyas_base_hashes(tmp_path):
    from lora_studio.lora_metadata import base_model_hashes

    checkpoint = tmp_path / "base.safetensors"
    checkpoint.write_bytes(bytes(range(256)) * 5000)  # 1.28 MB: the legacy window holds real bytes
    data = checkpoint.read_bytes()
    assert base_model_hashes(str(checkpoint)) == {
        "ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],  # kohya's model_hash()
        "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest(),  # kohya's calculate_sha256()
    }
    assert base_model_hashes(str(tmp_path)) == {} and base_model_hashes("demo") == {}


def test_hashes_are_kohyas(sd1_full, tmp_path):
    _session, path = sd1_full
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == kohya_hashes(path)
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_len :]).hexdigest()  # the file's tensors
    # A file over 1 MiB, where the legacy hash covers real bytes, with ModelSpec keys beside the ss_* ones: those
    # move the file's bytes but not kohya's hash.
    big = lora_file.LoraFile({"lora_unet_x": lora_file.LoraModule(torch.randn(64, 8192), torch.randn(64, 64), 8.0)},
                             {"ss_network_dim": "64", "modelspec.title": "big"})  # fmt: skip
    out = export.save_kohya(big, tmp_path / "big.safetensors", torch.float32)
    data = out.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    assert len(data) > 0x110000 and any(not k.startswith(("ss_", "sshs_")) for k in metadata)
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == kohya_hashes(out)
    assert metadata["sshs_legacy_hash"] != hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_round_trip_gives_equal_tensors(sd1_full):
    session, path = sd1_full
    expected = lora_from_models(session_parts(session), "sd1")
    loaded = load_lora(path)
    assert loaded.format == "kohya" and loaded.family == "sd1"
    assert set(loaded.modules) == set(expected.modules)
    for name, module in expected.modules.items():
        got = loaded.modules[name]
        assert torch.equal(got.down, module.down.detach().float())
        assert torch.equal(got.up, module.up.detach().float())
        assert got.alpha == module.alpha


def generate(pipeline, strength, seed=3, prompt="zkz, a thing, number 0"):
    pipeline.set_progress_bar_config(disable=True)
    use_sampler(pipeline, "ddim")
    image = render(pipeline, [prompt], [strength], [seed], steps=3, guidance=5.0, size=(32, 32))[0].image
    return np.asarray(image, dtype=np.int16)


def diffusers_log(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_named_and_stacked_loads_change_nothing_and_log_no_false_report(sd1_full, tiny_folders):
    _session, path = sd1_full
    pipeline = load_base(tiny_folders["sd1"], device="cpu").pipeline
    base_weights = {k: v.clone() for k, v in pipeline.text_encoder.state_dict().items()}
    recorder = Recorder()  # transformers' loggers do not propagate, so caplog cannot see them
    logging.getLogger("transformers.integrations.peft").addHandler(recorder)
    try:
        export.load_into_pipeline(pipeline, load_lora(path), "d")  # "d" is inside "encoder"
        first = {k: v.clone() for k, v in pipeline.text_encoder.state_dict().items() if ".d." in k}
        export.load_into_pipeline(pipeline, load_lora(path), "second")
        assert recorder.messages == []
    finally:
        logging.getLogger("transformers.integrations.peft").removeHandler(recorder)
    # What the quieting hides: up to transformers 5.24 a plain named load after another adapter reports weights as
    # MISSING (5.25 no longer does, and the quieting is then harmless), shown in a fresh process.
    script = (
        "import logging, sys, torch\n"
        "from lora_studio.export import with_one_alpha\n"
        "from lora_studio.lora_read import load_lora\n"
        "from lora_studio.models import load_base\n"
        "messages = []\n"
        "class Recorder(logging.Handler):\n"
        "    def emit(self, record): messages.append(record.getMessage())\n"
        "logging.getLogger('transformers.integrations.peft').addHandler(Recorder(logging.WARNING))\n"
        "pipeline = load_base(sys.argv[1], device='cpu').pipeline\n"
        "tensors = with_one_alpha(load_lora(sys.argv[2]).state_dict(torch.float32))\n"
        "pipeline.load_lora_weights(dict(tensors), adapter_name='d')\n"
        "pipeline.load_lora_weights(dict(tensors), adapter_name='third')\n"
        "print(any('LOAD REPORT' in m and 'MISSING' in m for m in messages))\n"
    )  # fmt: skip
    shown = subprocess.run([sys.executable, "-c", script, str(tiny_folders["sd1"]), str(path)], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    reported = shown.stdout.strip().splitlines()[-1:]
    assert reported in (["True"], ["False"]), shown.stderr[-2000:]
    if Version(transformers.__version__) < Version("5.25"):
        assert reported == ["True"]
    assert logging.getLogger("transformers.integrations.peft").level == logging.NOTSET  # restored
    after = pipeline.text_encoder.state_dict()
    assert first and all(torch.equal(v, after[k]) for k, v in first.items())  # the first adapter is intact
    for name, tensor in base_weights.items():  # and so is the base: wrapped weights moved to .base_layer
        layer, _, leaf = name.rpartition(".")
        assert torch.equal(tensor, after.get(name, after.get(f"{layer}.base_layer.{leaf}")))


@pytest.mark.parametrize("fixture", ["sd1_full", "sd2v_attn_ff", "sdxl_attn_ff"])
def test_diffusers_loads_every_module_and_renders_like_the_trained_model(request, tiny_folders, fixture, caplog):
    session, path = request.getfixturevalue(fixture)
    family = session.base.family
    ours = {s: generate(session.base.pipeline, s) for s in (0.6, 1.0)}

    outside = load_base(tiny_folders[family], device="cpu").pipeline
    with caplog.at_level(logging.WARNING):
        outside.load_lora_weights(str(path))  # a plain file path, as any diffusers user loads it
    assert not [m for m in diffusers_log(caplog) if "lora" in m.lower() or "key" in m.lower()]
    components = {"unet": outside.unet, "text_encoder": outside.text_encoder}
    if family == "sdxl":
        components["text_encoder_2"] = outside.text_encoder_2
    loaded = {part: sum(isinstance(m, LoraLayer) for m in c.modules()) for part, c in components.items()}
    trained = {part: sum(isinstance(m, LoraLayer) for m in c.modules()) for part, c in session_parts(session).items()}
    assert loaded == trained
    for strength, image in ours.items():
        theirs = generate(outside, strength)
        assert np.abs(theirs - image).max() <= 2, strength
    assert np.abs(ours[1.0] - generate(outside, 0.0)).max() > 10, "the adapter changes the image"
    metadata = read_file(path)[1]
    if family == "sd2-v":
        assert metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2_v"
        assert metadata["modelspec.prediction_type"] == "v"
    if family == "sdxl":
        assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_diffusers_format_option_keeps_alpha(tmp_path, tiny_folders, images, sd1_full):
    session = trained_session(tmp_path, tiny_folders, images, "sd1", lora={"rank": 4, "alpha": 1.0},
                              save={"format": "diffusers"})  # fmt: skip
    path = outputs.save_lora_file(session, tmp_path / "native.safetensors")
    tensors, metadata = read_file(path)
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in tensors)
    assert "lora_adapter_metadata" in metadata and metadata["ss_network_alpha"] == "1.0"
    ours = generate(session.base.pipeline, 1.0)
    # The published layout (`text_encoder.text_model.encoder…`), which ComfyUI and older diffusers expect
    assert all(k.startswith("text_encoder.text_model.encoder.") for k in tensors if k.startswith("text_encoder."))
    outside = load_base(tiny_folders["sd1"], device="cpu").pipeline
    outside.load_lora_weights(str(path))
    te_loaded = [n for n, m in outside.text_encoder.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(te_loaded) == len({k.rsplit(".lora_", 1)[0] for k in tensors if k.startswith("text_encoder.")}) > 0
    assert np.abs(generate(outside, 1.0) - ours).max() <= 2  # alpha/rank = 1/4 applied, not 1
    imported = load_lora(path)
    assert imported.format == "diffusers" and {m.alpha for m in imported.modules.values()} == {1.0}
    expected = lora_from_models(session_parts(session), "sd1")
    assert set(imported.modules) == set(expected.modules)
    # Files this project wrote before (transformers 5's flat `text_encoder.encoder…` keys) still read the same.
    flat = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in tensors.items()}
    save_file(flat, str(tmp_path / "flat.safetensors"), metadata)
    older = load_lora(tmp_path / "flat.safetensors")
    assert set(older.modules) == set(imported.modules)
    assert all(torch.equal(older.modules[n].down, imported.modules[n].down) for n in older.modules)


def test_peft_and_onetrainer_files_import(tmp_path, sd1_full):
    # PEFT: `base_model.model.` keys with adapter_config.json beside the weights.
    session, _ = sd1_full
    lora = lora_from_models(session_parts(session), "sd1")
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    from peft import get_peft_model_state_dict

    unet = session_parts(session)["unet"]
    state = {f"base_model.model.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(state, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps(unet.peft_config["default"].to_dict(), default=list))
    imported = load_lora(peft_dir / "adapter_model.safetensors")
    assert imported.format == "peft"
    unet_modules = {n: m for n, m in lora.modules.items() if n.startswith("lora_unet_")}
    assert set(imported.modules) == set(unet_modules)
    for name, module in unet_modules.items():
        assert imported.modules[name].alpha == module.alpha  # conv alpha from alpha_pattern, 2.0 elsewhere
        assert torch.equal(imported.modules[name].up, module.up.detach())

    # OneTrainer spells SDXL UNet keys with diffusers block names; they become kohya's SGM names.
    attn = "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    onetrainer = {
        f"lora_unet_{attn}.lora_down.weight": torch.randn(4, 640),
        f"lora_unet_{attn}.lora_up.weight": torch.randn(640, 4),
        f"lora_unet_{attn}.alpha": torch.tensor(2.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4),
    }
    save_file(onetrainer, str(tmp_path / "ot.safetensors"))
    imported = load_lora(tmp_path / "ot.safetensors")
    assert imported.format == "onetrainer" and imported.family == "sdxl"
    assert set(imported.modules) == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    }
    assert imported.modules["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].alpha == 4.0  # no alpha: scale 1


def test_family_mismatch_is_a_clear_error(sdxl_attn_ff, tiny_folders):
    _session, path = sdxl_attn_ff
    base = load_base(tiny_folders["sd1"], device="cpu")
    with pytest.raises(LoraFileError, match=r"is a SDXL LoRA but the base model .* is SD 1\.x"):
        lora_read.check_compatible(load_lora(path), base)


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_files_get_one_clear_sentence(tmp_path, sd1_full):
    _session, good = sd1_full
    data = good.read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError, match="truncated"):
        load_lora(truncated)

    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(checkpoint))
    with pytest.raises(LoraFileError, match="not a LoRA file.*load it as a base model"):
        load_lora(checkpoint)

    huge = tmp_path / "huge.safetensors"
    header = 101 * 1024 * 1024
    with open(huge, "wb") as f:  # a sparse file: the header really is that long, without using the disk
        f.write(header.to_bytes(8, "little") + b"{")
        f.seek(8 + header)
        f.write(b"\0")
    with pytest.raises(LoraFileError, match="100 MB"):
        load_lora(huge)

    tensors, metadata = read_file(good)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    nan = dict(tensors)
    nan[f"{name}.lora_up.weight"] = torch.full_like(nan[f"{name}.lora_up.weight"], float("nan"))
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoraFileError, match=f"{name}'s lora_up holds NaN"):
        load_lora(tmp_path / "nan.safetensors")

    ranks = dict(tensors)
    ranks[f"{name}.lora_up.weight"] = torch.zeros(ranks[f"{name}.lora_up.weight"].shape[0], 3)
    save_file(ranks, str(tmp_path / "ranks.safetensors"))
    with pytest.raises(LoraFileError, match="rank 4 in lora_down but 3 in lora_up"):
        load_lora(tmp_path / "ranks.safetensors")

    pickle = tmp_path / "x.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(LoraFileError, match="pickle"):
        load_lora(pickle)


def test_failed_writes_leave_the_previous_file_intact(tmp_path, sd1_full, monkeypatch):
    _session, good = sd1_full
    lora = load_lora(good)
    target = tmp_path / "out.safetensors"
    export.save_kohya(lora, target)
    before = target.read_bytes()

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match="Could not write .*a-file"):
        export.save_kohya(lora, blocker / "out.safetensors")

    name = next(iter(lora.modules))
    broken = lora_file.LoraFile(dict(lora.modules), dict(lora.metadata))
    broken.modules[name] = lora_file.LoraModule(lora.modules[name].down * float("nan"), lora.modules[name].up, 1.0)
    with pytest.raises(LoraFileError, match="NaN or inf"):
        export.save_kohya(broken, target)

    def disk_full(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(target), "write_bytes", disk_full)
    with pytest.raises(WriteError, match="No space left on device; free some disk space"):
        export.save_kohya(lora, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "out.safetensors"]


# --- tools ------------------------------------------------------------------------------------------------------


def test_resize_to_the_same_rank_is_lossless_and_errors_are_exact(sd1_full):
    from lora_studio.tools import resize_lora

    _session, path = sd1_full
    lora = load_lora(path)
    same, report = resize_lora(lora, rank=4)
    for name, module in lora.modules.items():
        assert same.modules[name].rank == module.rank
        assert torch.allclose(same.modules[name].delta(), module.delta(), atol=1e-5)
        assert same.modules[name].scale == pytest.approx(module.scale)
    assert report.relative_error < 1e-5

    smaller, report = resize_lora(lora, rank=1)
    total = 0.0
    for name, module in lora.modules.items():
        direct = float(torch.linalg.norm((module.delta() - smaller.modules[name].delta()).double()))
        assert report.per_module[name]["error"] == pytest.approx(direct, rel=1e-3, abs=1e-6)
        total += direct**2
    assert report.total_error == pytest.approx(total**0.5, rel=1e-3)
    assert {m.rank for m in smaller.modules.values()} == {1} and report.relative_error > 0
    assert smaller.metadata["ss_network_dim"] == "1"

    kept, _ = resize_lora(lora, energy=0.9)
    for name, module in lora.modules.items():
        s = torch.linalg.svdvals(module.delta().flatten(1).double())
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        assert kept.modules[name].rank == min(int((share < 0.9 - 1e-12).sum()) + 1, module.rank)


def test_merge_equals_the_lora_applied_at_that_strength(tmp_path, tiny_folders, sd1_full):
    from lora_studio.tools import merge_lora

    _session, path = sd1_full
    strength = 0.7
    with_lora = load_base(tiny_folders["sd1"], device="cpu").pipeline
    with_lora.load_lora_weights(str(path))
    expected = generate(with_lora, strength)

    merged = tmp_path / "merged.safetensors"
    merge_lora(load_base(tiny_folders["sd1"], device="cpu"), load_lora(path), strength, merged, torch.float32)
    back = load_base(merged, device="cpu", config=tiny_folders["sd1"]).pipeline
    assert np.abs(generate(back, 1.0) - expected).max() <= 2
    plain = load_base(tiny_folders["sd1"], device="cpu").pipeline
    assert np.abs(generate(back, 1.0) - generate(plain, 1.0)).max() > 10, "the merge changed the model"


def test_dora_magnitude_is_written_as_dora_scale_and_read_back(tmp_path, tiny_folders, images):
    lora = {"rank": 4, "alpha": 2.0, "use_dora": True, "unet_targets": "full", "conv_rank": 2}
    session = trained_session(tmp_path, tiny_folders, images, "sd1", steps=2, lora=lora)
    path = outputs.save_lora_file(session, tmp_path / "dora.safetensors", torch.float32)
    tensors, _ = read_file(path)
    layers = {
        kohya_name(part, name, "sd1"): layer
        for part, model in session_parts(session).items()
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    for name, layer in layers.items():
        magnitude = layer.lora_magnitude_vector["default"].weight.detach()
        scale = tensors[f"{name}.dora_scale"]
        assert scale.shape == (layer.lora_B["default"].weight.shape[0], *[1] * (scale.dim() - 1))  # LyCORIS layout
        assert torch.equal(scale.flatten(), magnitude.flatten())
    loaded = load_lora(path)
    assert loaded.summary()["dora"]
    assert all(torch.equal(loaded.modules[n].dora_scale, tensors[f"{n}.dora_scale"]) for n in layers)


def test_demo_round_trip_equal_tensors_and_generations(tmp_path):
    """The acceptance loop on the bundled demo model: train, save (kohya), load, same tensors and images."""
    from lora_studio.config import load_preset

    config = load_preset("demo-cpu").model_copy(deep=True)
    config.output_dir = str(tmp_path)
    config.dataset.cache_dir = str(tmp_path / "cache")
    config.optimizer.max_train_steps = 6
    config.save.precision = "fp32"
    session = train_module.prepare(config)
    for _ in range(6):
        step_module.training_step(session, list(range(config.dataset.batch_size)))
        session.step += 1
    path = outputs.save_lora_file(session, tmp_path / "demo.safetensors")
    loaded = load_lora(path)
    expected = lora_from_models(session_parts(session), "sd1")
    assert loaded.family == "sd1" and set(loaded.modules) == set(expected.modules)
    assert all(torch.equal(loaded.modules[n].up, m.up.detach()) for n, m in expected.modules.items())

    def image(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        out = render(pipeline, ["zkz, a red circle on a white background"], [0.8], [5], steps=4, guidance=3.0,
                      size=(64, 64))  # fmt: skip
        return np.asarray(out[0].image, dtype=np.int16)

    fresh = load_base("demo", dtype=torch.float32, device="cpu")
    lora_read.check_compatible(loaded, fresh)
    fresh.pipeline.load_lora_weights(loaded.state_dict(), adapter_name="demo")
    assert np.abs(image(fresh.pipeline) - image(session.base.pipeline)).max() <= 2


PRECISIONS = [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]


@pytest.mark.parametrize(("precision", "dtype"), PRECISIONS)
def test_save_precision(tmp_path, sd1_full, precision, dtype):
    session, _ = sd1_full
    session.config.save.precision = precision
    try:
        path = outputs.save_lora_file(session, tmp_path / f"{precision}.safetensors")
    finally:
        session.config.save.precision = "fp32"
    tensors, metadata = read_file(path)
    assert {t.dtype for t in tensors.values()} == {dtype}
    loaded = load_lora(path)
    expected = lora_from_models(session_parts(session), "sd1")
    name = next(iter(expected.modules))
    assert torch.equal(loaded.modules[name].up, expected.modules[name].up.detach().to(dtype))


def test_kohya_file_converts_to_diffusers_format_and_renders_the_same(tmp_path, tiny_folders, sd1_full):
    _session, path = sd1_full
    lora = load_lora(path)
    out = export.convert_to_diffusers(lora, load_base(tiny_folders["sd1"], device="cpu"), tmp_path / "d.safetensors",
                                      torch.float32)  # fmt: skip
    tensors, metadata = read_file(out)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in tensors) and "lora_adapter_metadata" in metadata
    assert metadata["ss_network_alpha"] == lora.metadata["ss_network_alpha"]
    assert set(load_lora(out).modules) == set(lora.modules)
    from_kohya = load_base(tiny_folders["sd1"], device="cpu").pipeline
    from_kohya.load_lora_weights(str(path))
    from_diffusers = load_base(tiny_folders["sd1"], device="cpu").pipeline
    from_diffusers.load_lora_weights(str(out))
    assert np.abs(generate(from_kohya, 0.8) - generate(from_diffusers, 0.8)).max() <= 2


def test_a_lora_whose_alphas_differ_per_module_previews_as_trained(tmp_path, tiny_folders, images):
    """diffusers gives attention layers whose alpha is not the file's most common one the common alpha (its
    alpha_pattern keys name no module); `export.with_one_alpha` folds each alpha into lora_up so none is lost."""
    from test_lora import unet_output

    from lora_studio.export import load_into_pipeline
    from lora_studio.lora_read import fitted_to

    lora = {"rank": 4, "alpha": 4.0, "block_ranks": [2, 4, 8], "block_alphas": [1.0, 4.0, 16.0]}
    session = trained_session(tmp_path, tiny_folders, images, lora=lora)
    path = outputs.save_lora_file(session, tmp_path / "blocks.safetensors")
    base = load_base(tiny_folders["sd1"], device="cpu")
    load_into_pipeline(base.pipeline, fitted_to(load_lora(path), base), "blocks")
    assert torch.allclose(unet_output(base), unet_output(session.base), atol=2e-3)
