"""Baking a stack of LoRAs into one, and extracting a LoRA from a fine-tune's difference to its base: on tiny models,
with the deltas checked against their sums and SVDs and the images against the stack and the fine-tune."""

import math

import numpy as np
import pytest
import torch
from test_export import generate

from lora_studio import tools
from lora_studio.cli import main
from lora_studio.lora import TEXT_ENCODER_DEFAULT, text_encoder_target_names, unet_target_names
from lora_studio.lora_file import LoraFile, LoraFileError, LoraModule, module_map
from lora_studio.lora_read import load_lora
from lora_studio.models import load_base
from lora_studio.sample import Previewer


def random_lora(base, seed: int, rank: int, every: int = 3, scale: float = 0.08) -> LoraFile:
    """A LoRA on every `every`-th layer that training adapts with the `full` targets (linear and conv, UNet and text
    encoder), small enough that the tiny model's image changes without turning to noise."""
    generator = torch.Generator().manual_seed(seed)
    trained = set(unet_target_names(base.unet, "full")) | {
        p for e in base.text_encoders for p in text_encoder_target_names(e, TEXT_ENCODER_DEFAULT)}  # fmt: skip
    modules = {}
    adaptable = sorted((n, layer) for n, (_part, path, layer) in module_map(base).items() if path in trained)
    for index, (name, layer) in enumerate(adaptable):
        if index % every:
            continue
        weight = layer.weight
        down_shape = (rank, weight.shape[1], *weight.shape[2:])
        up_shape = (weight.shape[0], rank, *([1] * (weight.dim() - 2)))
        down = torch.randn(down_shape, generator=generator) * scale
        up = torch.randn(up_shape, generator=generator) * scale
        modules[name] = LoraModule(down, up, alpha=rank / 2)
    return LoraFile(modules, {"modelspec.trigger_phrase": f"t{seed}"}, "kohya", base.family)


@pytest.fixture(scope="module")
def sd1(tiny_folders):
    return load_base(tiny_folders["sd1"], device="cpu")


def test_a_baked_stack_is_exactly_the_sum_of_its_deltas(sd1):
    a, b = random_lora(sd1, 1, rank=4), random_lora(sd1, 2, rank=2, every=2)
    baked, report = tools.bake_stack([(a, 0.7), (b, -0.5)])
    assert set(baked.modules) == set(a.modules) | set(b.modules) and report.resize is None
    for name, module in baked.modules.items():
        expected = sum(strength * lora.modules[name].delta() for lora, strength in ((a, 0.7), (b, -0.5))
                       if name in lora.modules)  # fmt: skip
        assert torch.allclose(module.delta(), expected, atol=1e-6), name
        assert module.rank == sum(lora.modules[name].rank for lora in (a, b) if name in lora.modules)
    assert baked.metadata["modelspec.trigger_phrase"] == "t1, t2" and "Baked" in report.sentence()


def test_the_baked_lora_renders_like_the_stack(tiny_folders):
    base = load_base(tiny_folders["sd1"], device="cpu")
    a, b = random_lora(base, 3, rank=4), random_lora(base, 4, rank=4, every=2)
    previewer = Previewer(base)
    previewer.add_lora(a, "a")
    previewer.add_lora(b, "b")
    baked, _ = tools.bake_stack([(a, 0.8), (b, 0.6)])
    previewer.add_lora(baked, "baked")
    previewer.set_strengths({"a": 0.8, "b": 0.6})
    stack = generate(previewer.pipeline, 1.0)
    previewer.set_strengths({"baked": 1.0})
    alone = generate(previewer.pipeline, 1.0)
    previewer.set_strengths({})
    plain = generate(previewer.pipeline, 1.0)
    assert np.abs(stack - alone).max() <= 2 and np.abs(stack - plain).max() > 10


def test_an_svd_bake_reports_the_error_it_made(sd1):
    a, b = random_lora(sd1, 5, rank=4), random_lora(sd1, 6, rank=4)
    exact, _ = tools.bake_stack([(a, 1.0), (b, 1.0)])
    small, report = tools.bake_stack([(a, 1.0), (b, 1.0)], rank=3)
    assert report.rank == 3 and all(m.rank <= 3 for m in small.modules.values())
    lost = math.sqrt(sum(float(torch.linalg.norm((exact.modules[n].delta() - small.modules[n].delta()).flatten(1)))
                         ** 2 for n in exact.modules))  # fmt: skip
    dropped = math.sqrt(sum(float((torch.linalg.svdvals(m.delta().flatten(1).double())[3:] ** 2).sum())
                            for m in exact.modules.values()))  # fmt: skip
    assert report.resize.total_error == pytest.approx(lost, rel=1e-4) == pytest.approx(dropped, rel=1e-4)
    assert "SVD to rank 3, Frobenius error" in report.sentence()


