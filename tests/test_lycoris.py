"""LyCORIS LoHa and LoKr: trained through peft, written in LyCORIS' key format, read back with equal tensors,
applied as the consumers apply them (ComfyUI's formulas, restated below from its source), previewed with strength,
and files of other trainers' shapes (Tucker cores, decomposed factors, no alpha) read or clearly refused."""

import json

import numpy as np
import pytest
import torch
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors.torch import load_file, save_file
from test_export import trained_session
from test_lora import unet_output
from test_sample import pixels, settings
from test_train import tiny_config
from tiny_models import caption_images

from lora_studio import outputs
from lora_studio.cli import main
from lora_studio.config import LoraConfig, TrainConfig
from lora_studio.export import load_into_pipeline
from lora_studio.lora import inject_lora
from lora_studio.lora_file import LoraFileError, kohya_name, module_map
from lora_studio.lora_inspect import inspect_lora
from lora_studio.lora_read import fitted_to, load_lora
from lora_studio.models import load_base
from lora_studio.sample import Previewer
from lora_studio.tools import bake_stack, resize_lora
from lora_studio.train import run_training

LYCORIS = {"rank": 4, "alpha": 8.0, "unet_targets": "full", "conv_rank": 2, "conv_alpha": 1.0}
SUFFIXES = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
            "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return caption_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module", params=["loha", "lokr"])
def trained(request, tmp_path_factory, tiny_folders, images):
    """A tiny SD1 model after a few LoHa / LoKr steps (UNet with convs, text encoder), and its file."""
    tmp = tmp_path_factory.mktemp(request.param)
    session = trained_session(tmp, tiny_folders, images, lora={**LYCORIS, "network": request.param})
    return request.param, session, outputs.save_lora_file(session, tmp / "lycoris.safetensors")


def comfy_delta(get, weight_shape):
    """ComfyUI's `comfy/weight_adapter/loha.py` and `lokr.py` calculate_weight at strength 1, restated."""
    alpha, tucker = get("alpha"), "i j k l, j r, i p -> p r k l"
    alpha = None if alpha is None else float(alpha)
    if get("hada_w1_a") is not None:
        w1a, w1b, w2a, w2b, t1, t2 = (get(k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                                        "hada_t1", "hada_t2"))  # fmt: skip
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        if t1 is not None:
            m1, m2 = torch.einsum(tucker, t1, w1b, w1a), torch.einsum(tucker, t2, w2b, w2a)
        else:
            m1, m2 = w1a @ w1b, w2a @ w2b
        return (m1 * m2).reshape(weight_shape) * scale
    w1, w2, dim = get("lokr_w1"), get("lokr_w2"), None
    if w1 is None:
        dim, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a") @ get("lokr_w1_b")
    if w2 is None:
        dim, t2 = get("lokr_w2_b").shape[0], get("lokr_t2")
        w2 = (torch.einsum(tucker, t2, get("lokr_w2_b"), get("lokr_w2_a")) if t2 is not None
              else get("lokr_w2_a") @ get("lokr_w2_b"))  # fmt: skip
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(weight_shape) * scale  # this torch's kron wants it


def file_getter(tensors, name):
    return lambda key: None if f"{name}.{key}" not in tensors else tensors[f"{name}.{key}"].float()


def test_untrained_loha_and_lokr_change_nothing_and_only_their_factors_train(tiny_folders):
    for network in ("loha", "lokr"):
        base = load_base(tiny_folders["sd1"], device="cpu")
        before = unet_output(base)
        injected = inject_lora(base, LoraConfig(**LYCORIS, network=network))
        assert set(injected) == {"unet", "text_encoder"}
        assert torch.equal(unet_output(base), before)
        prefix = {"loha": ".hada_", "lokr": ".lokr_"}[network]
        for model in (base.unet, base.text_encoders[0]):
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            assert names and all(prefix in n for n in names), network
            assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}


