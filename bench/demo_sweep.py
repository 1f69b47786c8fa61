"""Sweep variants of the demo-cpu preset over seeds: train each, score it as bench/demo_quality.py does.

    python bench/demo_sweep.py --only preset constant --seeds 42 43     # CPU, one run at a time
    python bench/demo_sweep.py --device cuda --workers 12 --jsonl sweep.jsonl  # GPU: runs share the card

Each run is `lora-studio train demo-cpu --set ...` without samples or checkpoints, scored at strength 1 and
0.5 on the 64 cases of `demo_data.eval_cases()` (20 steps, guidance 5), with per-shape concept rates. One
seed says little: seed-to-seed spread was 5-15 points, so compare means over three or more seeds. GPU runs
are fp32 like the CPU ones but not bit-equal, so confirm a winner on the CPU before changing the preset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # demo_quality.py, for the scoring

RANK_32 = ["lora.rank=32", "lora.alpha=32"]
TEXT_CACHED = ["dataset.cache_text_embeddings=true"]
CONSTANT = [
    "optimizer.lr_scheduler=constant_with_warmup",
    "optimizer.learning_rate=3e-3",
    "optimizer.max_train_steps=600",
]
# The variants session 5 compared (CONSTANT was the preset before it); bench/results/README.md gives their
# numbers. `images=N` trains on N generated concept images instead of the bundled 24.
VARIANTS: dict[str, list[str]] = {
    "preset": [],
    "constant": CONSTANT,
    "constant-800": CONSTANT + ["optimizer.max_train_steps=800"],
    "constant-rank32": CONSTANT + RANK_32,
    "constant-rank32-800": CONSTANT + RANK_32 + ["optimizer.max_train_steps=800"],
    "constant-rank32-2e-3-800": CONSTANT + RANK_32 + ["optimizer.max_train_steps=800", "optimizer.learning_rate=2e-3"],
    "constant-rank32-alpha64-1.5e-3": CONSTANT + ["lora.rank=32", "lora.alpha=64", "optimizer.learning_rate=1.5e-3"],
    "constant-rank64": CONSTANT + ["lora.rank=64", "lora.alpha=64"],
    "constant-no-min-snr": CONSTANT + ["optimizer.min_snr_gamma=0"],
    "constant-flip": CONSTANT + ["dataset.flip_aug=true"],
    "constant-dora": CONSTANT + ["lora.use_dora=true"],
    "constant-caption-dropout": CONSTANT + ["dataset.caption_dropout_rate=0.1"],
    "constant-48-images": CONSTANT + ["images=48"],
    "constant-48-images-800": CONSTANT + ["images=48", "optimizer.max_train_steps=800"],
    "constant-48-images-rank32": CONSTANT + RANK_32 + ["images=48"],
    "constant-16-images-rank32": CONSTANT + RANK_32 + ["images=16"],
    "cosine-600": ["optimizer.max_train_steps=600"],
    "cosine-rank32-600": RANK_32 + ["optimizer.max_train_steps=600"],
    "cosine-rank32-6e-3-600": RANK_32 + ["optimizer.max_train_steps=600", "optimizer.learning_rate=6e-3"],
    # Session 8 (issue 17: the demo in 90 s on 2 cores): fewer image-steps, text embeddings cached.
    "cached-350": TEXT_CACHED + ["optimizer.max_train_steps=350"],
    "cached-350-6e-3": TEXT_CACHED + ["optimizer.max_train_steps=350", "optimizer.learning_rate=6e-3"],
    "cached-batch4-600": TEXT_CACHED + ["optimizer.max_train_steps=600", "dataset.batch_size=4"],
    "cached-400-5e-3": TEXT_CACHED + ["optimizer.max_train_steps=400", "optimizer.learning_rate=5e-3"],
    "cached-350-rank32": TEXT_CACHED + RANK_32 + ["optimizer.max_train_steps=350"],
    "cached-350-no-min-snr": TEXT_CACHED + ["optimizer.max_train_steps=350", "optimizer.min_snr_gamma=0"],
    "cached-350-no-clip": TEXT_CACHED + ["optimizer.max_train_steps=350", "optimizer.max_grad_norm=0"],
    "cached-350-rank32-alpha64": TEXT_CACHED + ["lora.rank=32", "lora.alpha=64", "optimizer.max_train_steps=350"],
    "cached-350-rank32-snr2": TEXT_CACHED + RANK_32 + ["optimizer.max_train_steps=350", "optimizer.min_snr_gamma=2"],
    "cached-350-rank32-snr1": TEXT_CACHED + RANK_32 + ["optimizer.max_train_steps=350", "optimizer.min_snr_gamma=1"],
    "cached-400-rank32": TEXT_CACHED + RANK_32 + ["optimizer.max_train_steps=400"],
    "cached-400-rank32-snr2": TEXT_CACHED + RANK_32 + ["optimizer.max_train_steps=400", "optimizer.min_snr_gamma=2"],
    "cached-350-snr2": TEXT_CACHED + ["optimizer.max_train_steps=350", "optimizer.min_snr_gamma=2"],
    "cached-350-snr1": TEXT_CACHED + ["optimizer.max_train_steps=350", "optimizer.min_snr_gamma=1"],
    # Session 18: the optimizers added then, on the preset otherwise unchanged (350 steps, rank 32, gamma 2).
    "schedulefree": ["optimizer.optimizer=adamw_schedulefree", "optimizer.lr_scheduler=constant"],
    "lion-1e-3": ["optimizer.optimizer=lion", "optimizer.learning_rate=1e-3"],
    # Session 19: Lion lower (1e-3 overshot), and Prodigy as the LoRA guides set it (rate 1, its estimate decides).
    "lion-3e-4": ["optimizer.optimizer=lion", "optimizer.learning_rate=3e-4"],
    "prodigy-guides": ["optimizer.optimizer=prodigy", "optimizer.learning_rate=1", "optimizer.text_encoder_lr=1",
                       "optimizer.prodigy_d_coef=2", "optimizer.prodigy_bias_correction=true",
                       "optimizer.prodigy_safeguard_warmup=true"],
}
_dataset_lock = threading.Lock()


def concept_dataset(out_root: Path, count: int) -> Path:
    """A generated dataset of `count` concept images (written once, shared by the runs that use it)."""
    from lora_studio import demo_data

    folder = out_root / "datasets" / f"{count}-images"
    with _dataset_lock:
        if not folder.exists():
            staging = folder.with_name(folder.name + ".tmp")
            staging.mkdir(parents=True, exist_ok=True)
            demo_data.write_concept_images(staging, count)
            staging.rename(folder)
    return folder


def variant_sets(variant: str, out_root: Path) -> list[str]:
    sets = []
    for item in VARIANTS[variant]:
        if item.startswith("images="):
            item = f"dataset.path={concept_dataset(out_root, int(item.removeprefix('images=')))}"
        sets.append(item)
    return sets


def score_lora(lora: Path, device: str) -> dict:
    """bench/demo_quality.py's report for one LoRA at strengths 1 and 0.5 (with per-shape concept rates)."""
    from demo_quality import lora_report, scoring_pipeline

    from lora_studio import demo_data

    pipeline = scoring_pipeline(device=device)
    return lora_report(pipeline, lora, [1.0, 0.5], demo_data.eval_cases(), steps=20, guidance=5.0)


