"""The README's two commands and CI stay in step."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.strip() for line in lines[:12] if line.startswith("    ")]


def test_readme_opens_with_run_and_test_commands():
    run, test = readme_commands()[:2]
    assert run.endswith("lora-studio") and "pip install" in run
    assert test.endswith("python -m pytest") and '".[test]"' in test


def test_ci_runs_the_readme_test_command_verbatim():
    test = readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines
    assert ci_lines.index(test) > ci_lines.index(".venv/bin/pip install -q torch==2.13.0")


def test_test_workers_share_the_cores_between_them():
    """The suite's workers (pytest-xdist) each run torch on their share of the cores: two workers that each split
    every op over all the cores ran the suite 1.4x slower than one process (545 s against 387 s, one test 12x)."""
    import os

    import torch
    from conftest import TEST_THREADS, TEST_WORKERS

    if "PYTEST_XDIST_WORKER" not in os.environ:
        assert TEST_WORKERS == 1 and TEST_THREADS == (os.cpu_count() or 1)
        return
    assert TEST_WORKERS * TEST_THREADS <= max(os.cpu_count() or 1, TEST_WORKERS)
    assert torch.get_num_threads() == TEST_THREADS and os.environ["OMP_NUM_THREADS"] == str(TEST_THREADS)
