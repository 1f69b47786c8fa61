"""Preview: per-LoRA strengths without reloads, samplers, grids, A1111 infotext, training samples, CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_export import trained_session
from test_train import tiny_config
from tiny_models import caption_images

from lora_studio import outputs
from lora_studio import session as session_module
from lora_studio import step as step_module
from lora_studio import train as train_module
from lora_studio.cli import main
from lora_studio.lora_file import LoraFileError
from lora_studio.models import load_base
from lora_studio.sample import (
    SAMPLERS,
    Axis,
    Previewer,
    PreviewError,
    PreviewSettings,
    infotext,
    parse_parameters,
    read_parameters,
    save_png,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return caption_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory, tiny_folders, images):
    """Two different LoRAs for the tiny SD1 model (different seeds and targets)."""
    paths = []
    for i, lora in enumerate(({"rank": 4, "alpha": 4.0}, {"rank": 2, "alpha": 2.0, "unet_targets": "attn"})):
        tmp = tmp_path_factory.mktemp(f"lora{i}")
        session = trained_session(tmp, tiny_folders, images, "sd1", lora=lora, seed=7 + i)
        paths.append(outputs.save_lora_file(session, tmp / f"lora{i}.safetensors"))
    return paths


def settings(**changes) -> PreviewSettings:
    defaults = dict(prompt="zkz, a thing", sampler="ddim", steps=3, cfg=5.0, seed=3, width=32, height=32)
    return PreviewSettings(**{**defaults, **changes})


def pixels(preview) -> np.ndarray:
    return np.asarray(preview.image, dtype=np.float32) / 255.0


def test_strength_contract_on_a_tiny_model(tiny_folders, two_loras):
    plain = Previewer(load_base(tiny_folders["sd1"], device="cpu")).generate(settings())[0]
    previewer = Previewer(load_base(tiny_folders["sd1"], device="cpu"))
    a, b = (previewer.add_lora(p) for p in two_loras)
    assert (a, b) == ("lora0", "lora1")

    def image(**strengths):
        return pixels(previewer.generate(settings(strengths=strengths))[0])

    zero, half, one = image(lora0=0.0), image(lora0=0.5), image(lora0=1.0)
    assert np.allclose(zero, pixels(plain), atol=1e-3), "strength 0 is the base model"
    assert np.abs(half - zero).max() > 0.02 and np.abs(half - one).max() > 0.02
    both = image(lora0=1.0, lora1=1.0)
    assert np.abs(both - one).max() > 0.02 and np.abs(both - image(lora1=1.0)).max() > 0.02, "two LoRAs combine"
    negative = image(lora0=-1.0)
    assert np.abs(negative - zero).max() > 0.02 and np.abs(negative - one).max() > 0.02
    assert np.array_equal(image(lora0=0.5), half), "a seeded generation is reproducible"


def test_changing_strength_reloads_nothing(tiny_folders, two_loras, monkeypatch):
    previewer = Previewer(load_base(tiny_folders["sd1"], device="cpu"))
    name = previewer.add_lora(two_loras[0])
    layer = next(m for m in previewer.pipeline.unet.modules() if hasattr(m, "lora_A") and name in m.lora_A)
    weight = layer.lora_A[name].weight
    before = weight.detach().clone()
    loads = []
    monkeypatch.setattr(previewer.pipeline, "load_lora_weights", lambda *a, **k: loads.append(a))
    for strength in (0.0, 0.7, -1.5, 2.0):
        previewer.generate(settings(strengths={name: strength}))
    assert loads == []
    assert layer.lora_A[name].weight is weight and torch.equal(weight, before)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_renders(tiny_folders, sampler):
    previewer = Previewer(load_base(tiny_folders["sd1"], device="cpu"))
    first = previewer.generate(settings(sampler=sampler, steps=4))[0]
    again = previewer.generate(settings(sampler=sampler, steps=4))[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert read_parameters_of(first)["Steps"] == "4"


def read_parameters_of(preview):
    return parse_parameters(preview.parameters)


def test_settings_errors_and_notices(tiny_folders):
    previewer = Previewer(load_base(tiny_folders["sd1"], device="cpu"))
    snapped = previewer.generate(settings(width=60, height=36, prompt=""))  # an empty prompt is allowed
    assert snapped[0].image.size == (64, 40)
    assert "60x36 is not a multiple of 8; rendering 64x40" in snapped[0].notices[0]
    with pytest.raises(PreviewError, match=r"strength 3 of LoRA 'x' is outside \[-2, 2\]"):
        settings(strengths={"x": 3.0}).checked()
    with pytest.raises(PreviewError, match="No LoRA named 'ghost' is loaded"):
        previewer.generate(settings(strengths={"ghost": 1.0}))
    with pytest.raises(LoraFileError, match="does not exist"):
        previewer.add_lora("/nowhere/missing.safetensors")
    with pytest.raises(PreviewError, match="sampler 'k_lms' is unknown"):
        settings(sampler="k_lms").checked()
    with pytest.raises(PreviewError, match="the negative prompt has 70,000 characters; use at most 65,536"):
        settings(negative_prompt="n" * 70_000).checked()
    for seed in (-1, 2**64):  # torch's generator raised "Overflow when unpacking long" mid-render on the second
        with pytest.raises(PreviewError, match=f"seed = {seed}; use 0 to 4294967295"):
            settings(seed=seed).checked()


def test_family_mismatch_is_refused(tiny_folders, two_loras):
    previewer = Previewer(load_base(tiny_folders["sdxl"], device="cpu"))
    with pytest.raises(LoraFileError, match="SD 1.x LoRA but the base model .* is SDXL"):
        previewer.add_lora(two_loras[0])


def test_batch_count_seeds_and_reproducible_cells(tiny_folders, two_loras):
    previewer = Previewer(load_base(tiny_folders["sd1"], device="cpu"))
    name = previewer.add_lora(two_loras[0])
    batch = previewer.generate(settings(batch_count=3, strengths={name: 1.0}))
    assert [p.settings.seed for p in batch] == [3, 4, 5]
    single = previewer.generate(settings(seed=4, strengths={name: 1.0}))[0]
    assert np.array_equal(pixels(batch[1]), pixels(single))

    grid = previewer.grid(settings(), Axis("strength", (0.0, 0.5, 1.0), lora=name), Axis("seed", (1, 2)))
    assert len(grid.cells) == 2 and len(grid.cells[0]) == 3
    assert grid.cells[1][2].seed == 2 and grid.cells[1][2].strengths == {name: 1.0}
    width, height = grid.image.size
    assert width > 3 * 32 and height > 2 * 32  # cells plus the label margins
    again = previewer.render_cell(grid.cells[1][2])
    assert np.array_equal(pixels(again), pixels(grid.previews[1][2]))
    # The labels are drawn: the margins are not blank.
    margin = np.asarray(grid.image.convert("L"))[:16, width - 3 * 32 :]
    assert (margin < 128).any()


def test_checkpoint_axes(tiny_folders, two_loras):
    previewer = Previewer(load_base(tiny_folders["sd1"], device="cpu"))
    names = tuple(previewer.add_lora(p) for p in two_loras)
    grid = previewer.grid(settings(), Axis("checkpoint", names), Axis("seed", (1,)))
    assert [c.strengths for c in grid.cells[0]] == [{names[0]: 1.0, names[1]: 0.0}, {names[0]: 0.0, names[1]: 1.0}]
    assert not np.array_equal(pixels(grid.previews[0][0]), pixels(grid.previews[0][1]))

    grid = previewer.grid(settings(), Axis("strength", (0.0, 0.5)), Axis("checkpoint", names))
    assert [[c.strengths for c in row] for row in grid.cells] == [
        [{names[0]: 0.0, names[1]: 0.0}, {names[0]: 0.5, names[1]: 0.0}],
        [{names[0]: 0.0, names[1]: 0.0}, {names[0]: 0.0, names[1]: 0.5}],
    ]
    assert np.array_equal(pixels(grid.previews[0][0]), pixels(grid.previews[1][0])), "strength 0: same base image"
    with pytest.raises(PreviewError, match="needs the name of the LoRA"):
        previewer.grid(settings(), Axis("strength", (0.0, 1.0)), Axis("seed", (1, 2)))


def test_grid_labels_say_what_varies_and_name_the_lora_once():
    """Columns of a strength grid are labelled 0.5, 1 (not `run_lora:0.5`, which ran into each other at 64 px);
    the LoRA's name is said once, in the title; a label too wide for its column is cut short."""
    from lora_studio.sample import draw_grid, fit_text, grid_title
    from lora_studio.workflows import checkpoint_label

    x = Axis("strength", (0.0, 0.5, 1.0), lora="demo-20261202-063552_demo")
    assert x.labels() == ["0", "0.5", "1"] and Axis("seed", (1, 2)).labels() == ["seed 1", "seed 2"]
    assert grid_title(x, Axis("seed", (1,))) == "columns: strength of demo-20261202-063552_demo"
    checkpoints = Axis("checkpoint", ("a", "b"), names=("step 200", "final"))
    assert checkpoints.labels() == ["step 200", "final"]
    assert checkpoint_label(Path("r/checkpoints/demo-step000200.safetensors")) == "step 200"
    assert checkpoint_label(Path("r/demo.safetensors")) == "final"
    from PIL import Image, ImageDraw, ImageFont

    font, draw = ImageFont.load_default(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cut = fit_text(draw, "a label much wider than a 64 pixel column", font, 60)
    assert cut.endswith("…") and draw.textlength(cut, font=font) <= 60
    grid = draw_grid([[Image.new("RGB", (64, 64))] * 3], x.labels(), ["seed 1"], grid_title(x, Axis("seed", (1,))))
    assert grid.width >= draw.textlength(grid_title(x, Axis("seed", (1,))), font=font)


def test_training_samples_and_previews_honour_clip_skip(tiny_folders, two_loras):
    """At clip skip 2, a training sample (render) and a preview (Previewer.generate) are conditioned exactly
    as a training step is (step.encode_text), and differ from clip skip 1; so the "Clip skip: 2" their
    infotext claims is the truth."""
    from lora_studio.sample import render, use_sampler
    from lora_studio.step import encode_text

    base = load_base(tiny_folders["sd1"], device="cpu")
    pipeline = base.pipeline
    pipeline.set_progress_bar_config(disable=True)
    use_sampler(pipeline, "ddim")  # as settings() asks of the preview below
    skip1, skip2 = (render(pipeline, ["zkz, a thing"], [1.0], [3], 3, 5.0, (32, 32), clip_skip=c)[0] for c in (1, 2))
    with torch.no_grad():
        as_trained = {k: encode_text(base, [text], 2)["hidden"] for k, text in (("p", "zkz, a thing"), ("n", ""))}
        direct = pipeline(prompt_embeds=as_trained["p"], negative_prompt_embeds=as_trained["n"], guidance_scale=5.0,
                          num_inference_steps=3, width=32, height=32,
                          generator=[torch.Generator("cpu").manual_seed(3)]).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(skip2.image), np.asarray(direct))
    assert not np.array_equal(np.asarray(skip1.image), np.asarray(skip2.image))
    preview = Previewer(base).generate(settings(clip_skip=2))[0]
    assert "Clip skip: 2" in preview.parameters and np.array_equal(np.asarray(preview.image), np.asarray(direct))


