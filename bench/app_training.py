"""The demo's training speed started from the app's Train tab, with the live page open in Chromium, beside
the same training from the command line.

    python bench/app_training.py                   # 3 rounds of 200 steps each way
    python bench/app_training.py --rounds 3 --steps 200 --json bench/results/app_training_cpu.json
    git worktree add /tmp/before <older commit>
    python bench/app_training.py --baseline /tmp/before     # the app of another checkout too, alternating

The app case is what a person does: `python app.py`, the Train tab open in headless Chromium (Debian's,
as in the browser tests), the demo preset, Start, and the page left open while it polls (every 4 s while the
CPU trains) and redraws the progress bar, the loss curve, the samples and the log. The CLI case is `lora-studio
train demo-cpu` with the same settings. Both keep the preset's samples (every 175 steps) and use the
shipped thread policy. Steps/s come from the `time` of each line of the run's metrics.jsonl, from step
10 to the last, so model loading does not count. For each app run, the CPU all Chromium processes took from
Start to the run's end is reported too, as a share of one core (`browser_share_of_a_core`: what the page takes
from the training). With `--baseline`, the app of another checkout runs as a third case. The cases alternate;
figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_startup import CHROMIUM, CHROMIUM_ARGS, serving_app  # noqa: E402
from page_idle import chromium_cpu_seconds  # noqa: E402
from report import alternating, commit_of, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def steps_per_s(run_dir: Path, first: int = 10) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = {line["step"]: line["time"] for line in lines}
    last = max(times)
    return (last - first) / (times[last] - times[first])


def env_for(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_STUDIO_CPU_THREADS", "OMP_NUM_THREADS")}
    return {**env, "LORA_STUDIO_HOME": str(home)}


def cli_run(home: Path, steps: int) -> float:
    subprocess.run(
        [sys.executable, "-m", "lora_studio.cli", "train", "demo-cpu", "--set", f"optimizer.max_train_steps={steps}"],
        cwd=ROOT, env=env_for(home), check=True, capture_output=True,
    )  # fmt: skip
    return steps_per_s(newest_run(home))


def newest_run(home: Path) -> Path:
    return max((home / "runs").glob("demo-*"), key=lambda p: p.stat().st_mtime)


def app_run(browser, home: Path, steps: int, root: Path = ROOT) -> tuple[float, float]:
    """Steps/s, and Chromium's CPU from Start to the end of the run as a share of one core."""
    with serving_app(root, env_for(home)) as url:
        page = browser.new_page()
        page.goto(url, wait_until="load", timeout=60_000)
        page.get_by_role("tab", name="Train").click()
        page.locator("#cfg-optimizer-max_train_steps input").fill(str(steps))
        cpu, started = chromium_cpu_seconds(), time.perf_counter()
        page.locator("#train-start").click()
        page.wait_for_function(
            "() => { const e = document.querySelector('#train-status'); "
            "return e && /\\b(done|failed|stopped)\\b/.test(e.innerText); }",
            timeout=900_000,
        )
        browser_share = (chromium_cpu_seconds() - cpu) / (time.perf_counter() - started)
        page.close()
    return steps_per_s(newest_run(home)), browser_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--baseline", type=Path, help="another checkout whose app runs too (e.g. a git worktree)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    apps = {"app": ROOT, **({"baseline_app": args.baseline.resolve()} if args.baseline else {})}
    rates: dict[str, list[float]] = {"cli": [], **{case: [] for case in apps}}
    browser_shares: dict[str, list[float]] = {case: [] for case in apps}
    with tempfile.TemporaryDirectory() as home, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for round_ in range(args.rounds):
            for case in alternating(tuple(rates), round_):
                started = time.perf_counter()
                if case == "cli":
                    rate = cli_run(Path(home), args.steps)
                else:
                    rate, share = app_run(browser, Path(home), args.steps, apps[case])
                    browser_shares[case].append(round(share, 4))
                rates[case].append(round(rate, 3))
                print(f"round {round_ + 1} {case}: {rate:.2f} steps/s ({time.perf_counter() - started:.0f} s)",
                      flush=True)  # fmt: skip
        browser.close()
    cli, app = statistics.median(rates["cli"]), statistics.median(rates["app"])
    report = {
        "what": "demo-cpu training steps/s from the Train tab with the live page open, beside the CLI",
        "cores": os.cpu_count(),
        "steps": args.steps,
        "runs": rates,
        "cli_steps_per_s": cli,
        "app_steps_per_s": app,
        "app_share": round(app / cli, 3),
        "browser_share_of_a_core": {case: statistics.median(shares) for case, shares in browser_shares.items()},
        "browser_shares": browser_shares,
        "checkouts": {case: f"{root} at {commit_of(root)}" for case, root in apps.items()},
    }
    if args.baseline:
        baseline = statistics.median(rates["baseline_app"])
        report |= {"baseline_app_steps_per_s": baseline, "baseline_app_share": round(baseline / cli, 3)}
    publish(report, args.json)


if __name__ == "__main__":
    main()
