"""A1111's emphasis syntax in preview and sample prompts: parsed as A1111 parses it, applied to the token
embeddings as its "Original" emphasis, and a prompt without it encoded exactly as before."""

import numpy as np
import pytest
import torch
from tiny_models import tokenizer_for

from lora_studio.conditioning import emphasised, encode_captions, weighted_ids, window_ids
from lora_studio.prompt_weights import has_emphasis, parse_emphasis


@pytest.mark.parametrize(("prompt", "fragments"), [
    ("a red cat", [("a red cat", 1.0)]),
    ("a (red) cat", [("a ", 1.0), ("red", 1.1), (" cat", 1.0)]),
    ("a [red] cat", [("a ", 1.0), ("red", 1 / 1.1), (" cat", 1.0)]),
    ("(red:1.5) cat", [("red", 1.5), (" cat", 1.0)]),
    ("((red)) cat", [("red", 1.1 * 1.1), (" cat", 1.0)]),
    ("(a ( b:2) c)", [("a ", 1.1), (" b", 2.2), (" c", 1.1)]),
    (r"a \(red\) cat", [("a (red) cat", 1.0)]),  # escaped: literal brackets
    ("(red cat", [("red cat", 1.1)]),  # unclosed: to the end
    ("red) cat]", [("red) cat]", 1.0)]),  # nothing to close: text
    ("time: 5 (x:0.5)", [("time: 5 ", 1.0), ("x", 0.5)]),
    ("", [("", 1.0)]),
])  # fmt: skip
def test_emphasis_parses_as_a1111_reads_it(prompt, fragments):
    parsed = parse_emphasis(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in fragments]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in fragments])
    assert has_emphasis(prompt) == any(c in prompt for c in "()[]\\")


def test_weighted_ids_give_each_token_its_fragments_weight():
    tokenizer = tokenizer_for("sd1")
    plain = window_ids(tokenizer, ["a red cat on a table"])[:, 0]
    ids, weights = weighted_ids(tokenizer, ["a red cat on a table"], 75)
    assert torch.equal(ids, plain) and bool((weights == 1.0).all())  # no brackets: the plain tokenization
    ids, weights = weighted_ids(tokenizer, ["a (red:1.5) cat"], 75)
    red = tokenizer("red", add_special_tokens=False).input_ids
    assert ids[0, :5].tolist() == [tokenizer.bos_token_id, *tokenizer("a", add_special_tokens=False).input_ids,
                                   *red, *tokenizer("cat", add_special_tokens=False).input_ids,
                                   tokenizer.eos_token_id]  # fmt: skip
    assert weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1.0, 1.0])
    assert ids.shape == weights.shape == (1, 77)


def test_emphasis_scales_tokens_and_keeps_the_mean():
    hidden = torch.randn((2, 77, 8), generator=torch.Generator().manual_seed(0)) + 0.5
    weights = torch.ones((2, 77))
    weights[0, 3] = 1.5
    out = emphasised(hidden, weights)
    assert torch.equal(out[1], hidden[1])  # a prompt without weights is left as it was
    assert out[0].mean().item() == pytest.approx(hidden[0].mean().item(), rel=1e-5)  # A1111's rescaling
    ratio = out[0] / hidden[0]
    factor = ratio[0, 0].item()  # the rescale every token got
    assert torch.allclose(ratio[3], torch.full((8,), 1.5 * factor)) and torch.allclose(ratio[4], torch.full((8,),
                                                                                                           factor))
    centred = hidden - hidden.mean(dim=(1, 2), keepdim=True)  # a mean of zero (an untrained layer norm's): kept
    safe = emphasised(centred, weights)
    assert torch.isfinite(safe).all() and torch.allclose(safe[0, 3], 1.5 * centred[0, 3])


