"""Text conditioning as the SD models were trained with it, shared by training steps and previews.

clip_skip follows kohya/A1111: 1 is the last layer, 2 the penultimate, re-normalised by the final layer
norm as the original models do. SDXL always conditions on the penultimate layers (and a pooled
embedding from its second encoder). Computed here rather than by diffusers' pipelines, whose clip skip
reaches for `text_encoder.text_model`, which transformers 5's flat CLIPTextModel no longer has.
"""

from __future__ import annotations

import torch


def unread_layers(num_layers: int, clip_skip: int, sdxl: bool, pooled: bool) -> range:
    """The encoder layers whose output `encode_captions` never reads, so an adapter there gets no gradient and
    changes no image (consumers condition the same way): SD1/2 with clip skip k read layer L-k, SDXL reads layer
    L-1-k of each encoder, but its second one also gives the pooled embedding from the last layer (all read)."""
    skip = 0 if sdxl and pooled else clip_skip if sdxl else clip_skip - 1
    return range(num_layers - skip, num_layers)


def encode_captions(
    tokenizers: list, encoders: list[torch.nn.Module], captions: list[str], clip_skip: int, sdxl: bool,
    device: torch.device,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """{"hidden": [batch, tokens, width]} (and "pooled" for SDXL) for a batch of captions."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        if sdxl:
            hidden.append(out.hidden_states[-(clip_skip + 1)])
            pooled = out[0]  # text_embeds of the second encoder (the last one in the loop)
        elif clip_skip == 1:
            hidden.append(out.last_hidden_state)
        else:
            inner = getattr(encoder, "module", encoder)  # past a DistributedDataParallel wrapper
            final_norm = getattr(inner, "text_model", inner).final_layer_norm
            hidden.append(final_norm(out.hidden_states[-clip_skip]))
    result = {"hidden": torch.cat(hidden, dim=-1)}
    if pooled is not None:
        result["pooled"] = pooled
    return result
