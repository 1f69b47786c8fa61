"""The CPU the browser spends on the app's page while nobody uses it: with the shipped tracker_frames script
(Gradio's status-tracker loop run from a timer, no frames) and without it (Gradio as it comes: 60 frames a second).

    python bench/page_idle.py                       # 2 rounds, 20 s on each tab
    python bench/page_idle.py --rounds 3 --json bench/results/page_idle_cpu.json

The app is `python app.py` on a free port (for the "without" case a copy whose middleware inserts nothing),
opened in headless Chromium (Debian's, as in the browser tests); after the page has settled, the Dataset tab
(nothing polls) and then the Train tab (a poll a second while no job runs) are left open for `--seconds` each.
The figure is the CPU time of all Chromium processes over that window, as a share of one core, and the frames
the page asked for a second. The cases alternate; figures are medians.
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

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_startup import CHROMIUM, CHROMIUM_ARGS, free_port, wait_for_server  # noqa: E402
from report import alternating, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# "without": the app with the middleware's insertion made a no-op, everything else as shipped
SERVE_WITHOUT = (
    "import sys; import lora_studio.ui.tracker_frames as t; t.with_script = lambda html: html; "
    "from lora_studio.cli import main; sys.exit(main(['app', *sys.argv[1:]]))"
)
COUNT_FRAMES = """(() => { window.frameRequests = 0; const ask = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => { window.frameRequests++; return ask(callback); }; })()"""


def chromium_cpu_seconds() -> float:
    total = 0.0
    for process in psutil.process_iter(["name", "cpu_times"]):
        if "chrom" in (process.info["name"] or ""):
            total += process.info["cpu_times"].user + process.info["cpu_times"].system
    return total


def serve(case: str, home: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    code = ["app.py"] if case == "with" else ["-c", SERVE_WITHOUT]
    env = {**os.environ, "LORA_STUDIO_HOME": home}
    process = subprocess.Popen([sys.executable, *code, "--no-browser", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    wait_for_server(url, process)
    return process, url


def one_case(browser, case: str, home: str, seconds: float) -> dict[str, float]:
    process, url = serve(case, home)
    try:
        context = browser.new_context()
        context.add_init_script(COUNT_FRAMES)
        page = context.new_page()
        page.goto(url, wait_until="load", timeout=60_000)
        time.sleep(8)  # the page's opening transitions
        figures = {}
        for tab in ("Dataset", "Train"):
            page.get_by_role("tab", name=tab).click()
            time.sleep(3)
            page.evaluate("() => { window.frameRequests = 0 }")
            before = chromium_cpu_seconds()
            time.sleep(seconds)
            figures[f"{tab.lower()}_core_share"] = round((chromium_cpu_seconds() - before) / seconds, 4)
            figures[f"{tab.lower()}_frames_per_s"] = round(page.evaluate("() => window.frameRequests") / seconds, 1)
        context.close()
        return figures
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    runs: dict[str, list[dict]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as home, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for round_ in range(args.rounds):
            for case in alternating(("with", "without"), round_):
                runs[case].append(one_case(browser, case, home, args.seconds))
                print(f"round {round_ + 1} {case}: {runs[case][-1]}", flush=True)
        browser.close()
    medians = {case: {key: round(statistics.median(run[key] for run in rows), 4) for key in rows[0]}
               for case, rows in runs.items()}  # fmt: skip
    report = {
        "what": "CPU share of one core taken by headless Chromium showing the app's idle page, with and without "
                "lora_studio/ui/tracker_frames.py",  # fmt: skip
        "cores": os.cpu_count(),
        "seconds_per_tab": args.seconds,
        "runs": runs,
        "medians": medians,
    }
    publish(report, args.json)


if __name__ == "__main__":
    main()
