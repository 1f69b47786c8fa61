"""Tiny captioners of each kind, built from their configs with random weights and saved as a person would have them
on disk: a BLIP image-to-text model with its processor, and a WD14-style ONNX tagger with its tag list. Their text
means nothing, but everything from the folder to the caption file is the real path."""

from __future__ import annotations

from pathlib import Path

BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]  # the byte-level BPE tokenizers' (BART, OPT)
WORDS = ["a", "photo", "of", "the", "red", "blue", "thing", "star", "circle", "on", "with", "sky"]


def save_tiny_blip(folder: Path) -> Path:
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": vocab.index("[DEC]"),
            "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():  # random logits favour the special tokens as often as words: lean it towards words
        model.text_decoder.cls.predictions.bias[len(vocab) - len(WORDS) :] += 4.0
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


TAGS = [  # name, category (9 rating, 0 general, 4 character), channel (B, G, R of the BGR input) or None, bias
    ("general", 9, None, 5.0),
    ("red_hair", 0, 2, -5.0),
    ("blue_sky", 0, 0, -5.0),
    ("^_^", 0, None, 5.0),
    ("some_character", 4, None, 1.0),  # 0.73: under the character threshold
]


def save_tiny_tagger(folder: Path, side: int = 16) -> Path:
    """model.onnx: NHWC BGR 0-255 -> mean colour -> one weight per tag -> sigmoid; and selected_tags.csv. A red
    image scores red_hair ~1, a blue one blue_sky ~1; ^_^ is always ~0.99."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.zeros((3, len(TAGS)), dtype=np.float32)
    for index, (_name, _category, channel, _bias) in enumerate(TAGS):
        if channel is not None:
            weights[channel, index] = 0.05
    bias = np.array([b for *_rest, b in TAGS], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
         helper.make_node("Add", ["logits", "bias"], ["shifted"]),
         helper.make_node("Sigmoid", ["shifted"], ["output"])],
        "tiny-tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{category},100" for i, (name, category, *_r) in
                                             enumerate(TAGS)]  # fmt: skip
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


def save_tiny_florence2(folder: Path) -> Path:
    """Florence-2 as transformers has it: a DaViT vision tower, a BART encoder-decoder, a CLIP image processor and
    a byte-level BPE tokenizer with the `<image>` token; answers the `<MORE_DETAILED_CAPTION>` task prompt."""
    import torch
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    characters = sorted(set("".join(WORDS) + "Ġabcdefghijklmnopqrstuvwxyz?.,"))
    vocab = {t: i for i, t in enumerate(BPE_SPECIALS + characters + [f"Ġ{w}" for w in WORDS] + WORDS)}
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                do_center_crop=False)  # fmt: skip
    images.image_seq_length = 17  # 4 x 4 patches after two strided stages, plus one pooled token
    text = BartConfig(vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=128,
                      bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)  # fmt: skip
    vision = {"depths": [1, 1], "embed_dim": [16, 32], "num_heads": [1, 2], "num_groups": [1, 2], "patch_size": [7, 3],
              "patch_stride": [4, 2], "patch_padding": [3, 1], "patch_prenorm": [False, True], "window_size": 2,
              "projection_dim": 32, "max_position_embeddings": 16, "max_temporal_embeddings": 4}  # fmt: skip
    torch.manual_seed(0)
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision, image_token_id=vocab["<image>"])
    model = Florence2ForConditionalGeneration(config)
    model.generation_config.min_new_tokens = 6  # random weights would end the answer at once
    model.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_blip2(folder: Path) -> Path:
    """BLIP-2: a ViT, a Q-Former of 4 query tokens and an OPT decoder, with a GPT-2 style tokenizer that has the
    `<image>` token the processor repeats for the queries."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
        OPTConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(BPE_SPECIALS + sorted(set("".join(WORDS) + "Ġ")) + [f"Ġ{w}" for w in WORDS])}
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})  # fmt: skip
    text = OPTConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, ffn_dim=37, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, pad_token_id=1,
                     eos_token_id=2)  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    qformer = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
               "encoder_hidden_size": 32, "vocab_size": len(vocab)}  # fmt: skip
    torch.manual_seed(0)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(), num_query_tokens=4,
                         image_token_index=vocab["<image>"])  # fmt: skip
    model = Blip2ForConditionalGeneration(config)
    model.generation_config.min_new_tokens = 6  # random weights would end the answer at once
    model.save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_query_tokens=4).save_pretrained(folder)  # fmt: skip
    return folder
