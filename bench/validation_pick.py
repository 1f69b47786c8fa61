"""Does the validation loss pick a good checkpoint on the demo? And how specific is the trigger word today?

    python bench/validation_pick.py --seeds 42 43 44 --json bench/results/validation_pick_cpu.json

Per seed, one at a time on the CPU, the demo-cpu preset (no samples):
- as shipped: 8 held-out images (`validation.path = "demo-validation"`), validation every 25 steps, a checkpoint
  every 100. Its best file (lowest validation loss) and its final file are scored;
- with validation off: the time it saves, and a check that validation left the trained weights unchanged.
Scores are bench/demo_quality.py's over its 64 cases (20 steps, guidance 5): the zkz outline (concept) rate at
strength 1 with the trigger word, and without it (issue 18's trigger-specificity baseline). Issue 18 asks that
the best checkpoint score at least as well as the final one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from demo_quality import lora_report, scoring_pipeline  # noqa: E402
from report import publish  # noqa: E402

from lora_studio import demo_data  # noqa: E402
from lora_studio.config import load_preset  # noqa: E402
from lora_studio.runs import RunFolder  # noqa: E402
from lora_studio.train import run_training  # noqa: E402


def train(seed: int, out: Path, extra: list[str]) -> tuple[RunFolder, float]:
    config = load_preset("demo-cpu", [f"seed={seed}", f"output_dir='{out}'", "sample.every_n_steps=0", *extra])
    start = time.perf_counter()
    done = run_training(config)
    return RunFolder(done.run_dir), time.perf_counter() - start


def scores(pipeline, lora: Path, cases) -> dict:
    """Concept rate at strength 1, with and without the trigger word."""
    report = lora_report(pipeline, lora, [1.0], cases, 20, 5.0, no_trigger=(1.0,))
    return {"concept": report["1"]["concept"], "concept_no_trigger": report["1 no trigger"]["concept"]}


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    return set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def one_seed(seed: int, pipeline, cases, out: Path) -> dict:
    validated, validated_s = train(seed, out / f"validated-{seed}", [])
    plain, plain_s = train(seed, out / f"plain-{seed}", ["validation.path=''"])
    best, losses = validated.best_lora(), validated.validation_losses()
    final = validated.final_lora("demo")
    row = {
        "seed": seed,
        "train_seconds": {"validation_off": round(plain_s, 1), "validation_on": round(validated_s, 1)},
        "same_final_weights": same_weights(final, plain.final_lora("demo")),
        "validation_curve": [(r["step"], round(r["validation_loss"], 6)) for r in validated.validation_metrics()],
        "best": {"file": best.name, "step": losses[best]["step"], "validation_loss": losses[best]["validation_loss"],
                 **scores(pipeline, best, cases)},  # fmt: skip
        "final": {"step": losses[final]["step"], "validation_loss": losses[final]["validation_loss"],
                  **scores(pipeline, final, cases)},  # fmt: skip
    }
    row["best_at_least_final"] = row["best"]["concept"] >= row["final"]["concept"]
    print(f"seed {seed}: best step {row['best']['step']} concept {row['best']['concept']:.0%} | final "
          f"{row['final']['concept']:.0%}, without the trigger {row['final']['concept_no_trigger']:.0%} | "
          f"{plain_s:.0f} s without validation, {validated_s:.0f} s with", flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pipeline = scoring_pipeline()
    cases = demo_data.eval_cases()
    with tempfile.TemporaryDirectory() as out:
        rows = [one_seed(seed, pipeline, cases, Path(out)) for seed in args.seeds]
    mean = {f"{part}_{metric}": sum(r[part][metric] for r in rows) / len(rows)
            for part in ("best", "final") for metric in ("concept", "concept_no_trigger")}  # fmt: skip
    publish({"runs": rows, "mean": mean, "torch_threads": torch.get_num_threads()}, args.json, echo=True)


if __name__ == "__main__":
    main()
