"""bench/demo_quality.py's LoRA path: strength 0 reproduces the base model; a strong adapter changes the images."""

import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lora_studio import demo_data
from lora_studio.models import load_base


def write_random_lora(tmp_path) -> Path:
    unet = load_base("demo", dtype=torch.float32, device="cpu").unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.3)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    return tmp_path / "pytorch_lora_weights.safetensors"


def test_lora_report_strength_zero_equals_base(tmp_path, bench_script):
    bench = bench_script("demo_quality")
    lora = write_random_lora(tmp_path)
    pipeline = load_base("demo", dtype=torch.float32, device="cpu").pipeline
    pipeline.set_progress_bar_config(disable=True)
    cases = demo_data.eval_cases()[:4]
    seeds = [c.seed for c in cases]
    prompts = [c.prompt(trigger=True) for c in cases]
    base_images = demo_data.generate(pipeline, prompts, seeds, steps=4)

    report = bench.lora_report(pipeline, lora, [0.0, 1.0], cases, steps=4, guidance=5.0, no_trigger=(0.0,))

    assert set(report) == {"0", "1", "0 no trigger"}
    plain = demo_data.generate(pipeline, [c.prompt(trigger=False) for c in cases], seeds, steps=4)
    assert report["0 no trigger"] == demo_data.score_images(cases, plain).as_dict()  # the prompts without zkz
    assert report["0"] == demo_data.score_images(cases, base_images).as_dict()
    base = bench.base_report(pipeline, cases, steps=4, guidance=5.0, triggers=(True,))
    assert set(base) == {"base_with_trigger", "dataset_concept"} and base["base_with_trigger"] == report["0"]
    pipeline.load_lora_weights(str(lora), adapter_name="again")
    pipeline.set_adapters(["again"], adapter_weights=[1.0])
    strong = demo_data.generate(pipeline, prompts, seeds, steps=4)
    assert any(a.tobytes() != b.tobytes() for a, b in zip(base_images, strong, strict=True))


@pytest.mark.slow
def test_lora_studio_demo_meets_the_issue_bar(tmp_path, monkeypatch, bench_script):
    """Issue 5's demo acceptance, end to end (about 4 minutes): `lora-studio demo` finishes within
    3 minutes on 2 CPU cores, and bench/demo_quality.py's concept rate is >= 70% at strength 1, the
    base model's (<= 10%) at 0, and in between at 0.5."""
    from lora_studio.cli import main

    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path))  # the demo writes runs/ in the home, not the working folder
    start = time.monotonic()
    assert main(["demo"]) == 0
    seconds = time.monotonic() - start
    (lora,) = (tmp_path / "runs").glob("demo-*/demo.safetensors")

    bench = bench_script("demo_quality")
    pipeline = load_base("demo", dtype=torch.float32, device="cpu").pipeline
    pipeline.set_progress_bar_config(disable=True)
    cases = demo_data.eval_cases()
    base = bench.base_report(pipeline, cases, steps=20, guidance=5.0, triggers=(True,))["base_with_trigger"]["concept"]
    report = bench.lora_report(pipeline, lora, [0.0, 0.5, 1.0], cases, steps=20, guidance=5.0)

    assert seconds <= 180, f"lora-studio demo took {seconds:.0f} s"
    assert report["0"]["concept"] == base <= 0.10
    assert base < report["0.5"]["concept"] < report["1"]["concept"]
    assert report["1"]["concept"] >= 0.70
