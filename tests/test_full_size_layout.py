"""The real full-size key sets, built on the meta device from the bundled configs (nothing allocated).

Our writer must produce exactly the layout that real single-file checkpoints have: diffusers' own
reader maps it back to every diffusers parameter, the key names diffusers and ComfyUI use to
recognise each family are present, and our detector names the right family.
"""

from pathlib import Path

import pytest
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_studio import layout
from lora_studio.checkpoints import CheckpointIndex, detect_family
from lora_studio.paths import sd_config_dir


def meta_components(family):
    folder = sd_config_dir(family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        te2 = None
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return unet, vae, te, te2


def full_size_ldm(family):
    unet, vae, te, te2 = meta_components(family)
    state = layout.unet_to_ldm(unet.state_dict(), unet.config)
    state |= layout.vae_to_ldm(vae.state_dict(), vae.config)
    if family == "sdxl":
        state |= layout.clip_to_ldm(te.state_dict(), layout.SDXL_TEXT_PREFIXES[0])
        state |= layout.open_clip_to_ldm(te2.state_dict(), layout.SDXL_TEXT_PREFIXES[1])
    elif family.startswith("sd2"):
        state |= layout.open_clip_to_ldm(te.state_dict(), layout.SD2_TEXT_PREFIX)
    else:
        state |= layout.clip_to_ldm(te.state_dict(), layout.SD1_TEXT_PREFIX)
    return state, (unet, vae, te, te2)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def full(request):
    return request.param, *full_size_ldm(request.param)


def index_of(state, name):
    return CheckpointIndex(Path(name), {k: tuple(v.shape) for k, v in state.items()}, {})


def test_diffusers_reader_recovers_every_unet_and_vae_parameter(full):
    family, state, (unet, vae, _, _) = full
    unet_back = convert_ldm_unet_checkpoint(state, unet.config)
    assert set(unet_back) == set(unet.state_dict())
    assert all(unet_back[k].shape == v.shape for k, v in unet.state_dict().items())
    vae_back = convert_ldm_vae_checkpoint(state, vae.config)
    assert set(vae_back) == set(vae.state_dict())
    assert all(vae_back[k].shape == v.shape for k, v in vae.state_dict().items())


def test_text_encoders_round_trip_through_diffusers_reader(full):
    family, state, (_, _, te, te2) = full
    if family == "sd1":  # OpenAI CLIP-L is stored in transformers' own layout under a prefix
        model, back = te, convert_ldm_clip_checkpoint(state)
    else:
        model, prefix = (te2, layout.SDXL_TEXT_PREFIXES[1]) if family == "sdxl" else (te, layout.SD2_TEXT_PREFIX)
        back = convert_open_clip_checkpoint(model, state, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flat CLIPTextModel
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
    expected = model.state_dict()
    assert set(back) == set(expected)
    assert all(back[k].shape == v.shape for k, v in expected.items())


REAL_KEYS = {
    "sd1": [CHECKPOINT_KEY_NAMES["v1"], CHECKPOINT_KEY_NAMES["clip"], "first_stage_model.decoder.mid.attn_1.q.weight"],
    "sd2": [CHECKPOINT_KEY_NAMES["v2"], CHECKPOINT_KEY_NAMES["open_clip"], "cond_stage_model.model.ln_final.weight"],
    "sdxl": [
        CHECKPOINT_KEY_NAMES["xl_base"],
        CHECKPOINT_KEY_NAMES["clip_sdxl"],
        CHECKPOINT_KEY_NAMES["open_clip_sdxl"],
        "conditioner.embedders.1.model.text_projection",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
    ],
}


def test_key_names_match_real_checkpoints(full):
    family, state, _ = full
    missing = [k for k in REAL_KEYS[family] if k not in state]
    assert not missing


def test_real_shapes(full):
    family, state, _ = full
    to_k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert state[to_k].shape[1] == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_family_detection_on_full_size_keys(full):
    family, state, _ = full
    detected = detect_family(index_of(state, f"model-{family}.safetensors"))
    assert detected.family == family
    assert detected.prediction_type == "epsilon"


def test_sd2_768_is_detected_as_v_prediction_from_its_name():
    state, _ = full_size_ldm("sd2")
    detected = detect_family(index_of(state, "v2-1_768-ema-pruned.safetensors"))
    assert (detected.family, detected.prediction_type) == ("sd2-v", "v_prediction")
    assert detected.notes and "768" in detected.notes[0]


def test_sd2_prediction_type_from_metadata_beats_the_name():
    state, _ = full_size_ldm("sd2")
    index = index_of(state, "v2-1_768-ema-pruned.safetensors")
    index.metadata["modelspec.prediction_type"] = "epsilon"
    assert detect_family(index).family == "sd2"
    assert detect_family(index, prediction_type="v").family == "sd2-v"


def test_sd2_512_is_assumed_epsilon_and_says_so():
    state, _ = full_size_ldm("sd2")
    detected = detect_family(index_of(state, "v2-1_512-ema-pruned.safetensors"))
    assert detected.family == "sd2"
    assert "assumed epsilon" in detected.notes[0]


def test_unet_key_counts_match_the_architectures():
    # 686 UNet tensors in SD1.5/SD2.1 and 1680 in SDXL: the counts of the published checkpoints' UNets.
    for family, count in (("sd1", 686), ("sd2", 686), ("sdxl", 1680)):
        state, _ = full_size_ldm(family)
        assert sum(k.startswith(layout.UNET_PREFIX) for k in state) == count
