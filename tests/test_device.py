"""Device and dtype choice: CUDA, then MPS, then CPU; bf16 where supported, else fp16 on a GPU, fp32 on CPU."""

import pytest
import torch

from lora_studio.models import pick_device, pick_dtype


def test_cpu_machine_picks_cpu_and_fp32():
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device() == torch.device("cpu")
    assert pick_dtype("cpu") == torch.float32


def test_cuda_is_preferred(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")


def test_mps_when_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == torch.device("mps")
    assert pick_dtype("mps") == torch.float16


def test_cuda_dtype_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("cuda") == torch.float16


def test_a_step_s_inputs_stay_as_they_are_on_the_cpu():
    from lora_studio.models import to_device

    latents = torch.randn(2, 4, 8, 8)
    assert to_device(latents, torch.device("cpu")) is latents and to_device(latents, "cpu") is latents


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_s_inputs_reach_the_gpu_without_waiting_for_it():
    """A copy from pageable memory synchronises the stream (torch's sync debug mode raises on it); to_device's copy
    from pinned memory does not, and delivers the same values."""
    from lora_studio.models import to_device

    noise = torch.randn(2, 4, 8, 8)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            noise.to("cuda")
        on_gpu = to_device(noise, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(on_gpu.cpu(), noise)
