"""Text conditioning as the SD models were trained with it, shared by training steps and previews.

clip_skip follows kohya/A1111: 1 is the last layer, 2 the penultimate, re-normalised by the final layer
norm as the original models do. SDXL always conditions on the penultimate layers (and a pooled
embedding from its second encoder). Computed here rather than by diffusers' pipelines, whose clip skip
reaches for `text_encoder.text_model`, which transformers 5's flat CLIPTextModel no longer has.
"""

from __future__ import annotations

import torch

from .tokens import WINDOW, token_count


def unread_layers(num_layers: int, clip_skip: int, sdxl: bool, pooled: bool) -> range:
    """The encoder layers whose output `encode_captions` never reads, so an adapter there gets no gradient and
    changes no image (consumers condition the same way): SD1/2 with clip skip k read layer L-k, SDXL reads layer
    L-1-k of each encoder, but its second one also gives the pooled embedding from the last layer (all read)."""
    skip = 0 if sdxl and pooled else clip_skip if sdxl else clip_skip - 1
    return range(num_layers - skip, num_layers)





def window_ids(tokenizer, captions: list[str], max_tokens: int = WINDOW) -> torch.Tensor:
    """Token ids [batch, windows, 77]: up to `max_tokens` caption tokens (75, or kohya's 150 / 225) cut into windows
    of 75, each with the start token before it and an end token after it, as kohya's sd-scripts feed long
    captions. With a tokenizer whose padding is not its end token (SD 2.x's and SDXL's second), a window the
    text runs past ends in the end token, and a window the text never reaches starts with it."""
    ids = tokenizer(captions, padding="max_length", max_length=max_tokens + 2, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    start, last = ids[:, :1], ids[:, -1:]
    windows = []
    for first in range(1, max_tokens + 1, WINDOW):
        window = torch.cat([start, ids[:, first : first + WINDOW], last], dim=1)
        end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        if pad != end:
            window[(window[:, -2] != end) & (window[:, -2] != pad), -1] = end
            window[window[:, 1] == pad, 1] = end
        windows.append(window)
    return torch.stack(windows, dim=1)


def joined_windows(hidden: torch.Tensor, windows: int) -> torch.Tensor:
    """[batch x windows, 77, width] -> [batch, 2 + 75 x windows, width]: the first start token, every window's 75
    caption tokens, the last window's end token (kohya's layout; one window comes back as it is)."""
    if windows == 1:
        return hidden
    per_caption = hidden.reshape(-1, windows * hidden.shape[1], hidden.shape[-1])
    step = WINDOW + 2
    parts = [per_caption[:, :1]] + [per_caption[:, k * step + 1 : k * step + 1 + WINDOW] for k in range(windows)]
    return torch.cat([*parts, per_caption[:, -1:]], dim=1)


def encode_captions(
    tokenizers: list, encoders: list[torch.nn.Module], captions: list[str], clip_skip: int, sdxl: bool,
    device: torch.device, max_tokens: int = WINDOW,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """{"hidden": [batch, tokens, width]} (and "pooled" for SDXL) for a batch of captions. Captions longer than
    one window are read in windows of 75 tokens up to `max_tokens`; SDXL's pooled embedding is the first
    window's (kohya's)."""
    hidden, pooled = [], None
    windows = max_tokens // WINDOW
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = window_ids(tokenizer, captions, max_tokens).reshape(-1, WINDOW + 2).to(device)
        out = encoder(ids, output_hidden_states=True)
        if sdxl:
            states = out.hidden_states[-(clip_skip + 1)]
            pooled = out[0][::windows]  # text_embeds of the second encoder (the last one in the loop)
        elif clip_skip == 1:
            states = out.last_hidden_state
        else:
            inner = getattr(encoder, "module", encoder)  # past a DistributedDataParallel wrapper
            final_norm = getattr(inner, "text_model", inner).final_layer_norm
            states = final_norm(out.hidden_states[-clip_skip])
        hidden.append(joined_windows(states, windows))
    result = {"hidden": torch.cat(hidden, dim=-1)}
    if pooled is not None:
        result["pooled"] = pooled
    return result


def overlong_captions(tokenizer, captions: list[str], max_tokens: int = WINDOW) -> list[tuple[str, int]]:
    """(caption, its token count) of each caption longer than the `max_tokens` the text encoder reads: its end
    is cut off."""
    counted = [(caption, token_count(tokenizer, caption)) for caption in captions]
    return [(caption, count) for caption, count in counted if count > max_tokens]
