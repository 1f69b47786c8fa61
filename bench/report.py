"""The one way the benchmarks hand over results: JSON on stdout and, when asked, in a file."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path


def publish(report: dict, path: Path | None, echo: bool = True) -> None:
    text = json.dumps(report, indent=2)
    if echo:
        print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def alternating(cases: Sequence[str], round_: int) -> Sequence[str]:
    """The cases in order on even rounds and reversed on odd ones, so a drift in the machine's speed hits both."""
    return cases if round_ % 2 == 0 else cases[::-1]


def commit_of(root: Path) -> str:
    """The short commit a checkout is at, for reports that compare checkouts ("unknown" outside git), marked when
    its tracked files differ from that commit (a figure measured before its change was committed says so)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{commit} with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else commit
