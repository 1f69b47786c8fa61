"""Block learning rates (`lora.block_lr_weights`, kohya's down_lr_weight / mid_lr_weight / up_lr_weight): each UNet
layer trains at its block's multiple of the UNet rate, a block at 0 gets no adapter, kohya's lists and presets
migrate into the same 25 (SD 1.x/2.x) or 23 (SDXL) blocks, and the file records them as kohya writes them."""

import json
import math

import pytest
from safetensors import safe_open
from test_train import images, tiny_config  # noqa: F401 (a fixture)

from lora_studio.config import ConfigError, validate_config
from lora_studio.errors import LoraStudioError
from lora_studio.train import prepare, run_training


def rates_by_layer(session) -> dict[str, float]:
    """Each trained UNet layer's learning rate, from the optimizer's groups."""
    rate_of = {id(p): group["lr"] for group in session.optimizer.param_groups for p in group["params"]}
    return {name.split(".lora_")[0]: rate_of[id(p)] for name, p in session.base.unet.named_parameters()
            if p.requires_grad}  # fmt: skip


def test_each_block_trains_at_its_multiple_and_a_block_at_0_is_left_out(tmp_path, tiny_folders, images):  # noqa: F811
    lr = 1e-3
    weights = {"block_lr_weights": [0.5, 0.0, 2.0], "train_text_encoder": True}
    session = prepare(tiny_config(tmp_path, tiny_folders, images, lora=weights,
                                  optimizer={"learning_rate": lr, "text_encoder_lr": 3e-4}))  # fmt: skip
    rates = rates_by_layer(session)
    assert rates and not any(name.startswith("mid_block.") for name in rates), "the mid block gets no adapter"
    assert all(rates[n] == pytest.approx(0.5 * lr) for n in rates if n.startswith("down_blocks."))
    assert all(rates[n] == pytest.approx(2.0 * lr) for n in rates if n.startswith("up_blocks."))
    assert any(n.startswith("down_blocks.") for n in rates) and any(n.startswith("up_blocks.") for n in rates)
    assert session.optimizer.param_groups[-1]["lr"] == pytest.approx(3e-4)  # the text encoder keeps its own rate
    plain = prepare(tiny_config(tmp_path / "plain", tiny_folders, images, optimizer={"learning_rate": lr}))
    assert set(rates_by_layer(plain).values()) == {lr} and any(n.startswith("mid_block.") for n in
                                                                rates_by_layer(plain))  # fmt: skip

    plus = {"block_lr_weights": [0.5, 1.0, 1.0], "loraplus_lr_ratio": 4}
    with_loraplus = prepare(tiny_config(tmp_path / "plus", tiny_folders, images, optimizer={"learning_rate": lr},
                                        lora=plus))  # fmt: skip
    groups = [(g["lr"], len(g["params"])) for g in with_loraplus.optimizer.param_groups]
    assert groups[0][0] == lr and sorted(r for r, _ in groups[:4]) == pytest.approx([0.5 * lr, lr, 2 * lr, 4 * lr])

    done = run_training(tiny_config(tmp_path / "file", tiny_folders, images, optimizer={"max_train_steps": 1},
                                    lora={"block_lr_weights": [1.0] * 12 + [0.0] + [0.5] * 12}))  # fmt: skip
    with safe_open(str(done.lora_path), "pt") as file:
        args = json.loads(file.metadata()["ss_network_args"])
        assert not any("mid_block" in key for key in file.keys())
    assert args["down_lr_weight"] == ",".join(["1"] * 12) and args["mid_lr_weight"] == "0"
    assert args["up_lr_weight"] == ",".join(["0.5"] * 12)

    with pytest.raises(LoraStudioError, match="kohya.s 23 SDXL blocks, but the base model is not SDXL"):
        prepare(tiny_config(tmp_path / "xl", tiny_folders, images, lora={"block_lr_weights": [1.0] * 23}))


