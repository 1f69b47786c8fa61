"""diffusers folder -> single file (our writer) -> load_base (diffusers' reader) gives equal tensors."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_studio.models import load_base
from lora_studio.tools import save_single_file, to_ldm_state_dict

FAMILIES = ["sd1", "sd2", "sd2-v", "sdxl"]


def assert_same_weights(a, b):
    modules_a = [a.unet, a.vae, *a.text_encoders]
    modules_b = [b.unet, b.vae, *b.text_encoders]
    assert len(modules_a) == len(modules_b)
    for ma, mb in zip(modules_a, modules_b, strict=True):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert set(sa) == set(sb), f"{type(ma).__name__}: {sorted(set(sa) ^ set(sb))[:5]}"
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, f"{type(ma).__name__}: {different[:5]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_loads_with_family_and_frozen_weights(tiny_folders, family):
    base = load_base(tiny_folders[family], device="cpu")
    assert base.family == family
    assert base.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert base.native_resolution == 8 * 2  # tiny UNet sample_size 8, VAE downsamples 2x
    assert base.dtype == torch.float32
    assert len(base.text_encoders) == (2 if family == "sdxl" else 1)
    assert not any(p.requires_grad for m in (base.unet, base.vae, *base.text_encoders) for p in m.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_gives_equal_tensors(tiny_folders, tmp_path, family):
    base = load_base(tiny_folders[family], device="cpu")
    path = tmp_path / f"tiny-{family}.safetensors"
    save_single_file(base, path)

    back = load_base(path, device="cpu", config=tiny_folders[family])

    assert back.family == family
    assert back.prediction_type == base.prediction_type
    assert_same_weights(base, back)


def test_single_file_metadata_names_the_family(tiny_folders, tmp_path):
    base = load_base(tiny_folders["sdxl"], device="cpu")
    path = tmp_path / "xl.safetensors"
    save_single_file(base, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_round_trip_in_half_precision(tiny_folders, tmp_path):
    base = load_base(tiny_folders["sd1"], device="cpu")
    path = tmp_path / "half.safetensors"
    save_single_file(base, path, dtype=torch.float16)
    back = load_base(path, dtype=torch.float16, device="cpu", config=tiny_folders["sd1"])
    assert back.dtype == torch.float16
    w = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(back.unet.state_dict()[w], base.unet.state_dict()[w].half())


def test_prediction_type_override(tiny_folders, tmp_path):
    base = load_base(tiny_folders["sd1"], device="cpu", prediction_type="v_prediction")
    assert base.prediction_type == "v_prediction"
    assert base.scheduler.config.prediction_type == "v_prediction"


def test_loaded_model_generates_and_is_deterministic(tiny_folders):
    base = load_base(tiny_folders["sd1"], device="cpu")

    def run():
        return base.pipeline(
            "a red star",
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    first, second = run(), run()
    assert first.shape == (1, 3, 16, 16)
    assert torch.equal(first, second)


def test_single_file_with_real_world_extra_keys_loads(tiny_folders, tmp_path):
    """Published SD1 files also carry position_ids, EMA and schedule tensors; they must not break loading."""
    base = load_base(tiny_folders["sd1"], device="cpu")
    state = {k: v.contiguous().clone() for k, v in to_ldm_state_dict(base).items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    path = tmp_path / "published-style.safetensors"
    save_file(state, str(path))
    back = load_base(path, device="cpu", config=tiny_folders["sd1"])
    assert back.family == "sd1"
    assert_same_weights(base, back)
