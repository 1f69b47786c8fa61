"""Tiny captioners of each kind, built from their configs with random weights and saved as a person would have them
on disk: a BLIP image-to-text model with its processor, and a WD14-style ONNX tagger with its tag list. Their text
means nothing, but everything from the folder to the caption file is the real path."""

from __future__ import annotations

from pathlib import Path

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
