"""Training-step speed: our trainer against a reference loop in the style of diffusers' LoRA example.

    python bench/train_step.py [--steps 10] [--runs 8] [--batch 8] [--json bench/results/train_step_cpu.json]

Both train the same LoRA (rank 8, UNet attention) on the bundled demo model, same batch and precision
(fp32 on CPU). The reference encodes every batch with the VAE and the text encoder each step and has no
buckets, as `train_text_to_image_lora.py` does; ours reads cached latents (and cached text embeddings when
the text encoder is frozen), steps with fused AdamW, keeps freed memory for the next step (`cpu_memory`) and
computes the demo's small-head attention with batched matmuls (`cpu_attention`, not when compiled); a
variant adds `torch_compile = true`, and `reference_kept_heap` is the reference with our memory policy, which
shows what that policy alone gives. Each case runs in its own process (glibc's heap is per process, so the
policy must not leak from one case into another); one process steps at a time. Each is prepared once and
warmed up with 2 steps (which hold the one-off compile); then --runs rounds time a block of --steps steps of
every case in turn. Reported: steps/s from the median step time of each case, the ratios, each block's
steps/s, the warm-up times, and whether issue 5's bar (1.3x the reference, judged on the per-round paired
ratio) is met by ours at its fastest and without compile.

Before session 23 the plain trainer stayed at 1.10-1.15x: its step is the UNet's forward and backward plus
~3 ms, the reference's extra VAE, text-encoder and PNG work is only ~12% of its step, and CPU flash attention
at head dims 6 and 12 was ~45% of the UNet step (neither the math backend nor diffusers' classic processor is
faster: session 6). What carried it over: every step's large tensors were fresh pages the kernel mapped and
zeroed (17,500 page faults a step), and flash attention's kernel is slow below head dim 16.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
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
from lora_studio.cpu_memory import KeptHeap  # noqa: E402
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


CASES: dict[str, Callable[[Path, int], BlockTimer]] = {
    "reference": reference,
    "reference_kept_heap": reference,  # with freed memory kept as ours keeps it: what that policy alone gives
    "ours_frozen_te": lambda folder, batch: ours(folder / "a", folder / "data", batch, False),
    "ours_trained_te": lambda folder, batch: ours(folder / "b", folder / "data", batch, True),
    "ours_frozen_te_compiled": lambda folder, batch: ours(folder / "c", folder / "data", batch, False, compile=True),
}


def keeps_memory(case: str) -> bool:
    """Our trainer keeps freed memory for its whole run on the CPU (`cpu_memory.KeptHeap`); a plain script does not."""
    return case.startswith("ours") or case.endswith("kept_heap")


def serve_case(case: str, folder: Path, batch: int) -> None:
    """One case in its own process (`--worker CASE`), so that each has the allocator state it runs with (glibc's
    heap is per process): prepares the case, then reads a step count a line and answers each block's step times."""
    answers, sys.stdout = sys.stdout, sys.stderr  # what the libraries print must not mix with the answers
    heap = KeptHeap("cpu") if keeps_memory(case) else None
    block = CASES[case](folder, batch)
    print(json.dumps("ready"), file=answers, flush=True)
    for line in sys.stdin:
        steps, seed = map(int, line.split())
        torch.manual_seed(seed)
        print(json.dumps(block(steps)), file=answers, flush=True)
    if heap is not None:
        heap.release()


class CaseProcess:
    """A `serve_case` process and the blocks it times."""

    def __init__(self, case: str, folder: Path, batch: int):
        command = [sys.executable, __file__, "--worker", case, "--folder", str(folder), "--batch", str(batch)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.case = case
        self._answer()  # prepared

    def _answer(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.case} case's process ended (exit code {self.process.wait()})")
        return json.loads(line)

    def block(self, steps: int, seed: int = 0) -> list[float]:
        self.process.stdin.write(f"{steps} {seed}\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def measure(batch: int = 8, steps: int = 10, runs: int = 8, images: int = 32) -> dict:
    """Prepare every case in its own process, warm each up, then time `runs` rounds of a `steps`-step block of
    each case in turn (one process runs at a time)."""
    folder = Path(tempfile.mkdtemp())
    make_dataset(folder / "data", images)
    cases = {name: CaseProcess(name, folder, batch) for name in CASES}  # each prepares before the next starts
    try:
        return timed_rounds(cases, batch, steps, runs)
    finally:
        for case in cases.values():
            case.close()


def timed_rounds(cases: dict[str, CaseProcess], batch: int, steps: int, runs: int) -> dict:
    warmup_s = {}
    for name, case in cases.items():
        start = time.perf_counter()
        case.block(2)  # with torch_compile, the compile happens here
        warmup_s[name] = time.perf_counter() - start
    # Round-robin blocks of a few steps: this machine's speed drifts by 15% within a minute, and short
    # interleaved blocks expose every case to the same drift (whole runs per case did not).
    step_s: dict[str, list[float]] = {name: [] for name in cases}
    block_steps_per_s: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(runs):
        for name, case in cases.items():
            times = case.block(steps, seed=round_)
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
        "ratio_ours_frozen_te_vs_reference_kept_heap": round(
            medians["ours_frozen_te"] / medians["reference_kept_heap"], 2
        ),
        "ratio_vs_reference_median_of_rounds": paired,
        "bar": judge_bar(paired),
        "warmup_seconds": {k: round(v, 1) for k, v in warmup_s.items()},
        "notes": "ours uses fused AdamW (CPU and CUDA), keeps freed memory from step to step (cpu_memory) and "
        "computes the demo's small-head attention with batched matmuls (cpu_attention) unless compiled; "
        "reference_kept_heap is the reference with that memory policy; compiled = TrainConfig.torch_compile "
        "(torch.compile, inductor); its compile happens in the warm-up, a one-off cost per training run (about "
        "90 s the first time, about 6 s once inductor's on-disk cache holds it). steps_per_s_median is 1 / the "
        "median step time over every timed step of the case.",
    }


def judge_bar(paired: dict[str, float]) -> dict:
    """Issue 5's CPU bar on the paired ratios: by ours at its fastest (with or without its torch_compile switch;
    the reference has no such switch), and by the plain trainer (issue 17: without needing torch_compile)."""
    fastest = max(("ours_frozen_te", "ours_frozen_te_compiled"), key=lambda name: paired[name])
    return {
        "ratio": CPU_BAR,
        "ours_fastest": fastest,
        "met_by_ours_fastest": paired[fastest] >= CPU_BAR,
        "met_without_compile": paired["ours_frozen_te"] >= CPU_BAR,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)  # one case's process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--runs", type=int, default=8, help="rounds of one block per case")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker:
        serve_case(args.worker, args.folder, args.batch)
        return
    publish(measure(args.batch, args.steps, args.runs), args.json)


if __name__ == "__main__":
    main()
