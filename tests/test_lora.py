"""LoRA injection: kohya's module counts on the real structures, no-op at init, fp32 adapters, kohya scale."""

import json
import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_studio.config import LoraConfig
from lora_studio.errors import LoraStudioError
from lora_studio.lora import inject_lora, text_encoder_target_names, trainable_parameters, unet_target_names
from lora_studio.lora_read import load_lora
from lora_studio.models import TEXT_ENCODER_NAMES, load_base
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
    for part, encoder in zip(TEXT_ENCODER_NAMES, base.text_encoders, strict=False):
        ups = [(n, p) for n, p in encoder.named_parameters() if "lora_B" in n]
        assert bool(ups) == (part in injected)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in ups), [
            n for n, p in ups if p.grad is None or not p.grad.abs().sum()]  # fmt: skip


def test_kohyas_block_index_for_sd1_layers():
    from lora_studio.lora import block_index

    block = "attentions.0.transformer_blocks.0.attn1.to_q"
    assert block_index(f"down_blocks.0.{block}", 25) == 1  # IN01 (IN00 is conv_in)
    assert block_index("down_blocks.1.attentions.1.proj_in", 25) == 5  # IN05
    assert block_index("down_blocks.0.downsamplers.0.conv", 25) == 3  # IN03
    assert block_index(f"mid_block.{block}", 25) == 12  # MID
    assert block_index("up_blocks.1.attentions.2.proj_out", 25) == 18  # OUT05
    assert block_index("up_blocks.3.resnets.2.conv1", 25) == 24  # OUT11
    assert block_index("conv_in", 25) is None and block_index("time_embedding.linear_1", 3) is None
    assert [block_index(p, 3) for p in (f"down_blocks.2.{block}", f"mid_block.{block}", f"up_blocks.0.{block}")] == [
        0, 1, 2]  # fmt: skip


def test_block_ranks_give_each_block_its_rank_and_alpha(tiny_folders):
    base = load_base(tiny_folders["sd1"], device="cpu")
    settings = LoraConfig(rank=4, alpha=4.0, block_ranks=[2, 0, 6], block_alphas=[1.0, 1.0, 3.0])
    injected = inject_lora(base, settings)
    layers = dict(base.unet.named_modules())
    by_block = {}
    for name in injected["unet"]:
        by_block.setdefault(name.split(".")[0], set()).add((layers[name].r["default"],
                                                            layers[name].scaling["default"]))  # fmt: skip
    assert by_block == {"down_blocks": {(2, 0.5)}, "up_blocks": {(6, 0.5)}}  # mid: rank 0, left out
    te = base.text_encoders[0]
    assert {m.r["default"] for n, m in te.named_modules() if n in injected["text_encoder"]} == {4}


def test_include_and_exclude_patterns_pick_layers_by_their_kohya_names(tiny_folders):
    from lora_studio.lora_file import kohya_name

    base = load_base(tiny_folders["sd1"], device="cpu")
    injected = inject_lora(base, LoraConfig(include_modules=r"attn2|text_model", exclude_modules=r"up_blocks_1"))
    unet = [kohya_name("unet", n, "sd1") for n in injected["unet"]]
    assert unet and all("attn2" in n and "up_blocks_1" not in n for n in unet)
    assert len(injected["text_encoder"]) == 12  # the include pattern names the text encoder's layers too
    with pytest.raises(LoraStudioError, match="No UNet layer is left"):
        inject_lora(load_base(tiny_folders["sd1"], device="cpu"), LoraConfig(include_modules="nothing-has-this"))


def test_targeting_settings_are_checked_with_clear_messages():
    from lora_studio.config import validate_config
    from lora_studio.errors import ConfigError

    cases = [({"include_modules": "attn2("}, "is not a regular expression"),
             ({"block_ranks": [4, 4]}, "give 3 (down, mid, up), 23 or 25"),
             ({"block_ranks": [4, 4, 4], "block_alphas": [1.0]}, "one alpha per block"),
             ({"block_ranks": [4, -1, 4]}, "between 0")]  # fmt: skip
    for lora, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_config({"version": 1, "lora": lora})
    with pytest.raises(ConfigError, match="25 SD 1.x/2.x blocks, but the family is SDXL"):
        validate_config({"version": 1, "family": "sdxl", "lora": {"block_ranks": [4] * 25}})
    with pytest.raises(ConfigError, match="23 SDXL blocks, but the family is not SDXL"):
        validate_config({"version": 1, "family": "sd1", "lora": {"block_ranks": [4] * 23}})


