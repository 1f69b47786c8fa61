"""Which timesteps of the validation loss follow the demo's concept rate? A diagnosis behind the demo preset's note.

    python bench/validation_timesteps.py --seed 42 [--fraction 0.125] --json out.json

Trains the demo-cpu preset with validation at 10 fixed timesteps (50, 150, ..., 950) and a checkpoint every 25
steps, records each checkpoint's held-out loss per timestep, and scores each checkpoint's concept rate at strength
1 (bench/demo_quality.py's 64 cases). Without --fraction the preset's own held-out folder is used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from demo_quality import lora_report, scoring_pipeline  # noqa: E402
from report import publish  # noqa: E402

from lora_studio import demo_data, validation  # noqa: E402
from lora_studio.config import load_preset  # noqa: E402
from lora_studio.runs import RunFolder  # noqa: E402
from lora_studio.train import run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fraction", type=float, default=0.0, help="hold out this share of the dataset instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    per_step: dict[int, list[list[float]]] = {}
    measured = validation.timestep_losses

    def recording(session, image, timesteps):
        losses = measured(session, image, timesteps)
        per_step.setdefault(session.step, []).append(losses.tolist())
        return losses

    validation.timestep_losses = recording  # the same pass, its per-timestep values kept
    held_out = [f"validation.fraction={args.fraction}", "validation.path=''"] if args.fraction else []
    with tempfile.TemporaryDirectory() as out:
        config = load_preset("demo-cpu", [f"seed={args.seed}", f"output_dir='{out}'", "sample.every_n_steps=0",
                                          "validation.timesteps=10", "save.every_n_steps=25", *held_out])  # fmt: skip
        run = RunFolder(run_training(config).run_dir)
        pipeline = scoring_pipeline()
        cases, rows = demo_data.eval_cases(), []
        for path in run.checkpoint_files():
            step = int(path.stem[-6:])
            concept = lora_report(pipeline, path, [1.0], cases, 20, 5.0)["1"]["concept"]
            by_timestep = torch.tensor(per_step[step]).mean(0).tolist()
            rows.append({"step": step, "concept": concept, "loss": sum(by_timestep) / 10, "by_timestep": by_timestep})
            print(step, f"{concept:.0%}", " ".join(f"{v:.4f}" for v in by_timestep), flush=True)
    timesteps = validation.fixed_timesteps(10, 1000).tolist()
    publish({"seed": args.seed, "fraction": args.fraction, "timesteps": timesteps, "checkpoints": rows}, args.json)


if __name__ == "__main__":
    main()