def test_kohyas_block_weights_migrate_with_presets_threshold_and_sdxl_layout():
    def weights(**kohya) -> list[float]:
        return validate_config(kohya).lora.block_lr_weights

    sine = weights(network_args=["down_lr_weight=sine", "mid_lr_weight=0.5", "up_lr_weight=1,1,0.25"])
    assert len(sine) == 25 and sine[:12] == pytest.approx([math.sin(math.pi * i / 11 / 2) for i in range(12)])
    assert sine[12] == 0.5 and sine[13:16] == [1.0, 1.0, 0.25] and sine[16:] == [1.0] * 9  # short lists: 1s after
    cut = weights(network_args=["up_lr_weight=reverse_linear+0.1", "block_lr_zero_threshold=0.5"])
    assert cut[:13] == [1.0] * 13 and cut[13] == pytest.approx(1.1)
    assert cut[-6] == pytest.approx(0.1 + 5 / 11) and cut[-5:] == [0.0] * 5  # at or below 0.5: left out
    xl = weights(LoRA_type="Standard", sdxl=True, down_lr_weight="zeros+0.5", mid_lr_weight="", up_lr_weight="")
    assert len(xl) == 23 and xl[0] == xl[-1] == 1.0 and xl[1:10] == [0.5] * 9 and xl[10:22] == [1.0] * 12
    assert len(weights(network_args=["down_lr_weight=1,1,1,1,1,1,1,1,0.5"])) == 23  # SDXL's 9 input blocks
    assert weights(network_args=["down_lr_weight=", "conv_dim=4"]) == []
    with pytest.raises(ConfigError, match="`up_lr_weight` has 13 values, more than the 12 blocks"):
        weights(network_args=["up_lr_weight=" + ",".join(["1"] * 13)])
    with pytest.raises(ConfigError, match="block learning rates"):
        weights(network_args=["down_lr_weight=steep"])
    with pytest.raises(ConfigError, match="block_lr_weights has 4 values"):
        validate_config({"version": 1, "lora": {"block_lr_weights": [1, 1, 1, 1]}})
    with pytest.raises(ConfigError, match="lay both out alike"):
        validate_config({"version": 1, "lora": {"block_lr_weights": [1, 1, 1], "block_ranks": [4] * 25}})


def test_conv_block_ranks_give_each_blocks_convs_their_rank_and_alpha(tiny_folders):
    """kohya's conv_block_dims / conv_block_alphas: the 3x3 convs of each block at its own rank and alpha, 0 leaving
    a block's convs out; the linear layers keep theirs (peft takes the first pattern that matches, so the
    per-block entries must come before conv_rank's)."""
    from peft.tuners.lora import LoraLayer

    from lora_studio.config import LoraConfig
    from lora_studio.lora import ADAPTER_NAME, LOCON, inject_lora
    from lora_studio.models import load_base

    base = load_base(tiny_folders["sd1"], device="cpu")
    inject_lora(base, LoraConfig(rank=4, alpha=4.0, unet_targets="full", conv_rank=2, conv_alpha=1.0,
                                 conv_block_ranks=[6, 0, 8], conv_block_alphas=[3.0, 1.0, 2.0],
                                 train_text_encoder=False))  # fmt: skip
    layers = {n: m for n, m in base.unet.named_modules() if isinstance(m, LoraLayer)}
    convs = {n: (m.r[ADAPTER_NAME], m.lora_alpha[ADAPTER_NAME]) for n, m in layers.items() if LOCON.match(n)}
    assert convs and not any(n.startswith("mid_block.") for n in convs)
    assert all(v == (6, 3.0) for n, v in convs.items() if n.startswith("down_blocks."))
    assert all(v == (8, 2.0) for n, v in convs.items() if n.startswith("up_blocks."))
    linear = [(m.r[ADAPTER_NAME], m.lora_alpha[ADAPTER_NAME]) for n, m in layers.items() if not LOCON.match(n)]
    assert linear and set(linear) == {(4, 4.0)}
    with pytest.raises(ConfigError, match="set unet_targets = 'full'"):
        validate_config({"version": 1, "lora": {"conv_block_ranks": [1, 1, 1]}})


def test_kohya_ss_block_fields_and_network_args_migrate_and_the_file_records_them():
    from lora_studio.lora_metadata import network_args

    ranks = ",".join(["4"] * 25)
    gui = validate_config({"LoRA_type": "Kohya LoCon", "conv_dim": 2, "block_dims": ranks, "block_alphas": "",
                           "conv_block_dims": ranks, "conv_block_alphas": ",".join(["1"] * 25)})  # fmt: skip
    assert gui.lora.block_ranks == [4] * 25 and gui.lora.conv_block_ranks == [4] * 25
    assert gui.lora.conv_block_alphas == [1.0] * 25 and gui.lora.unet_targets == "full"
    flat = validate_config({"network_args": [f"conv_block_dims={ranks}"]})
    assert flat.lora.conv_block_ranks == [4] * 25 and flat.lora.unet_targets == "full"
    assert network_args(flat.lora)["conv_block_dims"] == ranks

