"""The bundled CLIP tokenizer files give the real CLIP token ids."""

import pytest
from transformers import CLIPTokenizer

from lora_studio.paths import sd_config_dir

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_clip_l_ids(family):
    tokenizer = CLIPTokenizer.from_pretrained(sd_config_dir(family), subfolder="tokenizer")
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408


def test_sdxl_second_tokenizer_pads_with_exclamation_mark():
    tokenizer = CLIPTokenizer.from_pretrained(sd_config_dir("sdxl"), subfolder="tokenizer_2")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == CAT_IDS
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    assert ids[7:] == [0] * 70


def test_sdxl_first_tokenizer_pads_with_end_of_text():
    tokenizer = CLIPTokenizer.from_pretrained(sd_config_dir("sdxl"), subfolder="tokenizer")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[7:] == [49407] * 70


def test_long_prompt_is_truncated_to_context():
    tokenizer = CLIPTokenizer.from_pretrained(sd_config_dir("sd1"), subfolder="tokenizer")
    ids = tokenizer("cat " * 200, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