def test_the_file_holds_lycoris_keys_that_load_back_equal_and_apply_as_comfyui_and_peft_apply_them(trained):
    network, session, path = trained
    written = load_file(str(path))
    names = {k.rsplit(".", 1)[0] for k in written}
    assert {k.rsplit(".", 1)[1] for k in written} <= SUFFIXES[network]
    lora = load_lora(path)
    assert lora.network == network and lora.family == "sd1" and set(lora.modules) == names
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(lora.metadata["ss_network_args"])
    assert args["algo"] == network and args["conv_dim"] == "2"
    reloaded = lora.state_dict()
    assert set(reloaded) == set(written) and all(torch.equal(reloaded[k], written[k]) for k in written)

    layers = {
        kohya_name(part, path_, "sd1"): layer
        for part, model in session.base.lora_parts().items()
        for path_, layer in model.named_modules()
        if isinstance(layer, LycorisLayer)
    }
    assert set(layers) == names and any(layer.get_base_layer().weight.dim() == 4 for layer in layers.values())
    moved = 0
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        trained_delta = layer.get_delta_weight("default").detach().float()
        # the file is fp32 (tiny_config's save precision): equal to float rounding
        assert torch.allclose(comfy_delta(file_getter(written, name), weight.shape), trained_delta, atol=1e-6), name
        assert torch.allclose(lora.modules[name].delta().reshape(weight.shape), trained_delta, atol=1e-6), name
        moved += bool(trained_delta.abs().max() > 1e-3)
    assert moved > len(layers) // 2, "training moved the adapters off their no-op start"


def test_lycoris_itself_applies_the_file_as_the_trained_model_computes(trained, tiny_folders):
    """LyCORIS' own loader (`lycoris.modules.get_module` picks the module type from the keys, as its kohya wrapper
    does, and `make_module` builds it) on a fresh base, through LyCORIS' forward: the UNet and the text encoder give
    what the trained peft model gives. The text encoder goes in under `text_model`, as kohya's names have it."""
    from lycoris.modules import get_module, make_module

    network, session, path = trained
    written = load_file(str(path))
    base = load_base(tiny_folders["sd1"], device="cpu")
    plain_output = unet_output(base)
    applied, te = [], torch.nn.ModuleDict({"text_model": base.text_encoders[0]})
    for prefix, model in (("lora_unet", base.unet), ("lora_te", te)):
        for name, module in model.named_modules():
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if f"{lora_name}.alpha" in written:
                kind, params = get_module(written, lora_name)
                applied.append(make_module(kind, params, lora_name, module))
    assert len(applied) == len({k.rsplit(".", 1)[0] for k in written})
    assert {type(m).__name__ for m in applied} == {"loha": {"LohaModule"}, "lokr": {"LokrModule"}}[network]
    for module in applied:
        module.apply_to()
    assert torch.allclose(unet_output(base), unet_output(session.base), atol=1e-5)
    assert (unet_output(base) - plain_output).abs().max() > 1e-2
    ids = torch.tensor([[0, 5, 9, 2, 1]])
    with torch.no_grad():
        ours = base.text_encoders[0](ids).last_hidden_state
        assert torch.allclose(ours, session.base.text_encoders[0](ids).last_hidden_state, atol=1e-5)


def test_a_lycoris_file_previews_as_the_trained_model_renders_and_strength_scales_it(trained, tiny_folders):
    """diffusers has no LoHa/LoKr loader: the preview loads each module's exact plain-LoRA equivalent. The UNet and
    text encoder then give what the trained peft model gives, and strength 0 is the base model."""
    network, session, path = trained
    lora = load_lora(path)
    base = load_base(tiny_folders["sd1"], device="cpu")
    plain_output = unet_output(base)
    load_into_pipeline(base.pipeline, fitted_to(lora, base), "x")
    assert torch.allclose(unet_output(base), unet_output(session.base).to(base.dtype), atol=1e-5)
    assert (unet_output(base) - plain_output).abs().max() > 1e-2
    ids = torch.tensor([[0, 5, 9, 2, 1]])
    with torch.no_grad():
        ours = base.text_encoders[0](ids).last_hidden_state
        theirs = session.base.text_encoders[0](ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)

    previewer = Previewer(load_base(tiny_folders["sd1"], device="cpu"))
    unadapted = pixels(previewer.generate(settings())[0])
    name = previewer.add_lora(path)

    def image(strength):
        return pixels(previewer.generate(settings(strengths={name: strength}))[0])

    assert np.allclose(image(0.0), unadapted, atol=1e-3), "strength 0 is the base model"
    half, one = image(0.5), image(1.0)
    assert np.abs(half - unadapted).max() > 0.02 and np.abs(one - half).max() > 0.02


