"""Captions longer than one CLIP window (`max_token_length`, kohya's 150 / 225): read in windows of 75 tokens in
kohya's layout, so tags past the 75th reach the model; and a warning when captions are cut."""

import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import tiny_config
from test_validation import make_images
from tiny_models import tiny_pipeline, tokenizer_for

from lora_studio.conditioning import encode_captions, overlong_captions, window_ids
from lora_studio.config import validate_config
from lora_studio.data import validation_caption
from lora_studio.train import prepare, run_training
from lora_studio.ui.config_form import FIELD_BY_KEY, KEYS, config_from_form, form_values

TAGS = ", ".join(f"tag{i}" for i in range(30))  # 109 tokens: past one window, within two


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids[1:-1]


@pytest.mark.parametrize(("family", "name"), [("sd1", "tokenizer"), ("sd2", "tokenizer"), ("sdxl", "tokenizer_2")])
def test_a_long_caption_is_cut_into_windows_of_75_each_with_its_start_and_end(family, name):
    tokenizer = tokenizer_for(family, name)
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    text = ids_of(tokenizer, TAGS)
    assert 75 < len(text) <= 150
    long, short = window_ids(tokenizer, [TAGS, "a cat"], 150)
    assert long.shape == short.shape == (2, 77)
    assert long[0].tolist() == [start, *text[:75], end]  # the text runs past the first window: it ends in end
    rest = text[75:]
    assert long[1, : len(rest) + 2].tolist() == [start, *rest, end]
    assert set(long[1, len(rest) + 2 :].tolist()) == {pad}
    # a caption that fits one window reads there exactly as before; the window it never reaches starts with end
    one = tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(short[0], one[0])
    assert short[1, :2].tolist() == [start, end] and set(short[1, 2:].tolist()) == {pad}
    # 75 is the plain tokenization, cut at one window as before
    cut = tokenizer([TAGS], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(window_ids(tokenizer, [TAGS])[0, 0], cut[0])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tags_past_the_first_window_change_the_conditioning_only_with_longer_reading(family):
    pipe = tiny_pipeline(family)
    sdxl = family == "sdxl"
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    captions = [TAGS + ", red hair", TAGS + ", blue eyes", "a cat"]

    def encode(max_tokens, clip_skip=1):
        with torch.no_grad():
            return encode_captions(tokenizers, encoders, captions, clip_skip, sdxl, torch.device("cpu"), max_tokens)

    plain, longer, longest = encode(75), encode(150), encode(225)
    width = plain["hidden"].shape[-1]
    assert plain["hidden"].shape == (3, 77, width)
    assert longer["hidden"].shape == (3, 152, width) and longest["hidden"].shape == (3, 227, width)
    assert torch.equal(plain["hidden"][0], plain["hidden"][1])  # the differing tags were cut off
    assert not torch.allclose(longer["hidden"][0], longer["hidden"][1])  # now they are read
    # the first window is the 75-token reading of the same text, and a short caption's is unchanged
    assert torch.allclose(longer["hidden"][2, :76], plain["hidden"][2, :76], atol=1e-6)
    assert torch.allclose(longest["hidden"][2, :76], plain["hidden"][2, :76], atol=1e-6)
    if sdxl:  # the pooled embedding is the first window's (kohya's)
        assert longer["pooled"].shape == plain["pooled"].shape
        assert torch.allclose(longer["pooled"], plain["pooled"], atol=1e-6)
    else:  # clip skip reads the same layer in every window
        skipped = encode(150, clip_skip=2)["hidden"]
        assert skipped.shape == (3, 152, width) and not torch.allclose(skipped, longer["hidden"])


def test_overlong_captions_are_counted_in_tokens():
    tokenizer = tokenizer_for("sd1")
    assert overlong_captions(tokenizer, ["a cat", TAGS], 75) == [(TAGS, len(ids_of(tokenizer, TAGS)))]
    assert overlong_captions(tokenizer, ["a cat", TAGS], 150) == []
    # weighted captions count as they are read: brackets are no tokens, a BREAK fills its window
    assert overlong_captions(tokenizer, ["((((((((((a cat))))))))))"], 10, emphasis=True) == []
    assert overlong_captions(tokenizer, ["a cat BREAK a dog"], 75, emphasis=True) == [("a cat BREAK a dog", 77)]


def long_captioned(folder, count=4):
    make_images(folder, count)
    for i, caption in enumerate(sorted(folder.glob("*.txt"))):
        caption.write_text(f"a thing number {i}, {TAGS}")
    return folder


def test_a_run_reads_long_captions_and_caches_them_apart(tmp_path, tiny_folders, caplog):
    images = long_captioned(tmp_path / "images")
    caplog.set_level(logging.WARNING, logger="lora_studio.train")
    cut = prepare(tiny_config(tmp_path / "a", tiny_folders, images, dataset={"cache_text_embeddings": True},
                              lora={"train_text_encoder": False}))  # fmt: skip
    warning = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    assert len(warning) == 1 and warning[0].startswith("4 of 4 captions are longer than the 75 tokens")
    assert "set max_token_length = 150" in warning[0]
    caplog.clear()
    settings = {"dataset": {"cache_text_embeddings": True, "cache_dir": str(tmp_path / "a" / "c")},
                "lora": {"train_text_encoder": False}, "max_token_length": 150}  # the same cache folder as `cut`
    config = tiny_config(tmp_path / "b", tiny_folders, images, **settings)
    read = prepare(config)
    assert not [r for r in caplog.records if "cut off" in r.getMessage()]
    assert read.text_cache.identity != cut.text_cache.identity  # a cache of another reading is never mixed in
    assert read.text_cache.get(validation_caption(read.items[0], config.dataset))["hidden"].shape[0] == 152
    result = run_training(config)
    assert safe_open(str(result.lora_path), "pt").metadata()["ss_max_token_length"] == "150"
    # the text encoder trained too: the long reading goes through the trained encoder every step
    trained = run_training(tiny_config(tmp_path / "c", tiny_folders, images, max_token_length=225,
                                       optimizer={"max_train_steps": 2}))  # fmt: skip
    assert any(key.startswith("lora_te") for key in load_file(str(trained.lora_path)))


def test_kohyas_max_token_length_and_the_form_take_the_count():
    assert validate_config({"train_data_dir": "x", "max_token_length": 225}).max_token_length == 225
    gui = validate_config({"train_data_dir": "x", "max_token_length": "150", "LoRA_type": "Standard"})
    assert gui.max_token_length == 150  # kohya_ss saves its dropdown's text
    with pytest.raises(Exception, match="input should be 75, 150 or 225"):
        validate_config({"train_data_dir": "x", "max_token_length": 300})
    field = FIELD_BY_KEY["max_token_length"]
    assert field.kind == "choice" and field.choices == ("75", "150", "225")
    values = form_values(validate_config({"version": 1, "max_token_length": 150}))
    assert values[KEYS.index("max_token_length")] == "150"
    assert config_from_form(values).max_token_length == 150


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_samples_and_previews_read_a_long_prompt_to_its_end(tiny_folders, family):
    from lora_studio.models import load_base
    from lora_studio.sample import Previewer, PreviewSettings

    previewer = Previewer(load_base(tiny_folders[family], device="cpu"))
    common = dict(sampler="ddim", steps=3, cfg=5.0, seed=3, width=32, height=32)

    def image(prompt, negative=""):
        preview = previewer.generate(PreviewSettings(prompt=prompt, negative_prompt=negative, **common))[0]
        return np.asarray(preview.image)

    red, blue = image(TAGS + ", red hair"), image(TAGS + ", blue eyes")
    assert not np.array_equal(red, blue)  # diffusers' own encoding cut both at 75 tokens: one image
    assert np.array_equal(image(TAGS + ", red hair"), red)  # still deterministic
    # a short prompt with a long negative prompt: both read in the same windows
    assert image("a cat", TAGS + ", red hair").shape == red.shape


def test_a_training_sample_at_strength_0_is_the_base_also_where_the_prompt_is_encoded_here(tiny_folders):
    """Where call_pipeline encodes the prompt itself (clip skip 2, a long prompt), the text encoder's adapters act
    at the sample's strength as diffusers' own encoding makes them: strength 0 is the base model exactly."""
    from lora_studio.config import LoraConfig
    from lora_studio.lora import inject_lora
    from lora_studio.models import load_base
    from lora_studio.sample import render, use_sampler

    base = load_base(tiny_folders["sd1"], device="cpu")
    pipeline = base.pipeline
    pipeline.set_progress_bar_config(disable=True)
    use_sampler(pipeline, "ddim")
    args = ([TAGS + ", red hair"], [0.0, 1.0], [3], 3, 5.0, (32, 32))
    plain = [np.asarray(r.image) for r in render(pipeline, *args, clip_skip=2)]
    inject_lora(base, LoraConfig(rank=4, unet_targets="attn"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in base.text_encoders[0].named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)  # a text-encoder adapter that changes the conditioning
    at_zero, at_one = [np.asarray(r.image) for r in render(pipeline, *args, clip_skip=2)]
    assert np.array_equal(at_zero, plain[0])
    assert not np.array_equal(at_one, plain[1])


def test_the_dataset_tab_notes_captions_longer_than_one_window(app_state):
    from lora_studio.ui import dataset_tab

    folder = long_captioned(app_state.roots.datasets / "tags", 3)
    (folder / "0.txt").write_text("a short one")
    *_, report, _tags, _ = dataset_tab.open_dataset(app_state, str(folder), None, ".txt")
    assert "- note: 2 captions are longer than 75 tokens (the longest: 114); training reads only the first" in report
    assert "`max_token_length` is 150 or 225" in report
    *_, demo_report, _tags, _ = dataset_tab.open_dataset(app_state, "demo", None, ".txt")
    assert "longer than 75 tokens" not in demo_report