# --- infotext -----------------------------------------------------------------------------------------------


# The shape A1111 writes (modules/processing.py create_infotext), as documented on its wiki.
A1111_EXAMPLE = (
    "a photo of a cat, masterpiece <lora:mycat:0.8>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "mycat: 0123456789ab", Version: v1.10.1'
)


def test_parses_a1111_infotext():
    parsed = parse_parameters(A1111_EXAMPLE)
    assert parsed["Prompt"] == "a photo of a cat, masterpiece <lora:mycat:0.8>"
    assert parsed["Negative prompt"] == "blurry, lowres"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768"
    assert parsed["Lora hashes"] == "mycat: 0123456789ab" and parsed["Version"] == "v1.10.1"


def test_our_infotext_round_trips_in_a1111_shape(tmp_path):
    ours = PreviewSettings(
        prompt="zkz, a red star, on white",
        negative_prompt="blurry, dark",
        strengths={"zkz-style": 0.75, "other": -0.5},
        sampler="dpmpp_2m_karras",
        steps=25,
        cfg=6.5,
        seed=99,
        width=512,
        height=768,
        clip_skip=2,
    )
    text = infotext(ours, 99, {"zkz-style": "a" * 64, "other": "b" * 64}, model="demo")
    lines = text.split("\n")
    assert lines[0] == "zkz, a red star, on white <lora:zkz-style:0.75> <lora:other:-0.5>"
    assert lines[1] == "Negative prompt: blurry, dark"
    assert lines[2].startswith("Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 99, ")
    assert 'Lora hashes: "zkz-style: aaaaaaaaaaaa, other: bbbbbbbbbbbb"' in lines[2]

    from PIL import Image

    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", text)
    back = read_parameters(path)
    assert back["loras"] == {"zkz-style": 0.75, "other": -0.5}
    assert back["Prompt"] == lines[0] and back["Negative prompt"] == "blurry, dark"
    assert (back["Steps"], back["CFG scale"], back["Seed"], back["Clip skip"]) == ("25", "6.5", "99", "2")
    assert (back["Size-1"], back["Size-2"], back["Model"]) == ("512", "768", "demo")
    assert set(back) == (set(parse_parameters(A1111_EXAMPLE)) - {"Model hash"}) | {"loras", "Clip skip"}