def test_what_cannot_be_baked_is_refused(sd1, tiny_folders):
    a = random_lora(sd1, 7, rank=2)
    name = next(iter(a.modules))
    dora = LoraFile({name: LoraModule(a.modules[name].down, a.modules[name].up, 1.0,
                                      torch.ones(a.modules[name].up.shape[0], 1))}, {}, "kohya", "sd1")  # fmt: skip
    with pytest.raises(LoraFileError, match="is DoRA"):
        tools.bake_stack([(a, 1.0), (dora, 1.0)])
    sdxl = random_lora(load_base(tiny_folders["sdxl"], device="cpu"), 8, rank=2)
    with pytest.raises(LoraFileError, match="mixes model families"):
        tools.bake_stack([(a, 1.0), (sdxl, 1.0)])
    wrong = LoraFile({name: LoraModule(torch.ones(2, 3), torch.ones(5, 2), 2.0)}, {}, "kohya", "sd1")
    with pytest.raises(LoraFileError, match="different layer shapes"):
        tools.bake_stack([(a, 1.0), (wrong, 1.0)])


def test_the_merge_loras_command_writes_the_bake(sd1, tmp_path, capsys):
    from lora_studio.export import save_kohya

    files = []
    for seed in (9, 10):
        files.append(save_kohya(random_lora(sd1, seed, rank=2), tmp_path / f"l{seed}.safetensors", torch.float32))
    out = tmp_path / "both.safetensors"
    assert main(["merge-loras", f"{files[0]}:0.7", str(files[1]), "-o", str(out), "--precision", "fp32"]) == 0
    assert "l9 x 0.7" in capsys.readouterr().out.replace(".safetensors", "")
    expected, _ = tools.bake_stack([(load_lora(files[0]), 0.7), (load_lora(files[1]), 1.0)])
    written = load_lora(out)
    assert all(torch.equal(written.modules[n].up, m.up) and torch.equal(written.modules[n].down, m.down)
               for n, m in expected.modules.items())  # fmt: skip
    assert main(["merge-loras", f"{files[0]}:strong", "-o", str(out)]) == 1
    assert "must be a number" in capsys.readouterr().err


def fine_tune(base, tmp_path, rank: int = 2):
    """A copy of `base` with a known low-rank change on some UNet layers (a conv among them); saved as a folder."""
    generator = torch.Generator().manual_seed(0)
    tuned = load_base(base.source, device="cpu")
    changed = {}
    layers = dict(tuned.unet.named_modules())
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    for path in (f"{block}.attn1.to_q", f"{block}.ff.net.2", "down_blocks.0.resnets.0.conv1"):
        weight = layers[path].weight
        flat = torch.randn(weight.shape[0], rank, generator=generator) @ torch.randn(
            rank, weight[0].numel(), generator=generator)  # fmt: skip
        change = (0.05 * flat).reshape(weight.shape)
        with torch.no_grad():
            weight += change
        changed[path] = change
    folder = tmp_path / "tuned"
    tuned.pipeline.save_pretrained(folder)
    return tuned, folder, changed


def test_an_extracted_lora_reproduces_the_fine_tunes_difference(sd1, tmp_path):
    tuned, _folder, changed = fine_tune(sd1, tmp_path)
    lora, report = tools.extract_lora(sd1, tuned, rank=2, targets="full")
    assert len(lora.modules) == 3  # the text encoders did not change: nothing taken from them
    by_path = {name: path for name, (_part, path, _layer) in module_map(sd1).items()}
    for name, module in lora.modules.items():
        assert torch.allclose(module.delta(), changed[by_path[name]], atol=1e-5), name
    assert report.relative_error < 1e-5
    one, report_one = tools.extract_lora(sd1, tuned, rank=1, targets="full")
    dropped = math.sqrt(sum(float((torch.linalg.svdvals(c.flatten(1).double())[1:] ** 2).sum())
                            for c in changed.values()))  # fmt: skip
    assert report_one.total_error == pytest.approx(dropped, rel=1e-4) and report_one.relative_error > 0.1
    _, attention_only = tools.extract_lora(sd1, tuned, rank=2, targets="attn")
    assert len(attention_only.per_module) == 1
    with pytest.raises(LoraFileError, match="same weights"):
        tools.extract_lora(sd1, sd1, rank=2)


def test_the_extract_command_writes_a_lora_that_renders_like_the_fine_tune(sd1, tiny_folders, tmp_path, capsys):
    tuned, folder, _ = fine_tune(sd1, tmp_path)
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", str(tiny_folders["sd1"]), str(folder), "-o", str(out), "--rank", "2", "--targets", "full",
                 "--precision", "fp32"]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    base = load_base(tiny_folders["sd1"], device="cpu")
    previewer = Previewer(base)
    previewer.add_lora(load_lora(out), "extracted")
    previewer.set_strengths({"extracted": 1.0})
    with_lora = generate(previewer.pipeline, 1.0)
    previewer.set_strengths({"extracted": 0.0})
    plain = generate(previewer.pipeline, 1.0)
    tuned.pipeline.set_progress_bar_config(disable=True)
    assert np.abs(with_lora - generate(tuned.pipeline, 1.0)).max() <= 2 and np.abs(with_lora - plain).max() > 5
