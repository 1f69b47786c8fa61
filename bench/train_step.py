"""Training-step speed: our trainer against a reference loop in the style of diffusers' LoRA example.

    python bench/train_step.py [--steps 10] [--runs 8] [--batch 8] [--json bench/results/train_step_cpu.json]

Both train the same LoRA (rank 8, UNet attention) on the bundled demo model, same batch and precision
(fp32 on CPU), measured side by side in one process. The reference encodes every batch with the VAE
and the text encoder each step and has no buckets, as `train_text_to_image_lora.py` does; ours reads
cached latents (and cached text embeddings when the text encoder is frozen) and steps with fused
AdamW; a fourth variant adds `torch_compile = true`. Each case is prepared once and warmed up with 2
steps (which hold the one-off compile); then --runs rounds time a block of --steps steps of every case
in turn. Reported: steps/s from the median step time of each case, the ratios, each block's steps/s,
the warm-up times, and whether issue 5's bar (1.3x the reference, judged on the per-round paired ratio)
is met by ours at its fastest (torch_compile) and without compile.

On this demo model the plain trainer cannot reach 1.3x: its step is the UNet's forward and backward
plus ~3 ms, and the reference's extra VAE, text-encoder and PNG work is only ~12% of its step (the
demo VAE and CLIP are tiny next to SD1.5's). CPU flash attention at head dims 6 and 12 is ~45% of the
UNet step, and neither the math backend nor diffusers' classic processor is faster (measured in
session 6). torch.compile's ~15% on the UNet is what carries ours over the bar.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/report.py, when imported by tests
from report import publish  # noqa: E402
from stepping import time_each, time_training_steps  # noqa: E402

from lora_studio import demo_data  # noqa: E402
from lora_studio.config import TrainConfig  # noqa: E402
from lora_studio.models import load_base  # noqa: E402
from lora_studio.train import prepare  # noqa: E402

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CPU_BAR = 1.3  # issue 5: ours must reach 1.3x the reference's steps/s on the CPU
BlockTimer = Callable[[int], list[float]]  # runs n training steps, returns the seconds of each


def make_dataset(folder: Path, count: int = 32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(demo_data.concept_scenes(count, seed=3)):
        demo_data.render(scene).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(scene.caption())


def ours(folder: Path, data: Path, batch: int, train_text_encoder: bool, compile: bool = False) -> BlockTimer:
    config = TrainConfig(
        name="bench",
        torch_compile=compile,
        base_model="demo",
        output_dir=str(folder / "runs"),
        mixed_precision="no",
        dataset={
            "path": str(data),
            "resolution": 64,
            "min_bucket_reso": 64,
            "max_bucket_reso": 64,
            "batch_size": batch,
            "enable_bucket": False,
            "cache_dir": str(folder / "cache"),
            "cache_text_embeddings": not train_text_encoder,
        },
        lora={"rank": 8, "alpha": 8.0, "unet_targets": "attn", "train_text_encoder": train_text_encoder},
        optimizer={"max_train_steps": 10_000, "min_snr_gamma": None, "lr_scheduler": "constant"},
        sample={"every_n_steps": 0},
        save={"every_n_epochs": 0, "save_state": False},
    )
    session = prepare(config)
    return lambda steps: time_training_steps(session, steps, warmup_steps=0)[1]


def to_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def reference_loop(folder: Path, batch: int) -> tuple[Callable[[], float], torch.nn.Module]:
    """diffusers' example loop: VAE and text encoder every step, LoRA on the UNet via add_adapter.

    Returns one training step (it returns the loss) and the UNet it trains.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    base = load_base("demo", dtype=torch.float32, device="cpu")
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoders[0], base.tokenizers[0]
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=ATTENTION))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("constant", optimizer)
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    files = sorted((folder / "data").glob("*.png"))
    rng = random.Random(0)
    unet.train()

    def step() -> float:
        chosen = rng.sample(files, batch)
        pixels = torch.stack([to_pixels(Image.open(f).convert("RGB")) for f in chosen])  # decoded every step
        captions = [f.with_suffix(".txt").read_text() for f in chosen]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            hidden = text_encoder(ids.input_ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        return loss.item()  # the example logs the loss every step

    return step, unet


def reference(folder: Path, batch: int) -> BlockTimer:
    step, _ = reference_loop(folder, batch)
    return lambda steps: time_each(step, steps)


def measure(batch: int = 8, steps: int = 10, runs: int = 8, images: int = 32) -> dict:
    """Prepare every case, warm each up, then time `runs` rounds of a `steps`-step block of each case in turn."""
    folder = Path(tempfile.mkdtemp())
    make_dataset(folder / "data", images)
    cases: dict[str, BlockTimer] = {
        "reference": reference(folder, batch),
        "ours_frozen_te": ours(folder / "a", folder / "data", batch, False),
        "ours_trained_te": ours(folder / "b", folder / "data", batch, True),
        "ours_frozen_te_compiled": ours(folder / "c", folder / "data", batch, False, compile=True),
    }
    warmup_s = {}
    for name, block in cases.items():
        start = time.perf_counter()
        block(2)  # with torch_compile, the compile happens here
        warmup_s[name] = time.perf_counter() - start
    # Round-robin blocks of a few steps: this machine's speed drifts by 15% within a minute, and short
    # interleaved blocks expose every case to the same drift (whole runs per case did not).
    step_s: dict[str, list[float]] = {name: [] for name in cases}
    block_steps_per_s: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(runs):
        torch.manual_seed(round_)
        for name, block in cases.items():
            times = block(steps)
            step_s[name] += times
            block_steps_per_s[name].append(len(times) / sum(times))
    medians = {name: 1 / statistics.median(times) for name, times in step_s.items()}
    reference_rates = block_steps_per_s["reference"]
    # The same comparison per round (blocks timed back to back), so a drift between rounds cancels out.
    paired = {
        name: round(statistics.median(o / r for o, r in zip(rates, reference_rates, strict=True)), 2)
        for name, rates in block_steps_per_s.items()
        if name != "reference"
    }
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "steps_per_block": steps,
        "rounds": runs,
        "steps_per_s_median": {k: round(v, 3) for k, v in medians.items()},
        "steps_per_s_blocks": {k: [round(x, 3) for x in v] for k, v in block_steps_per_s.items()},
        "ratio_ours_frozen_te_vs_reference": round(medians["ours_frozen_te"] / medians["reference"], 2),
        "ratio_ours_trained_te_vs_reference": round(medians["ours_trained_te"] / medians["reference"], 2),
        "ratio_ours_frozen_te_compiled_vs_reference": round(
            medians["ours_frozen_te_compiled"] / medians["reference"], 2
        ),
        "ratio_vs_reference_median_of_rounds": paired,
        # Issue 5's CPU bar, judged on the paired ratio. "ours" at its fastest is the trainer with its
        # torch_compile switch on (the reference has no such switch); the plain trainer is reported beside it.
        "bar": {
            "ratio": CPU_BAR,
            "ours_fastest": "ours_frozen_te_compiled",
            "met_by_ours_fastest": paired["ours_frozen_te_compiled"] >= CPU_BAR,
            "met_without_compile": paired["ours_frozen_te"] >= CPU_BAR,
        },
        "warmup_seconds": {k: round(v, 1) for k, v in warmup_s.items()},
        "notes": "ours uses fused AdamW (CPU and CUDA); compiled = TrainConfig.torch_compile (torch.compile, "
        "inductor); its compile happens in the warm-up, a one-off cost per training run (about 90 s the first "
        "time, about 6 s once inductor's on-disk cache holds it). steps_per_s_median is 1 / the median step "
        "time over every timed step of the case.",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--runs", type=int, default=8, help="rounds of one block per case")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    publish(measure(args.batch, args.steps, args.runs), args.json)


if __name__ == "__main__":
    main()