def test_inspect_resize_and_bake_take_lycoris_files(trained, capsys):
    network, _, path = trained
    info = inspect_lora(path)
    assert info["network"] == {network: info["modules"]} and info["modules_per_part"] == {"unet": 98, "te": 12}
    assert main(["inspect", str(path), "--modules"]) == 0
    printed = capsys.readouterr().out
    assert f"network: {{'{network}': 110}}" in printed and f"attn1_to_q: {network} rank" in printed
    lora = load_lora(path)
    exact, report = resize_lora(lora, energy=1.0)  # an SVD that keeps everything: the plain equivalent
    assert report.relative_error < 1e-5 and exact.metadata["ss_network_module"] == "networks.lora"
    assert "algo" not in json.loads(exact.metadata["ss_network_args"])
    baked, _ = bake_stack([(lora, 0.5)])
    for name, module in lora.modules.items():
        delta = module.delta().flatten()
        assert torch.allclose(exact.modules[name].delta().flatten(), delta, atol=1e-5), name
        assert torch.allclose(baked.modules[name].delta().flatten(), 0.5 * delta, atol=1e-5), name
        conv = any(mark in name for mark in ("resnets", "samplers", "proj_in", "proj_out"))  # SD1: 1x1 proj convs
        assert baked.modules[name].down.dim() == (4 if conv else 2), name


def tiny_layers(tiny_folders):
    base = load_base(tiny_folders["sd1"], device="cpu")
    shapes = {name: tuple(m.weight.shape) for name, (_, _, m) in module_map(base).items()}
    linear = next(n for n in shapes if n.endswith("attn1_to_q"))
    conv = next(n for n in shapes if n.endswith("resnets_0_conv1"))
    return base, shapes, linear, conv


