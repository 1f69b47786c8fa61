"""The chosen pairing: peft 0.21 injects LoRA into transformers 5's flat CLIPTextModel and diffusers' UNet
through peft's own `inject_adapter_in_model` (transformers 5's `add_adapter` would demand peft >= 0.22)."""

import importlib.metadata

import torch
from packaging.version import Version
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from tiny_models import tiny_pipeline

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def encode(pipe, text_encoder, prompt="a red star"):
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


def set_lora_scale(model, scale):
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(scale) if scale != 1 else module.unscale_layer()


def test_versions_are_the_tested_pairing():
    assert Version(importlib.metadata.version("transformers")).major == 5
    assert Version(importlib.metadata.version("peft")) >= Version("0.21.2")


def test_text_encoder_lora_injects_and_changes_outputs():
    pipe = tiny_pipeline("sd1")
    te = pipe.text_encoder
    base_out = encode(pipe, te)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS), te)

    lora_layers = [n for n, m in te.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 2 * len(TEXT_TARGETS)  # 2 layers x 6 modules
    assert all(n.startswith("encoder.layers.") for n in lora_layers), "transformers 5 CLIPTextModel is flat"
    assert torch.equal(encode(pipe, te), base_out), "peft's default init (B = 0) starts as a no-op"

    torch.manual_seed(1)
    for name, param in te.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.1)
    changed = encode(pipe, te)
    assert not torch.allclose(changed, base_out)
    trainable = {n for n, p in te.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_sdxl_second_encoder_keeps_text_model_level():
    pipe = tiny_pipeline("sdxl")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=TEXT_TARGETS), pipe.text_encoder_2)
    names = [n for n, m in pipe.text_encoder_2.named_modules() if isinstance(m, LoraLayer)]
    assert names and all(n.startswith("text_model.encoder.layers.") for n in names)


def test_unet_lora_strength_contract():
    pipe = tiny_pipeline("sd1")
    unet = pipe.unet
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, 32)

    def run():
        return unet(sample, 10, encoder_hidden_states=context).sample

    base = run()
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    inject_adapter_in_model(config, unet)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.05)
    full = run()
    set_lora_scale(unet, 0.5)
    half = run()
    set_lora_scale(unet, 0.0)
    off = run()
    assert not torch.allclose(full, base)
    assert not torch.allclose(half, full) and not torch.allclose(half, base)
    assert torch.allclose(off, base, atol=1e-6)
