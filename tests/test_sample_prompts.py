"""Sample prompts with kohya's per-prompt flags: parsed, checked in the config, and honoured by training samples."""

import pytest
from PIL import Image
from test_train import tiny_config
from test_validation import make_images

from lora_studio.config import validate_config
from lora_studio.errors import ConfigError
from lora_studio.outputs import render_samples
from lora_studio.sample_prompts import SamplePrompt, parse_sample_prompt
from lora_studio.train import prepare


def test_kohya_flags_are_parsed():
    line = "zkz, a red star, outlines --n blurry, lowres --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss ddim"
    assert parse_sample_prompt(line) == SamplePrompt("zkz, a red star, outlines", "blurry, lowres", 512, 768, 42, 7.5,
                                                     28, "ddim")  # fmt: skip
    assert parse_sample_prompt("plain prompt") == SamplePrompt("plain prompt")
    assert parse_sample_prompt("a--b c --d 3").prompt == "a--b c"  # a flag is a word of its own
    for bad, said in (("x --q 3", "--q is not a sample prompt flag"), ("x --w wide", "--w needs a number"),
                      ("x --w 8", "--w 8 is too small"), ("x --s 999", "--s 999 is too large"),
                      ("x --d 4294967296", "--d 4294967296 is too large")):  # fmt: skip
        with pytest.raises(ValueError, match=said):
            parse_sample_prompt(bad)


def test_the_config_names_the_bad_prompt_line():
    with pytest.raises(ConfigError, match=r"`sample.prompts`.*prompt 2: --ss 'lms' is not a sampler"):
        validate_config({"version": 1, "sample": {"prompts": ["fine --s 4", "bad --ss lms"]}})
    with pytest.raises(ConfigError, match="prompt 1 has settings but no prompt text"):
        validate_config({"version": 1, "sample": {"prompts": ["--w 64"]}})


def test_training_samples_honour_each_prompts_settings(tmp_path, tiny_folders):
    images = make_images(tmp_path / "d", 2)
    config = tiny_config(tmp_path, tiny_folders, images, sample={
        "prompts": ["zkz, a thing --d 5 --w 32 --h 48 --s 2 --n ugly --ss ddim", "zkz, another"],
        "seeds": [1, 2], "strengths": [1.0], "num_inference_steps": 3, "width": 32, "height": 32})  # fmt: skip
    session = prepare(config)
    event = render_samples(session)
    names = sorted(p.name for p in event.images)
    assert names == ["p0-s1.00-seed5.png", "p1-s1.00-seed1.png", "p1-s1.00-seed2.png"]
    first = Image.open(event.images[[p.name for p in event.images].index("p0-s1.00-seed5.png")])
    assert first.size == (32, 48)
    text = first.info["parameters"]
    assert "Negative prompt: ugly" in text and "Steps: 2" in text and "Sampler: DDIM" in text and "Seed: 5" in text
    other = Image.open(event.images[[p.name for p in event.images].index("p1-s1.00-seed2.png")])
    assert other.size == (32, 32) and "Steps: 3" in other.info["parameters"]