def other_trainers_modules(shapes, linear, conv) -> dict[str, torch.Tensor]:
    """LyCORIS shapes this app does not write itself: Tucker LoHa and LoKr convs, LoKr with both factors
    decomposed, a full 4-D LoKr w2, LoHa without alpha, and a LoCon conv with a Tucker core (lora_mid)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    (out_l, in_l), (out_c, in_c, kh, kw) = shapes[linear], shapes[conv]
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # (diffusers loads no q_proj without out_proj beside it)
    q_out, q_in = shapes[te]
    up_conv = conv.replace("down_blocks_0", "up_blocks_1")
    tucker = "lora_unet_down_blocks_1_resnets_0_conv2"
    o2, i2, _, _ = shapes[up_conv]
    return {
        f"{linear}.hada_w1_a": r(out_l, 3), f"{linear}.hada_w1_b": r(3, in_l),
        f"{linear}.hada_w2_a": r(out_l, 3), f"{linear}.hada_w2_b": r(3, in_l),  # no alpha: scale 1
        f"{conv}.hada_t1": r(2, 2, kh, kw), f"{conv}.hada_w1_a": r(2, out_c), f"{conv}.hada_w1_b": r(2, in_c),
        f"{conv}.hada_t2": r(2, 2, kh, kw), f"{conv}.hada_w2_a": r(2, out_c), f"{conv}.hada_w2_b": r(2, in_c),
        f"{conv}.alpha": torch.tensor(1.0),
        f"{te}.lokr_w1_a": r(4, 1), f"{te}.lokr_w1_b": r(1, 4),
        f"{te}.lokr_w2_a": r(q_out // 4, 2), f"{te}.lokr_w2_b": r(2, q_in // 4), f"{te}.alpha": torch.tensor(3.0),
        f"{up_conv}.lokr_w1": r(4, 4), f"{up_conv}.lokr_w2": r(o2 // 4, i2 // 4, 3, 3),
        f"{up_conv}.alpha": torch.tensor(5.0),  # no decomposed factor: the scale is 1, not 5 / anything
        f"{tucker}.lokr_w1": r(4, 4), f"{tucker}.lokr_t2": r(2, 2, 3, 3),
        f"{tucker}.lokr_w2_a": r(2, shapes[tucker][0] // 4), f"{tucker}.lokr_w2_b": r(2, shapes[tucker][1] // 4),
        f"{tucker}.alpha": torch.tensor(2.0),
    }  # fmt: skip


def test_lycoris_files_of_other_trainers_load_check_and_preview_exactly(tmp_path, tiny_folders):
    base, shapes, linear, conv = tiny_layers(tiny_folders)
    tensors = other_trainers_modules(shapes, linear, conv)
    locon = "lora_unet_down_blocks_1_resnets_1_conv1"
    o, i, kh, kw = shapes[locon]
    g = torch.Generator().manual_seed(1)
    down, mid, up = (torch.randn(3, i, 1, 1, generator=g), torch.randn(3, 3, kh, kw, generator=g),
                     torch.randn(o, 3, 1, 1, generator=g))  # fmt: skip
    tensors |= {f"{locon}.lora_down.weight": down, f"{locon}.lora_mid.weight": mid, f"{locon}.lora_up.weight": up,
                f"{locon}.alpha": torch.tensor(3.0)}  # fmt: skip
    path = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})

    lora = load_lora(path)
    assert len(lora.modules) == 6
    fitted = fitted_to(lora, base)
    for name, module in lora.modules.items():
        if name == locon:  # ComfyUI's LoCon rule with lora_mid (alpha 3 / rank 3: scale 1)
            folded = (down.transpose(0, 1).flatten(1) @ mid.transpose(0, 1).flatten(1)).reshape(i, 3, kh, kw)
            expected = (up.flatten(1) @ folded.transpose(0, 1).flatten(1)).reshape(o, i, kh, kw)
        else:
            expected = comfy_delta(file_getter(tensors, name), shapes[name])
        assert torch.allclose(module.delta().reshape(shapes[name]), expected, atol=1e-4), name
        assert torch.allclose(fitted.modules[name].delta().reshape(shapes[name]), expected, atol=1e-4), name
    assert inspect_lora(path)["network"] == {"loha": 2, "lokr": 3, "lora": 1}

    previewer = Previewer(base)
    name = previewer.add_lora(path)
    assert np.abs(pixels(previewer.generate(settings(strengths={name: 1.0}))[0])
                  - pixels(previewer.generate(settings(strengths={name: 0.0}))[0])).max() > 0.02  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, n: t.pop(f"{n}.hada_w2_b"), r"loha module .* has no hada_w2_b tensor; the file is incomplete"),
        (lambda t, n: t.update({f"{n}.hada_w2_b": torch.zeros(3, 7)}), r"shapes do not multiply .*damaged"),
        (lambda t, n: t[f"{n}.hada_w1_a"].__setitem__((0, 0), float("nan")), r"hada_w1_a holds NaN or inf"),
        (lambda t, n: t.update({f"{n}.dora_scale": torch.ones(4, 1)}), r"dora_scale .* does not apply"),
        (lambda t, n: t.update({f"{n}.oft_blocks": torch.ones(2, 2)}), r"does not know.*not OFT, IA3 or GLoRA"),
    ],
)
def test_damaged_lycoris_files_are_refused_naming_the_file_and_module(tmp_path, tiny_folders, change, message):
    _, shapes, linear, conv = tiny_layers(tiny_folders)
    tensors = other_trainers_modules(shapes, linear, conv)
    change(tensors, linear)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraFileError, match=message) as caught:
        load_lora(path)
    assert str(path) in str(caught.value)


def test_a_lycoris_file_for_another_model_is_refused_before_anything_loads(tmp_path, tiny_folders):
    base, shapes, linear, conv = tiny_layers(tiny_folders)
    out, inp = shapes[linear]
    tensors = {f"{linear}.hada_w1_a": torch.ones(out, 2), f"{linear}.hada_w1_b": torch.ones(2, inp + 8),
               f"{linear}.hada_w2_a": torch.ones(out, 2), f"{linear}.hada_w2_b": torch.ones(2, inp + 8)}  # fmt: skip
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraFileError, match=rf"module {linear} changes a weight of shape \({out}, {inp}\)"):
        fitted_to(load_lora(path), base)


def test_lycoris_settings_are_checked_where_every_setting_is(tiny_folders):
    with pytest.raises(ValueError, match="use_dora is LoRA's weight decomposition"):
        LoraConfig(network="loha", use_dora=True)
    with pytest.raises(ValueError, match="peft's lokr has none, so set dropout to 0"):
        LoraConfig(network="lokr", dropout=0.1)
    config = TrainConfig(lora={"network": "lokr"}, save={"format": "diffusers"})
    assert any("set save.format = 'kohya'" in p for p in config.combination_problems())


@pytest.mark.parametrize("network", ["loha", "lokr"])
def test_a_lycoris_run_stopped_and_resumed_equals_one_straight_run(tmp_path, tiny_folders, images, network):
    from test_train import stopper

    lora = {**LYCORIS, "network": network, **({"lokr_factor": 4} if network == "lokr" else {})}
    straight = run_training(tiny_config(tmp_path / "a", tiny_folders, images, lora=lora))
    commands, stop_at_5 = stopper(5)
    config = tiny_config(tmp_path / "b", tiny_folders, images, lora=lora)
    stopped = run_training(config, on_event=stop_at_5, commands=commands)
    resumed = run_training(config, resume_from=stopped.run_dir)
    a, b = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert resumed.step == 8 and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    args = json.loads(load_lora(resumed.lora_path).metadata["ss_network_args"])
    assert args["algo"] == network and args.get("factor") == ("4" if network == "lokr" else None)
