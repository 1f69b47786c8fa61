"""The demo's training speed on an idle machine and with one core kept busy, for several CPU thread policies.

    python bench/busy_core.py                       # all policies, 3 rounds, 120 steps each
    python bench/busy_core.py --policies app default --rounds 5 --json bench/results/busy_core_cpu.json

Each run is a fresh process (OpenMP reads its settings once, at start) that trains the demo-cpu preset
for `--steps` steps without samples or checkpoints and reports steps/s over the steps after the first
10. "busy" runs start `yes > /dev/null` first: one core kept busy by another program, as a browser
rendering the live page is. Policies and idle/busy runs alternate within each round, so a machine that
drifts affects them alike. Figures are medians over rounds; `busy_share` is busy steps/s over idle
steps/s of the same policy, `idle_vs_default` idle steps/s over the torch default's.

Policies:
  default   torch's own: one thread per core, OpenMP's default spin-wait (before issue 17), i.e. the count
            fixed with LORA_STUDIO_CPU_THREADS=<cores>
  passive   the same with OMP_WAIT_POLICY=PASSIVE
  one       LORA_STUDIO_CPU_THREADS=1
  app       the shipped policy: lora_studio.cpu_threads.ThreadTuner picks the count from step times
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import alternating, publish  # noqa: E402

POLICIES = ("default", "passive", "one", "app")


def child(policy: str, steps: int, out_dir: str) -> None:
    """Train in this process under `policy` and print one JSON line with the steps/s."""
    sys.path.insert(0, str(ROOT))
    import torch

    from lora_studio.config import load_preset
    from lora_studio.events import ProgressEvent
    from lora_studio.train import run_training

    config = load_preset("demo-cpu").model_copy(deep=True)
    config.optimizer.max_train_steps = steps
    config.sample.every_n_steps = 0
    config.save.every_n_steps = 0
    config.output_dir = out_dir
    times: dict[int, float] = {}

    def on_event(event) -> None:
        if isinstance(event, ProgressEvent):
            times[event.step] = time.perf_counter()

    threads_seen = []
    on_step = torch.set_num_threads

    def recording(n: int) -> None:
        threads_seen.append(n)
        on_step(n)

    torch.set_num_threads = recording  # what the tuner chose, for the report
    run_training(config, on_event)
    first = 10
    rate = (steps - first) / (times[steps] - times[first])
    # The tuner's switches (the last one restores torch's count after training).
    print(json.dumps({"policy": policy, "steps_per_s": rate, "threads": threads_seen or [torch.get_num_threads()]}))


def run_child(policy: str, steps: int, busy: bool, out_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["LORA_STUDIO_CPU_THREADS"] = {"app": "", "one": "1"}.get(policy, str(os.cpu_count()))
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", policy, "--steps", str(steps), "--out", str(out_dir)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0:
        raise SystemExit(f"{policy} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.out)
        return
    import tempfile

    rates: dict[str, dict[str, list[float]]] = {p: {"idle": [], "busy": []} for p in args.policies}
    with tempfile.TemporaryDirectory() as out:
        for round_ in range(args.rounds):
            for policy in args.policies:
                for state in alternating(("idle", "busy"), round_):
                    result = run_child(policy, args.steps, state == "busy", Path(out))
                    rates[policy][state].append(result["steps_per_s"])
                    print(f"round {round_ + 1} {policy:8s} {state}: {result['steps_per_s']:.2f} steps/s "
                          f"(thread counts set: {result['threads']})", flush=True)  # fmt: skip
    report = summarise(rates, args)
    print(json.dumps(report["policies"], indent=2))
    if args.json:
        publish(report, args.json)


def summarise(rates: dict, args) -> dict:
    policies = {}
    default_idle = statistics.median(rates["default"]["idle"]) if "default" in rates else None
    for policy, runs in rates.items():
        idle, busy = statistics.median(runs["idle"]), statistics.median(runs["busy"])
        policies[policy] = {
            "idle_steps_per_s": round(idle, 3),
            "busy_steps_per_s": round(busy, 3),
            "busy_share": round(busy / idle, 3),
            "idle_vs_default": round(idle / default_idle, 3) if default_idle else None,
            "runs": {k: [round(v, 3) for v in vs] for k, vs in runs.items()},
        }
    return {
        "what": "demo-cpu training steps/s, idle and with one core kept busy by `yes > /dev/null`",
        "cores": os.cpu_count(),
        "steps": args.steps,
        "rounds": args.rounds,
        "policies": policies,
    }


if __name__ == "__main__":
    main()