def test_kohyas_23_sdxl_blocks_on_the_full_size_structure_and_in_training(tiny_folders):
    """kohya's `get_block_index` for SDXL counts on the SGM names: input_blocks i = 1 + i, middle_block j = 10 + j,
    output_blocks i = 13 + i."""
    from lora_studio.lora import block_index

    config = UNet2DConditionModel.load_config(sd_config_dir("sdxl") / "unet")
    attn = "attentions.0.transformer_blocks.0.attn1.to_q"
    cases = {f"down_blocks.1.{attn}": 5, "down_blocks.0.resnets.1.conv2": 3, "down_blocks.1.downsamplers.0.conv": 7,
             f"mid_block.{attn}": 11, "mid_block.resnets.1.conv1": 12, f"up_blocks.0.{attn}": 13,
             "up_blocks.1.attentions.2.proj_out": 18, "up_blocks.2.resnets.2.conv1": 21}  # fmt: skip
    assert {path: block_index(path, 23, config) for path in cases} == cases
    assert block_index("conv_in", 23, config) == 1  # SGM's input_blocks.0.0, as kohya counts it
    assert block_index("time_embedding.linear_1", 23, config) is None  # kohya's block 0 holds no LoRA

    base = load_base(tiny_folders["sdxl"], device="cpu")
    ranks = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 0]
    injected = inject_lora(base, LoraConfig(rank=4, alpha=4.0, block_ranks=ranks), 1)
    layers = dict(base.unet.named_modules())
    for name in injected["unet"]:
        assert layers[name].r["default"] == block_index(name, 23, base.unet.config), name
    assert {layers[n].r["default"] for n in injected["unet"]} == {5, 6, 11, 13, 14, 15}  # in, mid and out blocks
    with pytest.raises(LoraStudioError, match="23 SDXL blocks, but the base model is not SDXL"):
        inject_lora(load_base(tiny_folders["sd1"], device="cpu"), LoraConfig(block_ranks=[4] * 23))


def test_a_file_trained_with_block_ranks_says_so_in_its_metadata_and_inspect_shows_them(tmp_path, tiny_folders):
    from test_train import tiny_config
    from tiny_models import caption_images

    from lora_studio.lora_inspect import inspect_lora
    from lora_studio.train import run_training

    lora = {"rank": 4, "alpha": 4.0, "block_ranks": [2, 4, 8], "exclude_modules": "attn1"}
    (tmp_path / "data").mkdir()
    config = tiny_config(tmp_path, tiny_folders, caption_images(tmp_path / "data"), optimizer={"max_train_steps": 1},
                         lora=lora)  # fmt: skip
    done = run_training(config)
    info = inspect_lora(done.lora_path)
    assert info["ranks_by_block"] == {"down": {"2": info["ranks_by_block"]["down"]["2"]},
                                      "mid": {"4": info["ranks_by_block"]["mid"]["4"]},
                                      "up": {"8": info["ranks_by_block"]["up"]["8"]}}  # fmt: skip
    args = json.loads(info["metadata"]["ss_network_args"])
    assert args["block_dims"] == "2,4,8" and json.loads(args["exclude_patterns"]) == ["attn1"]
    assert not any("attn1" in name for name in load_lora(done.lora_path).modules)


def test_max_norm_caps_each_layers_update_and_keeps_its_direction(tiny_folders, tmp_path):
    """kohya's scale_weight_norms: a layer whose B x A x scale is above the cap comes down to it, A and B scaled
    alike (so the update keeps its direction), a layer under the cap is left bit for bit; LoCon convs too."""
    from lora_studio.lora import cap_update_norms, lora_update

    base = load_base(tiny_folders["sd1"], device="cpu")
    inject_lora(base, LoraConfig(rank=4, alpha=2.0, unet_targets="full", conv_rank=4, init_lora_weights="gaussian"))
    layers = [m for m in base.unet.modules() if isinstance(m, LoraLayer)]
    assert any(m.lora_A["default"].weight.dim() == 4 for m in layers)  # 3x3 LoCon convs are among them
    generator = torch.Generator().manual_seed(0)
    for layer in layers:  # B off zero, each layer's update a different size
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=generator)
    before = {id(m): lora_update(m).clone() for m in layers}
    ordered = sorted(u.norm().item() for u in before.values())
    cap = (ordered[len(layers) // 2 - 1] + ordered[len(layers) // 2]) / 2  # half the layers are above it, none at it
    kept = {id(m): m.lora_A["default"].weight.clone() for m in layers if before[id(m)].norm() <= cap}
    assert int(cap_update_norms([base.unet], cap)) == len(layers) - len(kept)
    for layer in layers:
        after, old = lora_update(layer), before[id(layer)]
        assert after.norm().item() <= cap * (1 + 1e-5)
        assert torch.allclose(after / after.norm(), old / old.norm(), atol=1e-5)  # the same direction
        if id(layer) in kept:
            assert torch.equal(layer.lora_A["default"].weight, kept[id(layer)])
    with pytest.raises(ValueError, match="scale_weight_norms caps a LoRA"):
        LoraConfig(network="loha", scale_weight_norms=1.0)
    with pytest.raises(ValueError, match="use_dora has other weights"):
        LoraConfig(use_dora=True, scale_weight_norms=1.0)


def test_a_training_with_max_norm_keeps_every_update_under_it(tmp_path, tiny_folders):
    from test_export import trained_session
    from tiny_models import caption_images

    from lora_studio.lora import lora_update

    images = tmp_path / "data"
    images.mkdir()
    caption_images(images)
    capped = trained_session(tmp_path / "a", tiny_folders, images, lora={"rank": 4, "alpha": 2.0,
                                                                         "scale_weight_norms": 0.02})  # fmt: skip
    plain = trained_session(tmp_path / "b", tiny_folders, images)

    def norms(session) -> list[float]:
        return [lora_update(m).norm().item() for model in session.models.values() for m in model.modules()
                if isinstance(m, LoraLayer)]  # fmt: skip

    assert max(norms(capped)) <= 0.02 * (1 + 1e-5) and max(norms(plain)) > 0.02  # the cap acted, and had to
