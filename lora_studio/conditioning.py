"""Text conditioning as the SD models were trained with it, shared by training steps and previews.

clip_skip follows kohya/A1111: 1 is the last layer, 2 the penultimate, re-normalised by the final layer
norm as the original models do. SDXL always conditions on the penultimate layers (and a pooled
embedding from its second encoder). Computed here rather than by diffusers' pipelines, whose clip skip
reaches for `text_encoder.text_model`, which transformers 5's flat CLIPTextModel no longer has.
"""

from __future__ import annotations

import torch

from .models import to_device
from .prompt_weights import BREAK, parse_emphasis
from .tokens import TOKENS_COUNTED, WINDOW, token_count


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
    return split_windows(ids, tokenizer, max_tokens)


def split_windows(ids: torch.Tensor, tokenizer, max_tokens: int) -> torch.Tensor:
    """[batch, max_tokens + 2] ids (start, text, end, padding) as [batch, windows, 77] (see window_ids)."""
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


def weighted_ids(tokenizer, prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, max_tokens + 2] ids and the weight of each token (prompt_tokens); start, end and padding weigh 1.
    Without brackets or BREAK the ids are the plain tokenization's."""
    rows, weights = [], []
    for prompt in prompts:
        ids, weight = prompt_tokens(tokenizer, prompt)
        ids, weight = ids[:max_tokens], weight[:max_tokens]
        padding = max_tokens - len(ids)
        rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        weights.append([1.0, *weight, 1.0] + [1.0] * padding)
    return torch.tensor(rows), torch.tensor(weights)


def prompt_tokens(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """A prompt's tokens (start and end left out) and their weights from A1111's emphasis syntax: each fragment is
    tokenized on its own, as A1111 does, and its tokens get its weight. A BREAK ends the window it is in: the end
    token, then padding (A1111's chunk), so what follows starts the next window."""
    ids: list[int] = []
    weights: list[float] = []
    for text, factor in parse_emphasis(prompt):
        for index, part in enumerate(BREAK.split(text)):
            if index:
                fill = -len(ids) % WINDOW
                ids += ([tokenizer.eos_token_id] + [tokenizer.pad_token_id] * fill)[:fill]
                weights += [1.0] * fill
            pieces = tokenizer(part, add_special_tokens=False, truncation=True, max_length=TOKENS_COUNTED).input_ids
            ids += pieces
            weights += [factor] * len(pieces)
    return ids, weights


def emphasised(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's embedding times its weight, the whole rescaled to its unweighted mean (A1111's "Original"
    emphasis), per prompt; a prompt without weights comes back as it was. A mean too near zero to divide by (an
    untrained encoder's layer norm) leaves the rescaling out rather than blow the embedding up."""
    weights = weights.to(hidden)
    before = hidden.mean(dim=(1, 2), keepdim=True)
    scaled = hidden * weights[..., None]
    after = scaled.mean(dim=(1, 2), keepdim=True)
    scale = 1e-4 * hidden.abs().mean(dim=(1, 2), keepdim=True)
    usable = (after.abs() > scale) & (before.abs() > scale)
    rescaled = scaled * torch.where(usable, before / torch.where(usable, after, 1.0), 1.0)
    plain = (weights == 1.0).all(dim=1)[:, None, None]
    return torch.where(plain, hidden, rescaled)


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
    device: torch.device, max_tokens: int = WINDOW, emphasis: bool = False,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """{"hidden": [batch, tokens, width]} (and "pooled" for SDXL) for a batch of captions. Captions longer than
    one window are read in windows of 75 tokens up to `max_tokens`; SDXL's pooled embedding is the first
    window's (kohya's). With `emphasis` (prompts of previews and samples), A1111's (word:1.2) syntax weights
    the tokens (prompt_weights.py); the pooled embedding is unweighted, as in A1111."""
    hidden, pooled = [], None
    windows = max_tokens // WINDOW
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        weights = None
        if emphasis:
            flat, weights = weighted_ids(tokenizer, captions, max_tokens)
            ids = to_device(split_windows(flat, tokenizer, max_tokens).reshape(-1, WINDOW + 2), device)
        else:
            ids = to_device(window_ids(tokenizer, captions, max_tokens).reshape(-1, WINDOW + 2), device)
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
        states = joined_windows(states, windows)
        hidden.append(states if weights is None else emphasised(states, weights))
    result = {"hidden": torch.cat(hidden, dim=-1)}
    if pooled is not None:
        result["pooled"] = pooled
    return result


def overlong_captions(tokenizer, captions: list[str], max_tokens: int = WINDOW,
                      emphasis: bool = False) -> list[tuple[str, int]]:  # fmt: skip
    """(caption, its token count) of each caption longer than the `max_tokens` the text encoder reads: its end
    is cut off. With `emphasis`, counted as encode_captions reads it (brackets and weights are no tokens, a BREAK
    fills its window)."""
    def count(caption: str) -> int:
        return len(prompt_tokens(tokenizer, caption)[0]) if emphasis else token_count(tokenizer, caption)

    counted = [(caption, count(caption)) for caption in captions]
    return [(caption, count) for caption, count in counted if count > max_tokens]
