"""Preview speed on the demo model: a 20-step 64x64 image after a strength change (no reload).

    python bench/preview_speed.py LORA_FILE [--runs 5] [--json bench/results/preview_speed_cpu.json]

Loads the demo model and the LoRA once, then alternates the strength (0, 0.5, 1, ...) and renders one
image per run; reports the median seconds per image and the one-off load time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/report.py, when imported by tests
from report import publish  # noqa: E402

from lora_studio.models import load_base  # noqa: E402
from lora_studio.sample import Previewer, PreviewSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lora", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    previewer = Previewer(load_base("demo", dtype=torch.float32, device="cpu"))
    name = previewer.add_lora(args.lora)
    load_s = time.perf_counter() - start
    settings = PreviewSettings(prompt="zkz, a red star on a white background", steps=args.steps, width=64, height=64)
    previewer.generate(settings)  # warm-up
    times = []
    for run in range(args.runs):
        strength = (0.0, 0.5, 1.0)[run % 3]
        start = time.perf_counter()
        previewer.generate(PreviewSettings(**{**settings.__dict__, "strengths": {name: strength}, "seed": run}))
        times.append(time.perf_counter() - start)
    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "size": "64x64",
        "load_model_and_lora_s": round(load_s, 2),
        "seconds_per_image_median": round(statistics.median(times), 3),
        "seconds_per_image_runs": [round(t, 3) for t in times],
    }
    publish(report, args.json)


if __name__ == "__main__":
    main()
