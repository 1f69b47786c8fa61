"""Attention for CPU training at the small head dims of tiny models such as the bundled demo (6 and 12).

torch's CPU flash attention vectorises along the head dim, so below 16 its blocks are mostly padding, and its
backward recomputes the scores. At these sizes plain batched matmuls that keep the softmax for the backward
are faster, provided each product is laid out with the head dim as its rows (`p @ v` as `(v^T p^T)^T`: 1.3 ms
against 5.4 ms for the same product at head dim 6). Forward and backward of one demo attention (batch 8,
8 heads, 256 tokens, head dim 6), fp32 on 2 cores: 11-13 ms here against 20-26 ms for
`scaled_dot_product_attention`. At head dim 16 and above, and for small problems, flash attention is as fast
or faster (measured from 16 to 4096 tokens, head dims 6-64), so it keeps those, and every real SD checkpoint
(head dims 40-160).

Only training on the CPU in fp32 without a mask takes this path, and only where the attention module is
diffusers' plain one; inference (no gradients) and everything else go to diffusers' own processor, so
samples and previews are computed as before. The kept softmax costs memory (4 bytes a score), hence the cap.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

SMALL_HEAD_DIM = 12  # the largest head dim that takes this path (measured crossover: 12 wins, 16 loses)
MIN_SCORES = 1 << 18  # batch x heads x queries x keys below this: flash attention's overhead is lower
MAX_SCORES = 1 << 26  # 256 MiB of fp32 scores kept for the backward; larger problems keep flash attention


class SmallHeadAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v for (batch, tokens, heads x d) inputs, the probabilities kept for the backward."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        batch, queries, width = query.shape
        dim, keys = width // heads, key.shape[1]
        q, k, v = (split_heads(x, heads) for x in (query, key, value))  # (batch x heads, tokens, dim)
        scale = dim**-0.5
        scores = torch.baddbmm(q.new_empty(q.shape[0], queries, keys), q, k.transpose(1, 2), beta=0, alpha=scale)
        probs = torch.softmax(scores, dim=-1)
        del scores
        out_t = torch.bmm(v.transpose(1, 2), probs.transpose(1, 2))  # (batch x heads, dim, queries)
        ctx.save_for_backward(q, k, v, probs)
        ctx.heads, ctx.scale = heads, scale
        return merge_heads_t(out_t, batch, heads)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, probs = ctx.saved_tensors
        batch, heads = grad_out.shape[0], ctx.heads
        g = split_heads(grad_out, heads)
        grads = [None, None, None, None]
        if ctx.needs_input_grad[2]:
            grads[2] = merge_heads_t(torch.bmm(g.transpose(1, 2), probs), batch, heads)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d_scores = torch.ops.aten._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), probs, -1, probs.dtype)
            # The scale goes on the small products (dim rows), not on the scores (tokens x tokens each).
            if ctx.needs_input_grad[0]:
                d_q = torch.bmm(k.transpose(1, 2), d_scores.transpose(1, 2)).mul_(ctx.scale)
                grads[0] = merge_heads_t(d_q, batch, heads)
            if ctx.needs_input_grad[1]:
                grads[1] = merge_heads_t(torch.bmm(q.transpose(1, 2), d_scores).mul_(ctx.scale), batch, heads)
        return tuple(grads)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads x dim) -> (batch x heads, tokens, dim), contiguous."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2).reshape(batch * heads, tokens, width // heads)


def merge_heads_t(x_t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(batch x heads, dim, tokens) -> (batch, tokens, heads x dim)."""
    _, dim, tokens = x_t.shape
    return x_t.view(batch, heads, dim, tokens).permute(0, 3, 1, 2).reshape(batch, tokens, heads * dim)


def takes_small_head_path(attn: Attention, hidden: torch.Tensor, context: torch.Tensor, mask) -> bool:
    """Whether this call is CPU training in fp32 through diffusers' plain attention at a small head dim."""
    if mask is not None or hidden.ndim != 3 or hidden.device.type != "cpu" or hidden.dtype != torch.float32:
        return False
    if not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None:
        return False
    if attn.norm_k is not None or attn.residual_connection or attn.rescale_output_factor != 1.0:
        return False
    if context is not hidden and attn.norm_cross:
        return False
    dim = attn.inner_dim // attn.heads
    scores = hidden.shape[0] * attn.heads * hidden.shape[1] * context.shape[1]
    return dim <= SMALL_HEAD_DIM and MIN_SCORES <= scores <= MAX_SCORES


class SmallHeadAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, with CPU training at small head dims through `SmallHeadAttention`."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:  # fmt: skip
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if args or kwargs or not takes_small_head_path(attn, hidden_states, context, attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = SmallHeadAttention.apply(query, key, value, attn.heads)
        return attn.to_out[1](attn.to_out[0](out))


def use_small_head_attention(unet: torch.nn.Module) -> int:
    """Give each of `unet`'s attention modules that uses diffusers' SDPA processor `SmallHeadAttnProcessor`
    (which hands every call but CPU training at small head dims back to it). Returns how many it changed."""
    processors = unet.attn_processors
    changed = {name: SmallHeadAttnProcessor() for name, proc in processors.items() if type(proc) is AttnProcessor2_0}
    if changed:
        unet.set_attn_processor({**processors, **changed})
    return len(changed)
