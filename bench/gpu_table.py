"""The README's GPU table, made from bench/gpu_step.py's JSON files (issue 17: "the README table is regenerated").

    python bench/gpu_table.py bench/results/train_step_gpu_sd1.json bench/results/train_step_gpu_sdxl.json \
        [--second-start bench/results/second_start_sd1.json ...] [--readme README.md]

One row per case of issue 17: the reference's images/s, ours' (the trainer's own loop, eager and with CUDA
graphs), the better of ours over the reference, the goal, peak GiB (the reference's against ours' over the timed
steps) and ours' MFU (the eager step's FLOPs over the loop's time), each a median over the files' runs; then the
low-VRAM presets against their memory and speed goals, and the seconds to the first optimizer step of each
compiled case, cold and (with --second-start) in a fresh process. With --readme the table replaces the lines
between `<!-- gpu-table -->` and `<!-- /gpu-table -->`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora_studio.fsutil import write_text_atomic  # noqa: E402

# label: (reference case, ours eager, ours with CUDA graphs, images/s goal); issue 17 also asks >= 2x the reference
CASES = {
    "SD1.5 512, batch 1": ("sd15_ref_bs1", "ours_sd15_bs1", "ours_sd15_ro_bs1", 20.0),
    "SD1.5 512, batch 4": ("sd15_ref_bs4", "ours_sd15_bs4", "ours_sd15_ro_bs4", 120.0),
    "SDXL 1024, batch 1": ("sdxl_ref_bs1", "ours_sdxl_bs1", "ours_sdxl_ro_bs1", 5.0),
    "SDXL 1024, batch 4": ("sdxl_ref_bs4", "ours_sdxl_bs4", "ours_sdxl_ro_bs4", 25.0),
}
RATIO_GOAL = 2.0
LOW_VRAM = {  # case: (peak GiB goal, steps/s goal or None)
    "ours_sd15_low_vram": (4.0, None),
    "ours_sdxl_low_vram": (8.0, 1.0),
    "ours_sd15_low_vram_fp8": (4.0, None),  # the same presets with fp8_base = true
    "ours_sdxl_low_vram_fp8": (8.0, 1.0),
}
BEGIN, END = "<!-- gpu-table -->", "<!-- /gpu-table -->"

Runs = dict[str, list[dict]]


def merged_runs(paths: list[Path]) -> tuple[Runs, str]:
    """Every file's runs_detail together (a case measured in two files keeps both runs), and the device's name."""
    runs: Runs = {}
    devices = []
    for path in paths:
        report = json.loads(path.read_text())
        devices.append(report.get("device", "?"))
        for case, results in report.get("runs_detail", {}).items():
            runs.setdefault(case, []).extend(r for r in results if "error" not in r)
    return runs, " / ".join(sorted(set(devices)))


def median(runs: Runs, case: str, key: str) -> float | None:
    values = [r[key] for r in runs.get(case, []) if r.get(key) is not None]
    return statistics.median(values) if values else None


def ours_img_s(runs: Runs, case: str) -> float | None:
    """Ours at the speed a run goes: the trainer's loop (older files timed synchronised single steps only)."""
    return median(runs, case, "loop_img_s") or median(runs, case, "img_s")


def ours_mfu(runs: Runs, case: str, eager: str) -> float | None:
    """FLOPs are counted on an eager step; a compiled case does the same work per image, so its MFU is its eager
    twin's scaled by their speeds."""
    own, eager_mfu = median(runs, case, "mfu"), median(runs, eager, "mfu")
    speed, eager_speed = ours_img_s(runs, case), ours_img_s(runs, eager)
    if own is not None or eager_mfu is None or not speed or not eager_speed:
        return own
    return eager_mfu * speed / eager_speed


