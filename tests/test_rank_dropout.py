"""kohya's rank_dropout and module_dropout on a tiny seeded model: the exact masks of kohya's networks/lora.py in
training mode and nothing in eval mode, peft's own for LoHa/LoKr, exact resume, kohya's configs and metadata."""

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from test_train import images, straight_and_resumed  # noqa: F401 (a fixture)

from lora_studio.config import ConfigError, LoraConfig, validate_config
from lora_studio.lora import ADAPTER_NAME, inject_lora
from lora_studio.models import load_base


def adapted(tiny_folders, **settings) -> dict[str, LoraLayer]:
    """The tiny SD1 UNet's LoRA layers by name, with random B (peft starts B at 0: the update would be 0)."""
    base = load_base(tiny_folders["sd1"], device="cpu")
    inject_lora(base, LoraConfig(rank=4, alpha=2.0, unet_targets="full", conv_rank=4, train_text_encoder=False,
                                 **settings))  # fmt: skip
    torch.manual_seed(0)
    layers = {n: m for n, m in base.unet.named_modules() if isinstance(m, LoraLayer)}
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B[ADAPTER_NAME].weight, std=0.5)
    return layers


def pick(layers: dict[str, LoraLayer]) -> dict[str, tuple[LoraLayer, torch.Tensor]]:
    """A linear layer inside a transformer block (input B x tokens x width) and a 3x3 resnet conv, with inputs."""
    linear = next(m for n, m in layers.items() if n.endswith("attn1.to_q"))
    conv = next(m for n, m in layers.items() if n.endswith("resnets.0.conv1"))
    torch.manual_seed(1)
    return {"linear": (linear, torch.randn(3, 16, linear.in_features)),
            "conv": (conv, torch.randn(3, conv.get_base_layer().in_channels, 8, 8))}  # fmt: skip


def parts(layer: LoraLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen layer's output and the adapter's down projection, computed outside the hooks' reach."""
    down = layer.lora_A[ADAPTER_NAME]
    weights = down.weight
    with torch.no_grad():
        plain = layer.get_base_layer()(x)
        if isinstance(down, torch.nn.Conv2d):
            projected = torch.nn.functional.conv2d(x, weights, None, down.stride, down.padding)
        else:
            projected = x @ weights.T
    return plain, projected


def up(layer: LoraLayer, down: torch.Tensor) -> torch.Tensor:
    module = layer.lora_B[ADAPTER_NAME]
    with torch.no_grad():
        return module._conv_forward(down, module.weight, None) if isinstance(module, torch.nn.Conv2d) else (
            down @ module.weight.T)  # fmt: skip


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rank_dropout_keeps_each_rank_per_image_as_kohya_does(tiny_folders, kind):
    chance = 0.5
    layer, x = pick(adapted(tiny_folders, rank_dropout=chance))[kind]
    scaling = layer.scaling[ADAPTER_NAME]
    plain, down = parts(layer, x)
    layer.train()
    torch.manual_seed(7)
    with torch.no_grad():
        trained = layer(x)
    torch.manual_seed(7)
    shape = (3, 4, 1, 1) if kind == "conv" else (3, 1, 4)  # kohya's mask: (batch, rank), broadcast over the rest
    kept = (torch.rand(shape) > chance).float()
    assert 0 < kept.mean() < 1, "this seed keeps some ranks and drops others"
    assert torch.allclose(trained, plain + up(layer, down * kept / (1 - chance)) * scaling, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), plain + up(layer, down) * scaling, atol=1e-5)  # eval: every rank
    assert not torch.allclose(trained, layer(x).detach(), atol=1e-3)


def test_module_dropout_leaves_whole_layers_out_at_its_rate(tiny_folders):
    layer, x = pick(adapted(tiny_folders, module_dropout=0.3))["linear"]
    plain, down = parts(layer, x)
    full = plain + up(layer, down) * layer.scaling[ADAPTER_NAME]
    layer.train()
    torch.manual_seed(3)
    left_out = 0
    with torch.no_grad():
        for _ in range(400):
            out = layer(x)
            if torch.allclose(out, plain, atol=1e-6):
                left_out += 1
            else:
                assert torch.allclose(out, full, atol=1e-5), "kept layers keep all of their update"
    assert 0.22 < left_out / 400 < 0.38
    layer.eval()
    with torch.no_grad():
        assert all(torch.allclose(layer(x), full, atol=1e-5) for _ in range(20))


def test_without_them_no_hook_is_added_and_lycoris_networks_take_peft_s_own(tiny_folders):
    layers = adapted(tiny_folders)
    assert not any(layer.lora_A[ADAPTER_NAME]._forward_hooks or layer.lora_B[ADAPTER_NAME]._forward_hooks
                   for layer in layers.values())  # fmt: skip
    for network in ("loha", "lokr"):
        base = load_base(tiny_folders["sd1"], device="cpu")
        inject_lora(base, LoraConfig(rank=4, network=network, rank_dropout=0.2, module_dropout=0.1,
                                     train_text_encoder=False))  # fmt: skip
        found = [m for m in base.unet.modules() if hasattr(m, "rank_dropout") and isinstance(m.rank_dropout, dict)]
        assert found and all(m.rank_dropout[ADAPTER_NAME] == 0.2 and m.module_dropout[ADAPTER_NAME] == 0.1
                             for m in found), network  # fmt: skip


def test_a_run_with_them_resumes_bit_identically_and_its_file_says_so(tmp_path, tiny_folders, images):  # noqa: F811
    lora = {"rank_dropout": 0.25, "module_dropout": 0.2}
    straight, _resumed, a, b = straight_and_resumed(tmp_path, tiny_folders, images, lora=lora)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(straight.lora_path), "pt") as file:
        args = json.loads(file.metadata()["ss_network_args"])
    assert args["rank_dropout"] == "0.25" and args["module_dropout"] == "0.2"


def test_kohya_configs_bring_them_and_dora_refuses_them():
    flat = validate_config({"network_args": ["rank_dropout=0.1", "module_dropout=0.05"]})
    assert (flat.lora.rank_dropout, flat.lora.module_dropout) == (0.1, 0.05)
    gui = validate_config({"LoRA_type": "Standard", "rank_dropout": "0.2", "module_dropout": 0})
    assert (gui.lora.rank_dropout, gui.lora.module_dropout) == (0.2, 0.0)
    with pytest.raises(ConfigError, match="DoRA's magnitude"):
        validate_config({"version": 1, "lora": {"use_dora": True, "rank_dropout": 0.1}})
    with pytest.raises(ConfigError, match="lora.rank_dropout"):
        validate_config({"version": 1, "lora": {"rank_dropout": 1.0}})
