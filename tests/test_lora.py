"""LoRA injection: kohya's module counts on the real structures, no-op at init, fp32 adapters, kohya scale."""

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_studio.config import LoraConfig
from lora_studio.lora import inject_lora, text_encoder_target_names, trainable_parameters, unet_target_names
from lora_studio.models import load_base
from lora_studio.paths import sd_config_dir

# kohya's counts: 192 UNet + 72 text-encoder modules on SD1.5 and 722 + 264 on SDXL with its default set.
# 'attn' drops proj_in/proj_out/ff (2 + 2 per transformer); 'full' adds 44 resnet + 6 resampler convs on SD1.5.
UNET_COUNTS = {"sd1": {"attn": 128, "attn-ff": 192, "full": 242}, "sdxl": {"attn": 560, "attn-ff": 722, "full": 760}}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_preset_counts_on_full_size_structure(family):
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd_config_dir(family) / "unet"))
    for preset, count in UNET_COUNTS[family].items():
        assert len(unet_target_names(unet, preset)) == count, preset


def test_text_encoder_counts_on_full_size_structure():
    targets = LoraConfig().text_encoder_targets
    with init_empty_weights():
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(sd_config_dir("sd1") / "text_encoder"))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(sd_config_dir("sdxl") / "text_encoder_2"))
    assert len(text_encoder_target_names(clip_l, targets)) == 72
    assert len(text_encoder_target_names(clip_l, targets)) + len(text_encoder_target_names(big_g, targets)) == 264


def unet_output(base, seed=0):
    torch.manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, dtype=base.dtype)
    context = torch.randn(1, 77, base.unet.config.cross_attention_dim, dtype=base.dtype)
    with torch.no_grad():
        return base.unet(sample, 10, encoder_hidden_states=context).sample


@pytest.mark.parametrize("preset", ["attn", "attn-ff", "full"])
def test_untrained_adapter_changes_nothing_and_only_lora_trains(tiny_folders, preset):
    base = load_base(tiny_folders["sd1"], device="cpu")
    before = unet_output(base)
    settings = LoraConfig(unet_targets=preset, conv_rank=2 if preset == "full" else None)
    injected = inject_lora(base, settings)
    assert set(injected) == {"unet", "text_encoder"}
    assert torch.equal(unet_output(base), before)
    for module in (base.unet, *base.text_encoders):
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


def test_lora_weights_fp32_while_frozen_model_stays_bf16(tiny_folders):
    base = load_base(tiny_folders["sd1"], dtype=torch.bfloat16, device="cpu")
    inject_lora(base, LoraConfig())
    assert {p.dtype for p in trainable_parameters(base.unet)} == {torch.float32}
    frozen = {p.dtype for p in base.unet.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}


def test_kohya_scale_and_conv_rank(tiny_folders):
    base = load_base(tiny_folders["sd1"], device="cpu")
    inject_lora(base, LoraConfig(rank=8, alpha=4.0, unet_targets="full", conv_rank=2, conv_alpha=1.0))
    layers = {n: m for n, m in base.unet.named_modules() if isinstance(m, LoraLayer)}
    attention = next(m for n, m in layers.items() if n.endswith("attn1.to_q"))
    conv = next(m for n, m in layers.items() if n.endswith("resnets.0.conv1"))
    assert (attention.r["default"], attention.scaling["default"]) == (8, 0.5)
    assert (conv.r["default"], conv.scaling["default"]) == (2, 0.5)


def test_training_a_step_changes_outputs(tiny_folders):
    base = load_base(tiny_folders["sd1"], device="cpu")
    before = unet_output(base)
    inject_lora(base, LoraConfig(rank=4, alpha=4.0, train_text_encoder=False))
    params = trainable_parameters(base.unet)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(1)
    out = base.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample
    out.pow(2).mean().backward()
    optimizer.step()
    assert not torch.allclose(unet_output(base), before)
    assert all(not p.requires_grad for p in base.text_encoders[0].parameters()), "text encoder left alone"


def test_both_sdxl_text_encoders_and_dora(tiny_folders):
    base = load_base(tiny_folders["sdxl"], device="cpu")
    injected = inject_lora(base, LoraConfig(use_dora=True, dropout=0.1))
    assert set(injected) == {"unet", "text_encoder", "text_encoder_2"}
    # SDXL reads the penultimate layer of encoder 1 (its last is never read) and all of encoder 2 (pooled)
    assert len(injected["text_encoder"]) == 6 and len(injected["text_encoder_2"]) == 2 * 6
    assert all(n.startswith("text_model.encoder.layers.") for n in injected["text_encoder_2"])
    assert any("lora_magnitude_vector" in n for n, _ in base.unet.named_parameters())


@pytest.mark.parametrize(("family", "clip_skip"), [("sd1", 1), ("sd1", 2), ("sdxl", 1), ("sdxl", 2)])
def test_every_text_encoder_adapter_gets_a_gradient_and_no_unread_layer_gets_one(tiny_folders, family, clip_skip):
    """An adapter where clip skip leaves the layer unread would be saved as zeros; none is made, and every one made
    is read (its lora_B, zero at first, gets a gradient)."""
    from lora_studio.conditioning import encode_captions

    base = load_base(tiny_folders[family], device="cpu")
    injected = inject_lora(base, LoraConfig(rank=2, alpha=2.0, init_lora_weights="gaussian"), clip_skip)
    out = encode_captions(base.tokenizers, base.text_encoders, ["a red star"], clip_skip, family == "sdxl",
                          torch.device("cpu"))  # fmt: skip
    (out["hidden"].sum() + out.get("pooled", torch.zeros(())).sum()).backward()
    layers = base.text_encoders[0].config.num_hidden_layers  # the tiny encoders have 2
    expected_first = layers - (clip_skip if family == "sdxl" else clip_skip - 1)
    assert {n.split(".layers.")[1].split(".")[0] for n in injected.get("text_encoder", [])} == {
        str(i) for i in range(expected_first)}  # fmt: skip
    for part, encoder in zip(("text_encoder", "text_encoder_2"), base.text_encoders, strict=False):
        ups = [(n, p) for n, p in encoder.named_parameters() if "lora_B" in n]
        assert bool(ups) == (part in injected)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in ups), [
            n for n, p in ups if p.grad is None or not p.grad.abs().sum()]  # fmt: skip