def run_one(variant: str, seed: int, out_root: Path, device: str, threads: int, extra: list[str]) -> dict:
    """Train one variant with the CLI in a child process, then score its LoRA in another."""
    out = out_root / f"{variant}_{seed}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would otherwise pick a GPU
    sets = [f"output_dir={out}", f"seed={seed}", "sample.every_n_steps=0", "save.every_n_steps=0"]
    sets += variant_sets(variant, out_root) + extra
    command = [sys.executable, "-m", "lora_studio.cli", "train", "demo-cpu"]
    command += [arg for s in sets for arg in ("--set", s)]
    start = time.time()
    trained = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    record: dict = {"variant": variant, "seed": seed, "train_s": round(time.time() - start, 1)}
    loras = sorted(out.glob("*/demo.safetensors"))
    if trained.returncode or not loras:
        return {**record, "error": (trained.stdout + trained.stderr)[-600:]}
    scored = subprocess.run(
        [sys.executable, __file__, "--score", str(loras[-1]), "--device", device],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if scored.returncode:
        return {**record, "error": scored.stderr[-600:]}
    return {**record, **json.loads(scored.stdout.splitlines()[-1])}


def summarize(records: list[dict]) -> None:
    by_variant: dict[str, list[float]] = {}
    for r in records:
        if "1" in r:
            by_variant.setdefault(r["variant"], []).append(r["1"]["concept"])
    for variant, rates in by_variant.items():
        shown = ", ".join(f"{x:.0%}" for x in rates)
        print(f"{variant:28} mean {sum(rates) / len(rates):5.1%}  ({shown})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (on a GPU they share the card)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-sweep")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="key=value for every run")
    parser.add_argument("--jsonl", type=Path, help="append one line per run here, as each finishes")
    parser.add_argument("--score", type=Path, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score_lora(args.score, args.device)))
        return
    # Seeds outermost: a sweep cut short still has every variant at the first seeds.
    jobs = [(v, s) for s in args.seeds for v in (args.only or VARIANTS)]
    threads = 1 if args.device != "cpu" else max(1, (os.cpu_count() or 2) // args.workers)
    records = []
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_one, v, s, args.out, args.device, threads, args.extra) for v, s in jobs]
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    summarize(records)


if __name__ == "__main__":
    main()