def test_encoding_with_emphasis_changes_only_weighted_prompts():
    from tiny_models import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    encode = [pipe.tokenizer], [pipe.text_encoder]
    with torch.no_grad():
        plain = encode_captions(*encode, ["a red cat", "a (red:1.5) cat"], 1, False, torch.device("cpu"))
        weighted = encode_captions(*encode, ["a red cat", "a (red:1.5) cat"], 1, False, torch.device("cpu"),
                                   emphasis=True)  # fmt: skip
    assert torch.equal(weighted["hidden"][0], plain["hidden"][0])
    assert not torch.allclose(weighted["hidden"][1], weighted["hidden"][0])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_previews_weight_the_prompt_as_a1111_does_and_escaped_brackets_are_text(tiny_folders, family):
    from lora_studio.models import load_base
    from lora_studio.sample import Previewer, PreviewSettings

    base = load_base(tiny_folders[family], device="cpu")
    previewer = Previewer(base)
    common = dict(sampler="ddim", steps=3, cfg=5.0, seed=3, width=32, height=32)

    def image(prompt):
        return np.asarray(previewer.generate(PreviewSettings(prompt=prompt, **common))[0].image)

    plain, weighted = image("a red thing"), image("a (red:1.8) thing")
    assert not np.array_equal(plain, weighted)
    # escaped brackets are the text "a (red) thing", encoded here exactly as the pipeline encodes it itself
    pipeline = base.pipeline
    pipeline.set_progress_bar_config(disable=True)
    direct = pipeline(prompt="a (red) thing", num_inference_steps=3, guidance_scale=5.0, width=32, height=32,
                      generator=[torch.Generator("cpu").manual_seed(3)]).images[0]  # fmt: skip
    assert np.array_equal(image(r"a \(red\) thing"), np.asarray(direct))


def test_weighted_captions_train_with_the_emphasis_and_cache_it_apart(tmp_path, tiny_folders):
    """kohya's weighted_captions: training captions read as prompts are; off, the brackets are text."""
    from safetensors import safe_open
    from test_train import tiny_config
    from test_validation import make_images

    from lora_studio.config import validate_config
    from lora_studio.data import validation_caption
    from lora_studio.train import prepare, run_training

    images = make_images(tmp_path / "images", 2)
    for caption in images.glob("*.txt"):
        caption.write_text("a (red:1.8) thing, [blurry]")
    frozen = {"dataset": {"cache_text_embeddings": True, "cache_dir": str(tmp_path / "cache")},
              "lora": {"train_text_encoder": False}}  # fmt: skip
    text = tiny_config(tmp_path / "a", tiny_folders, images, **frozen)
    weighted = tiny_config(tmp_path / "b", tiny_folders, images, weighted_captions=True, **frozen)
    plain_session, weighted_session = prepare(text), prepare(weighted)
    caption = validation_caption(plain_session.items[0], text.dataset)
    assert weighted_session.text_cache.identity == plain_session.text_cache.identity + "|emphasis"
    as_text = plain_session.text_cache.get(caption)["hidden"]
    as_weights = weighted_session.text_cache.get(caption)["hidden"]
    assert as_text.shape == as_weights.shape and not torch.allclose(as_text, as_weights)
    done = run_training(weighted)
    assert safe_open(str(done.lora_path), "pt").metadata()["ss_weighted_captions"] == "True"
    assert validate_config({"train_data_dir": "x", "weighted_captions": True}).weighted_captions


def test_break_ends_the_window_so_what_follows_starts_the_next():
    from lora_studio.conditioning import prompt_tokens

    for family, name in (("sd1", "tokenizer"), ("sdxl", "tokenizer_2")):
        tokenizer = tokenizer_for(family, name)
        a_cat, a_dog = (tokenizer(t, add_special_tokens=False).input_ids for t in ("a cat", "a dog"))
        ids, weights = prompt_tokens(tokenizer, "a cat BREAK a dog")
        assert ids[:2] == a_cat and ids[2] == tokenizer.eos_token_id  # the window's text ends with the end token
        assert set(ids[3:75]) == {tokenizer.pad_token_id} and ids[75:] == a_dog  # the next window holds the rest
        assert weights == [1.0] * len(ids)
        assert prompt_tokens(tokenizer, "a BREAKFAST")[0] == tokenizer("a BREAKFAST", add_special_tokens=False
                                                                       ).input_ids  # a word, not BREAK  # fmt: skip
    assert has_emphasis("a cat BREAK a dog") and not has_emphasis("a BREAKFAST, a break")


def test_a_preview_with_break_renders_two_windows(tiny_folders):
    from lora_studio.models import load_base
    from lora_studio.sample import Previewer, PreviewSettings

    previewer = Previewer(load_base(tiny_folders["sdxl"], device="cpu"))
    common = dict(sampler="ddim", steps=3, cfg=5.0, seed=3, width=32, height=32)
    broken, joined = (np.asarray(previewer.generate(PreviewSettings(prompt=p, **common))[0].image)
                      for p in ("a red thing BREAK blue sky", "a red thing blue sky"))  # fmt: skip
    assert not np.array_equal(broken, joined)
