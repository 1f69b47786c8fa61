"""bench/report.py: what a report says about the checkouts it compares."""

import subprocess


def test_a_report_names_a_checkout_s_commit_and_says_when_its_files_differ(tmp_path, bench_script):
    report = bench_script("report")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert report.commit_of(tmp_path) == commit
    (tmp_path / "scratch.txt").write_text("untracked files are not the code measured")
    assert report.commit_of(tmp_path) == commit
    (tmp_path / "a.py").write_text("x = 2\n")
    assert report.commit_of(tmp_path) == f"{commit} with uncommitted changes"
    assert report.commit_of(tmp_path / "not-a-checkout") == "unknown"