def shown(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def speed_rows(runs: Runs) -> list[str]:
    rows = [
        "| case | reference img/s | ours img/s (eager / CUDA graphs) | ours / reference | goal img/s | "
        "peak GiB (reference / ours) | MFU (ours) | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, (reference, eager, graphs, goal) in CASES.items():
        ref = median(runs, reference, "img_s")
        speeds = {c: ours_img_s(runs, c) for c in (eager, graphs)}
        measured = {c: s for c, s in speeds.items() if s}
        if ref is None and not measured:
            continue
        best = max(measured, key=measured.get) if measured else None
        ratio = measured[best] / ref if best and ref else None
        ours_peak, ref_peak = median(runs, best, "peak_gib") if best else None, median(runs, reference, "peak_gib")
        met = (ratio is not None and ratio >= RATIO_GOAL and measured[best] >= goal
               and (ours_peak is None or ref_peak is None or ours_peak <= ref_peak))  # fmt: skip
        mfu = ours_mfu(runs, best, eager) if best else None
        rows.append(f"| {label} | {shown(ref)} | {shown(speeds[eager])} / {shown(speeds[graphs])} | "
                    f"{shown(ratio, 2, 'x')} | {goal:g} | {shown(ref_peak, 2)} / {shown(ours_peak, 2)} | "
                    f"{shown(mfu and 100 * mfu, 1, '%')} | {'yes' if met else 'no'} |")  # fmt: skip
    return rows


def low_vram_rows(runs: Runs) -> list[str]:
    rows = [
        "| low-VRAM preset | steps/s | peak GiB: timed steps / whole run / nvidia-smi | goal | met |",
        "|---|---|---|---|---|",
    ]
    for case, (gib_goal, speed_goal) in LOW_VRAM.items():
        if case not in runs:
            continue
        ms = median(runs, case, "loop_ms_per_step") or median(runs, case, "ms_per_step")
        speed = 1000 / ms if ms else None
        timed, whole, smi = (median(runs, case, k) for k in ("peak_gib", "whole_run_peak_gib", "nvidia_smi_peak_gib"))
        worst = max((v for v in (whole, smi) if v is not None), default=None)  # text encoders and VAE included
        met = worst is not None and worst <= gib_goal and (speed_goal is None or (speed or 0) >= speed_goal)
        goal = f"<= {gib_goal:g} GiB" + (f", >= {speed_goal:g} it/s" if speed_goal else "")
        rows.append(f"| `{case}` | {shown(speed, 2)} | {shown(timed, 2)} / {shown(whole, 2)} / {shown(smi, 2)} | "
                    f"{goal} | {'yes' if met else 'no'} |")  # fmt: skip
    return rows if len(rows) > 2 else []


def start_rows(runs: Runs, again: Runs) -> list[str]:
    compiled = [c for c, results in runs.items() if c.startswith("ours") and any(r.get("compile") for r in results)]
    if not compiled:
        return []
    rows = ["| compiled case | seconds to the first optimizer step: cold / second start |", "|---|---|"]
    rows += [f"| `{c}` | {shown(median(runs, c, 'first_step_s'))} / {shown(median(again, c, 'first_step_s'))} |"
             for c in compiled]  # fmt: skip
    return rows


def table(paths: list[Path], second_start: list[Path]) -> str:
    runs, device = merged_runs(paths)
    again, _ = merged_runs(second_start)
    parts = [f"Measured on {device} by `bench/gpu_step.py` ({', '.join(p.name for p in paths)}); "
             "`bench/gpu_table.py` made this table."]  # fmt: skip
    for rows in (speed_rows(runs), low_vram_rows(runs), start_rows(runs, again)):
        if rows:
            parts.append("\n".join(rows))
    return "\n\n".join(parts)


def replace_between_markers(text: str, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the file needs one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--second-start", nargs="*", type=Path, default=[])
    parser.add_argument("--readme", type=Path, help="write the table between the markers of this file")
    args = parser.parse_args()
    block = table(args.reports, args.second_start)
    print(block)
    if args.readme:
        write_text_atomic(args.readme, replace_between_markers(args.readme.read_text(), block))


if __name__ == "__main__":
    main()
