"""How long `python app.py --no-browser` takes until the page is usable, median of several runs.

    python bench/app_startup.py                      # 5 runs
    python bench/app_startup.py --json bench/results/app_startup_cpu.json
    python bench/app_startup.py --baseline OTHER_CHECKOUT    # also time another checkout, interleaved

"Usable" means what a person sees: headless Chromium (Debian's, as in the browser tests) has loaded
the page and the Train tab button is on screen. The clock starts before the Python process is spawned,
so interpreter start, imports, building the page, the server and the page's own JavaScript all count.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import alternating, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the app did not answer at {url} within {timeout:.0f} s")


@contextmanager
def serving_app(root: Path = ROOT, env: dict | None = None):
    """`python app.py --no-browser` on a free port, from `root`; yields its URL once it answers, stops it after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = subprocess.Popen([sys.executable, "app.py", "--no-browser", "--port", str(port)], cwd=root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_server(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def checkout_rounds(roots: dict[str, Path], rounds: int, measure) -> dict[str, list[dict]]:
    """`measure(browser, root)` for each checkout of `roots` in one headless Chromium, `rounds` times, the order
    alternating (report.alternating); each result printed as it comes. Returns each checkout's results."""
    from playwright.sync_api import sync_playwright

    runs: dict[str, list[dict]] = {case: [] for case in roots}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for round_ in range(rounds):
            for case in alternating(tuple(roots), round_):
                runs[case].append(measure(browser, roots[case]))
                print(f"round {round_ + 1} {case}: {runs[case][-1]}", flush=True)
        browser.close()
    return runs


def one_start(browser, root: Path = ROOT) -> dict[str, float]:
    start = time.perf_counter()  # before the process is spawned: interpreter start and imports count
    with serving_app(root) as url:
        served = time.perf_counter() - start
        page = browser.new_page()
        page.goto(url, wait_until="load", timeout=60_000)
        page.get_by_role("tab", name="Train").wait_for(timeout=60_000)
        usable = time.perf_counter() - start
        page.close()
        return {"served_s": round(served, 2), "usable_s": round(usable, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a git worktree of an older commit)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    runs, baseline = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for _ in range(args.runs):  # interleaved, so both see the same machine load
            runs.append(one_start(browser))
            if args.baseline:
                baseline.append(one_start(browser, args.baseline.resolve()))
        browser.close()
    report = {"runs": runs, **medians(runs), "bar_s": 10.0}
    if baseline:
        report["baseline"] = {"checkout": str(args.baseline), "runs": baseline, **medians(baseline)}
    publish(report, args.json)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "median_served_s": statistics.median(r["served_s"] for r in runs),
        "median_usable_s": statistics.median(r["usable_s"] for r in runs),
    }


if __name__ == "__main__":
    main()
