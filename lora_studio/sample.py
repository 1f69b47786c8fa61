"""Rendering with an adjustable adapter strength, without reloading weights.

The strength is diffusers' LoRA scale (`cross_attention_kwargs={"scale": s}`), which scales every
peft LoRA layer of the UNet and the text encoders for that call only: strength 0 is the base model
exactly, 1 the adapter as trained. Training uses this to render samples at several strengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

SAMPLERS = {
    "euler_a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
}


@dataclass(frozen=True)
class Rendered:
    prompt: str
    strength: float
    seed: int
    image: Image.Image


def use_sampler(pipeline, sampler: str) -> None:
    """Swap the pipeline's scheduler for `sampler`, keeping the model's noise schedule and prediction type."""
    pipeline.scheduler = SAMPLERS[sampler].from_config(pipeline.scheduler.config)


@torch.no_grad()
def render(
    pipeline,
    prompts: list[str],
    strengths: list[float],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 7.0,
    size: tuple[int, int] | None = None,
    negative_prompt: str = "",
) -> list[Rendered]:
    """One image per (prompt, strength, seed); the same seed gives the same noise at every strength."""
    width, height = size or (None, None)
    results = []
    for prompt in prompts:
        for strength in strengths:
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            images = pipeline(
                [prompt] * len(seeds),
                negative_prompt=[negative_prompt] * len(seeds) if negative_prompt else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=generators,
                cross_attention_kwargs={"scale": strength},
            ).images
            results += [Rendered(prompt, strength, seed, image) for seed, image in zip(seeds, images, strict=True)]
    return results
