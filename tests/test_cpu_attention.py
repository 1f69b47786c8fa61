"""CPU training's small-head attention (issue 17's CPU step): the same attention as torch's SDPA, outputs and
gradients, taken only by fp32 CPU training at small head dims; the trainer installs it on the CPU uncompiled."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from test_train import tiny_config
from test_validation import make_images

from lora_studio import cpu_attention
from lora_studio.cpu_attention import SmallHeadAttention, SmallHeadAttnProcessor, use_small_head_attention
from lora_studio.train import prepare


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("train"), 4)


def sdpa(query, key, value, heads):
    """torch's attention on (batch, tokens, heads x dim) inputs, as diffusers' processor calls it."""
    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    return out.transpose(1, 2).reshape(query.shape)


@pytest.mark.parametrize("shape", [(2, 8, 64, 64, 6), (2, 8, 64, 77, 12), (3, 2, 5, 7, 4)])
def test_small_head_attention_equals_sdpa_with_its_gradients(shape):
    batch, heads, queries, keys, dim = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, n, heads * dim, dtype=torch.float64, requires_grad=True) for n in (queries, keys,
                                                                                                    keys))  # fmt: skip
    grad = torch.randn(batch, queries, heads * dim, dtype=torch.float64)
    expected = sdpa(q, k, v, heads)
    out = SmallHeadAttention.apply(q, k, v, heads)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    theirs = torch.autograd.grad(expected, (q, k, v), grad)
    for mine, their in zip(torch.autograd.grad(out, (q, k, v), grad), theirs, strict=True):
        torch.testing.assert_close(mine, their, rtol=0, atol=1e-12)


def test_small_head_attention_passes_gradcheck_and_skips_gradients_nobody_asked_for():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, dtype=torch.float64, requires_grad=True) for n in (3, 4, 4))
    assert torch.autograd.gradcheck(lambda a, b, c: SmallHeadAttention.apply(a, b, c, 2), (q, k, v))
    frozen_k, frozen_v = k.detach(), v.detach()  # cross-attention without LoRA on to_k / to_v
    (grad_q,) = torch.autograd.grad(SmallHeadAttention.apply(q, frozen_k, frozen_v, 2).sum(), q)
    torch.testing.assert_close(grad_q, torch.autograd.grad(sdpa(q, frozen_k, frozen_v, 2).sum(), q)[0])


def small_head_unet() -> UNet2DConditionModel:
    """Head dim 6 at the first level (48 channels, 8 heads), as the demo model; 12 in the middle block."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(48, 96), layers_per_block=1, sample_size=16, norm_num_groups=16, attention_head_dim=8,
        cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip


def unet_inputs(batch: int = 2):
    torch.manual_seed(1)
    return torch.randn(batch, 4, 16, 16), torch.tensor([10, 500]), torch.randn(batch, 77, 32)


def test_the_processor_trains_the_unet_as_sdpa_does_and_leaves_inference_to_it(monkeypatch):
    unet = small_head_unet()
    sample, timesteps, context = unet_inputs()
    expected = unet(sample, timesteps, context).sample
    expected_grads = torch.autograd.grad(expected.square().mean(), list(unet.parameters()))
    with torch.no_grad():
        expected_inference = unet(sample, timesteps, context).sample

    assert use_small_head_attention(unet) == len(unet.attn_processors) == 8  # 2 attentions in 4 transformers
    calls = []
    original = SmallHeadAttention.forward
    spy = staticmethod(lambda *args: calls.append(args[1].shape) or original(*args))  # records, then computes
    monkeypatch.setattr(SmallHeadAttention, "forward", spy)
    out = unet(sample, timesteps, context).sample
    grads = torch.autograd.grad(out.square().mean(), list(unet.parameters()))
    # self- and cross-attention at 256 tokens (head dim 6; 3 transformers) take it; the 64-token middle is too small
    assert calls == [torch.Size([2, 256, 48])] * 6
    # fp32 through a UNet: rounding differs by ~1e-6 (a wrong attention differs by the size of the outputs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(unet(sample, timesteps, context).sample, expected_inference)  # SDPA, unchanged
    assert not calls


def test_only_fp32_cpu_training_at_small_head_dims_without_a_mask_takes_the_path():
    attn = Attention(48, heads=8, dim_head=6)
    hidden = torch.randn(8, 256, 48)
    assert cpu_attention.takes_small_head_path(attn, hidden, hidden, None)
    assert not cpu_attention.takes_small_head_path(attn, hidden, hidden, torch.ones(8, 1, 256))  # a mask
    assert not cpu_attention.takes_small_head_path(attn, hidden.bfloat16(), hidden.bfloat16(), None)
    with torch.no_grad():
        assert not cpu_attention.takes_small_head_path(attn, hidden, hidden, None)  # inference: SDPA
    small = torch.randn(1, 64, 48)  # 8 x 64 x 64 scores: flash attention's overhead is lower
    assert not cpu_attention.takes_small_head_path(attn, small, small, None)
    wide = Attention(128, heads=8, dim_head=16)  # head dim 16: flash attention is faster
    assert not cpu_attention.takes_small_head_path(wide, torch.randn(8, 256, 128), torch.randn(8, 256, 128), None)
    huge = torch.randn(1, 4096, 48)  # 8 x 4096 x 4096 fp32 scores (512 MiB) would be kept for the backward
    assert not cpu_attention.takes_small_head_path(attn, huge, huge, None)


def test_only_diffusers_own_sdpa_processors_are_replaced():
    unet = small_head_unet()
    name = next(iter(unet.attn_processors))
    unet.set_attn_processor({**unet.attn_processors, name: object.__new__(type("Mine", (AttnProcessor2_0,), {}))})
    assert use_small_head_attention(unet) == 7
    assert type(unet.attn_processors[name]).__name__ == "Mine"


@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_training_installs_it_unless_compiled(tmp_path, tiny_folders, images, compiled):
    session = prepare(tiny_config(tmp_path, tiny_folders, images, torch_compile=compiled))
    kinds = {type(p) for p in session.base.unet.attn_processors.values()}
    assert kinds == ({AttnProcessor2_0} if compiled else {SmallHeadAttnProcessor})
