"""Seconds for the commands that only read files, from the shell's point of view (interpreter start included).

    python bench/read_only_commands.py [--runs 5] [--baseline OTHER_CHECKOUT] [--json FILE]

Commands: `inspect` (text and --json) on a LoRA the demo trains for 4 steps here, `detect demo`,
`config demo-cpu`, `dataset demo --json`. Issue 17's bar: under 2 s each. With --baseline, the same
commands from another checkout (e.g. a git worktree of the commit before issue 17), interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BAR_S = 2.0


def commands(lora: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(lora)],
        "inspect --json": ["inspect", str(lora), "--json"],
        "detect demo": ["detect", "demo"],
        "config demo-cpu": ["config", "demo-cpu"],
        "dataset demo --json": ["dataset", "demo", "--json"],
    }


def seconds(checkout: Path, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lora_studio.cli", *argv], cwd=checkout, env=env, check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - start


def demo_lora(out: Path) -> Path:
    sets = ["optimizer.max_train_steps=4", "sample.every_n_steps=0", "save.every_n_steps=0", f"output_dir='{out}'"]
    argv = [sys.executable, "-m", "lora_studio.cli", "train", "demo-cpu", *[a for s in sets for a in ("--set", s)]]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
    return next(out.glob("demo-*/demo.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        lora = demo_lora(Path(out))
        checkouts = {"ours": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
        times: dict[str, dict[str, list[float]]] = {k: {c: [] for c in commands(lora)} for k in checkouts}
        for _ in range(args.runs):
            for name, argv in commands(lora).items():
                for which, checkout in checkouts.items():
                    times[which][name].append(round(seconds(checkout, argv), 3))
    report = {"bar_s": BAR_S, "runs": args.runs}
    for which, by_command in times.items():
        report[which] = {name: {"median_s": statistics.median(ts), "runs": ts} for name, ts in by_command.items()}
    report["ours_under_bar"] = all(v["median_s"] < BAR_S for v in report["ours"].values())
    publish(report, args.json)


if __name__ == "__main__":
    main()