# --- samples during training -------------------------------------------------------------------------------


def test_sampling_leaves_training_bit_identical(tmp_path, tiny_folders, images):
    def run(sample, folder):
        config = tiny_config(
            folder,
            tiny_folders,
            images,
            lora={"rank": 4, "alpha": 4.0, "dropout": 0.2},  # dropout draws from the global RNG each step
            sample=sample,
        )
        return train_module.run_training(config)

    sampled = {"every_n_steps": 3, "at_start": True, "strengths": [0.0, 0.5, 1.0], "seeds": [42],
               "num_inference_steps": 2, "sampler": "euler_a", "width": 32, "height": 32}  # fmt: skip
    with_samples = run(sampled, tmp_path / "a")
    without = run({"every_n_steps": 0}, tmp_path / "b")
    a, b = load_file(str(with_samples.lora_path)), load_file(str(without.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folders = sorted(p.name for p in (with_samples.run_dir / "samples").iterdir())
    assert folders == ["step-000000", "step-000003", "step-000006"]
    files = sorted(p.name for p in (with_samples.run_dir / "samples" / "step-000003").iterdir())
    assert files == ["s0.00-seed42.png", "s0.50-seed42.png", "s1.00-seed42.png"]
    params = read_parameters(with_samples.run_dir / "samples" / "step-000003" / "s0.50-seed42.png")
    assert params["loras"] == {"tiny": 0.5} and params["Seed"] == "42" and params["Sampler"] == "Euler a"


# --- command line ---------------------------------------------------------------------------------------------


def test_sample_command_single_and_grid(tmp_path, tiny_folders, two_loras, capsys):
    common = ["--base", str(tiny_folders["sd1"]), "--prompt", "zkz, a thing", "--steps", "2", "--sampler", "ddim"]
    out = tmp_path / "one.png"
    lora_args = ["--lora", f"{two_loras[0]}:0.8", "--lora", f"{two_loras[1]}:-0.5"]
    size = ["--width", "30", "--height", "32"]
    assert main(["sample", *common, *lora_args, "--seed", "1", *size, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not a multiple of 8" in printed and f"wrote {out}" in printed
    assert read_parameters(out)["loras"] == {"lora0": 0.8, "lora1": -0.5}

    grid = tmp_path / "grid.png"
    args = ["sample", *common, "--lora", str(two_loras[0]), "--width", "32", "--height", "32"]
    args += ["--grid", "strength=0,0.5,1", "seed=1,2"]
    assert main([*args, "--out", str(grid)]) == 0
    from PIL import Image

    assert Image.open(grid).size[0] > 3 * 32
    assert main(["sample", *common, "--lora", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_sample_command_takes_what_the_loras_run_used(tmp_path, tiny_folders, two_loras, capsys):
    """Without --base, --width, --clip-skip and the sampling options, `lora-studio sample` renders a run's LoRA as
    the run's own samples were: its base, its clip skip, its sampler, steps, CFG and negative prompt, at the size
    its file says (the Preview tab does the same when the LoRA is picked). What is given wins."""
    import json

    from PIL import Image
    from safetensors.torch import load_file, save_file

    from lora_studio.config import load_preset, save_config
    from lora_studio.safetensors_io import read_header

    run = tmp_path / "runs" / "mine-20260101-000000"
    used = [f"base_model={json.dumps(str(tiny_folders['sd1']))}", "clip_skip=2", "sample.sampler='ddim'",
            "sample.num_inference_steps=3", "sample.guidance_scale=4.5",
            "sample.negative_prompt='blurry'"]  # fmt: skip
    save_config(load_preset("demo-cpu", used), run / "config.toml")
    metadata = {**read_header(two_loras[0]).metadata, "modelspec.resolution": "40x32"}
    save_file(load_file(str(two_loras[0])), str(run / "mine.safetensors"), metadata=metadata)
    out = tmp_path / "out.png"
    common = ["sample", "--lora", str(run / "mine.safetensors"), "--prompt", "zkz"]
    assert main([*common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"note: base model {tiny_folders['sd1']} (the one mine.safetensors was trained on" in printed
    assert Image.open(out).size == (40, 32)
    shown = read_parameters(out)
    assert (shown["Clip skip"], shown["Sampler"], shown["Steps"], shown["CFG scale"]) == ("2", "DDIM", "3", "4.5")
    assert shown["Negative prompt"] == "blurry"
    given = ["--width", "24", "--steps", "2", "--clip-skip", "1", "--negative", ""]
    assert main([*common, *given, "--out", str(out)]) == 0
    shown = read_parameters(out)
    assert Image.open(out).size == (24, 32) and shown["Steps"] == "2" and "Clip skip" not in shown
    assert shown["Negative prompt"] == ""


def test_sample_command_refuses_bad_settings_before_loading_the_base(tmp_path, capsys):
    """A wrong step count or a missing LoRA is said at once, not after the base loads (half a minute for SDXL):
    here the base does not even exist, and the message is about the setting."""
    common = ["sample", "--base", str(tmp_path / "no-such-base"), "--out", str(tmp_path / "x.png")]
    assert main([*common, "--steps", "0"]) == 1
    assert "steps = 0; use 1 to" in capsys.readouterr().err
    assert main([*common, "--lora", f"{tmp_path / 'missing.safetensors'}:0.5"]) == 1
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    assert main([*common, "--width", "4096", "--height", "64"]) == 1
    assert "size 4096x64 is outside" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_previewing_the_adapters_of_a_run_in_progress(tmp_path, tiny_folders, images):
    """A snapshot of the live adapters previews exactly like the training model itself."""
    from lora_studio.lora_file import lora_from_models
    from lora_studio.sample import render, use_sampler

    session = trained_session(tmp_path, tiny_folders, images, "sd1")
    parts = session_module.trained_models(session)
    previewer = Previewer(load_base(tiny_folders["sd1"], device="cpu"))
    name = previewer.add_lora(lora_from_models(parts, "sd1"), name="live")
    ours = previewer.generate(settings(strengths={name: 0.8}))[0]
    use_sampler(session.base.pipeline, "ddim")
    session.base.pipeline.set_progress_bar_config(disable=True)
    live = render(session.base.pipeline, ["zkz, a thing"], [0.8], [3], steps=3, guidance=5.0, size=(32, 32))[0]
    assert np.abs(pixels(ours) - np.asarray(live.image, dtype=np.float32) / 255.0).max() <= 2 / 255


@pytest.mark.slow  # 14 s on the demo preset; test_sampling_leaves_training_bit_identical checks it on tiny models
def test_demo_run_with_samples_trains_the_same_lora(tmp_path):
    """The demo preset, shortened: sampling every 10 steps leaves the final LoRA bit-identical."""
    from lora_studio.config import load_preset

    def run(folder, every):
        sets = [f"output_dir='{folder}'", f"dataset.cache_dir='{tmp_path / 'cache'}'", "optimizer.max_train_steps=20",
                f"sample.every_n_steps={every}", "sample.num_inference_steps=4", "save.every_n_steps=0"]  # fmt: skip
        return train_module.run_training(load_preset("demo-cpu", sets))

    sampled, plain = run(tmp_path / "a", 10), run(tmp_path / "b", 0)
    a, b = load_file(str(sampled.lora_path)), load_file(str(plain.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in ("step-000010", "step-000020"):
        names = sorted(p.name for p in (sampled.run_dir / "samples" / step).iterdir())
        assert names == [f"s{s:.2f}-seed{seed}.png" for s in (0.0, 0.5, 1.0) for seed in (1, 2)]
    assert not (plain.run_dir / "samples").exists()


def test_strength_contract_on_the_demo_model(tmp_path):
    """Two short demo LoRAs (different seeds) on the bundled demo model, previewed at 64 px."""
    from lora_studio.config import load_preset
    from lora_studio.lora_file import lora_from_models

    loras = []
    for seed in (1, 2):
        sets = [f"output_dir='{tmp_path}'", f"dataset.cache_dir='{tmp_path / 'cache'}'", f"seed={seed}"]
        session = train_module.prepare(load_preset("demo-cpu", sets))
        for _ in range(8):
            step_module.training_step(session, list(range(8)))
            session.step += 1
        parts = session_module.trained_models(session)
        loras.append(lora_from_models(parts, "sd1"))
    base_image = Previewer(load_base("demo", dtype=torch.float32, device="cpu"))
    previewer = Previewer(load_base("demo", dtype=torch.float32, device="cpu"))
    a, b = previewer.add_lora(loras[0], "a"), previewer.add_lora(loras[1], "b")
    demo = dict(prompt="zkz, a red star on a white background", width=64, height=64, steps=8, sampler="euler")

    def image(**strengths):
        return pixels(previewer.generate(settings(**demo, strengths=strengths))[0])

    zero, half, one = image(a=0.0), image(a=0.5), image(a=1.0)
    assert np.allclose(zero, pixels(base_image.generate(settings(**demo))[0]), atol=1e-3)
    assert np.abs(half - zero).max() > 0.02 and np.abs(half - one).max() > 0.02
    assert np.abs(image(a=1.0, b=1.0) - one).max() > 0.02
    assert np.abs(image(a=-1.0) - zero).max() > 0.02 and np.abs(image(a=-1.0) - one).max() > 0.02
    assert (a, b) == ("a", "b")


def test_config_offers_exactly_the_samplers_the_previewer_has():
    """config.py cannot import diffusers, so the sampler names are written twice; this keeps them equal."""
    from typing import get_args

    from lora_studio.config import SampleConfig

    assert set(get_args(SampleConfig.model_fields["sampler"].annotation)) == set(SAMPLERS)
