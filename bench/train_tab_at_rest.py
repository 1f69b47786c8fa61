"""The CPU the browser spends on the Train tab while nothing trains: on a fresh page, and after one "Check settings"
(an event whose inputs are the form's ~150 fields; from then on Gradio updates the loading status of each of them
on every event, polls included); then what typing into the form costs (before e1f3113 each key was an event that
sent the form for the estimate). With `--baseline`, the same for another checkout, alternating.

    python bench/train_tab_at_rest.py                                   # this checkout, 3 rounds
    git worktree add /tmp/before <older commit>
    python bench/train_tab_at_rest.py --baseline /tmp/before --json bench/results/train_tab_at_rest_cpu.json

Each case is `python app.py` (from its checkout) on a free port in headless Chromium (Debian's, as in the browser
tests); after the page has settled, the Train tab is left open for `--seconds` as opened, then again after a click
on "Check settings". The figure is the CPU time of all Chromium processes over that window, as a share of one core.
Then TYPED is typed into the run's name, a key every TYPING_DELAY_MS; `typing_cpu_s` is Chromium's CPU seconds from
the first key to TYPING_SETTLE_S after the last (the page's work that typing set off, done or not). Last, the tabs
of TAB_TOUR are clicked in turn, one every TAB_DELAY_S (each tab reads its lists again when it is selected);
`tab_switch_cpu_s` is Chromium's CPU seconds from the first click to TAB_DELAY_S after the last. Figures are medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_startup import checkout_rounds, serving_app  # noqa: E402
from page_idle import chromium_cpu_seconds  # noqa: E402
from report import commit_of, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STATES = ("fresh", "after_check")
TYPED, TYPING_DELAY_MS, TYPING_SETTLE_S = "my-style-v2-typed-one-key-at-a-time-now", 50, 6.0
TAB_TOUR, TAB_DELAY_S = ("Library", "Train", "Preview", "Train", "Presets", "Train"), 2.0
FIGURES = (*STATES, "typing_cpu_s", "tab_switch_cpu_s")


def one_case(browser, root: Path, seconds: float) -> dict[str, float]:
    env = {**os.environ, "LORA_STUDIO_HOME": tempfile.mkdtemp(prefix="train-tab-at-rest-")}
    with serving_app(root, env) as url:
        page = browser.new_page()
        page.goto(url, wait_until="load", timeout=60_000)
        time.sleep(8)  # the page's opening transitions
        page.get_by_role("tab", name="Train").click()
        time.sleep(3)
        shares = {}
        for state in STATES:
            if state == "after_check":
                page.locator("#train-check").click()
                time.sleep(3)
            before = chromium_cpu_seconds()
            time.sleep(seconds)
            shares[state] = round((chromium_cpu_seconds() - before) / seconds, 4)
        before = chromium_cpu_seconds()
        page.locator("#cfg-name textarea").press_sequentially(TYPED, delay=TYPING_DELAY_MS)
        time.sleep(TYPING_SETTLE_S)
        shares["typing_cpu_s"] = round(chromium_cpu_seconds() - before, 3)
        before = chromium_cpu_seconds()
        for tab in TAB_TOUR:
            page.get_by_role("tab", name=tab).click()
            time.sleep(TAB_DELAY_S)
        shares["tab_switch_cpu_s"] = round(chromium_cpu_seconds() - before, 3)
        page.close()
        return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    roots = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs = checkout_rounds(roots, args.rounds, lambda browser, root: one_case(browser, root, args.seconds))
    report = {
        "what": "CPU share of one core taken by headless Chromium showing the Train tab with nothing training, "
                "on a fresh page and after one 'Check settings'; Chromium's CPU seconds for typing "
                f"{len(TYPED)} characters into the form, a key every {TYPING_DELAY_MS} ms, and {TYPING_SETTLE_S} s "
                f"after; and for clicking the tabs {', '.join(TAB_TOUR)}, one every {TAB_DELAY_S} s",  # fmt: skip
        "cores": os.cpu_count(),
        "seconds": args.seconds,
        "checkouts": {case: f"{root} at {commit_of(root)}" for case, root in roots.items()},
        "runs": runs,
        "medians": {case: {s: statistics.median(r[s] for r in rows) for s in FIGURES if s in rows[0]}
                    for case, rows in runs.items()},  # fmt: skip
    }
    publish(report, args.json)


if __name__ == "__main__":
    main()
