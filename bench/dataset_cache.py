"""Dataset pipeline benchmarks on CPU.

    python bench/dataset_cache.py [--images 500] [--runs 3] [--scan-files 10000] [--json FILE]

1. Latent-cache build throughput: `--images` generated 512x512 JPEGs, scanned, bucketed and encoded
   with the bundled demo VAE in batches of 8, into a fresh cache each run; median images/s of `--runs`.
   A second fill of the same cache measures the all-hits path.
2. Scan memory: peak RSS of a fresh process that scans `--scan-files` small PNGs, against the same
   process's RSS before scanning; reported per file to show only the item list grows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/report.py, when imported by tests
from report import publish  # noqa: E402


def make_images(folder: Path, count: int, size: int, fmt: str) -> None:
    import random

    from PIL import Image

    from lora_studio import demo_data

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        image = demo_data.render(demo_data.random_scene(rng)).resize((size, size), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:05d}.{fmt}", quality=90) if fmt == "jpg" else image.save(folder / f"{i:05d}.{fmt}")
        (folder / f"{i:05d}.txt").write_text("a shape")


def cache_throughput(images: int, runs: int) -> dict:
    import torch

    from lora_studio.buckets import assign_buckets
    from lora_studio.cache import LatentCache, plan_latent_entries
    from lora_studio.config import DatasetConfig
    from lora_studio.data import scan
    from lora_studio.models import load_base

    torch.set_num_threads(max(1, torch.get_num_threads()))
    vae = load_base("demo", dtype=torch.float32, device="cpu").vae
    work = Path(tempfile.mkdtemp())
    make_images(work / "data", images, 512, "jpg")
    config = DatasetConfig(path=str(work / "data"), resolution=512)
    rates, scan_seconds, hit_seconds = [], [], []
    for run in range(runs):
        start = time.perf_counter()
        report = scan(config)
        scanned = time.perf_counter()
        buckets = assign_buckets([(i.width, i.height) for i in report.items], config, 512)
        entries = plan_latent_entries(report.items, buckets, config)
        cache = LatentCache(work / f"cache{run}", vae)
        stats = cache.fill(report.items, entries, batch_size=8)
        built = time.perf_counter()
        assert stats["built"] == images
        again = cache.fill(report.items, entries)
        assert again["hits"] == images
        rates.append(images / (built - start))
        scan_seconds.append(scanned - start)
        hit_seconds.append(time.perf_counter() - built)
    return {
        "images": images,
        "runs": runs,
        "images_per_s_median": round(statistics.median(rates), 2),
        "images_per_s_runs": [round(r, 2) for r in rates],
        "scan_s_median": round(statistics.median(scan_seconds), 2),
        "all_hits_fill_s_median": round(statistics.median(hit_seconds), 2),
    }


def scan_child(folder: str) -> None:
    """Runs in a fresh process: RSS before and after scanning, in KiB (Linux ru_maxrss)."""
    from lora_studio.config import DatasetConfig
    from lora_studio.data import scan

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = scan(DatasetConfig(path=folder, min_bucket_reso=32))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps({"items": len(report.items), "rss_before_kib": before, "rss_peak_kib": after, "seconds": seconds})
    )


def scan_memory(files: int) -> dict:
    results = {}
    for count in (files // 10, files):
        folder = Path(tempfile.mkdtemp()) / "data"
        make_images(folder, count, 64, "png")
        out = subprocess.run([sys.executable, __file__, "--scan-child", str(folder)], capture_output=True, text=True)
        child = json.loads(out.stdout.strip().splitlines()[-1])
        growth = child["rss_peak_kib"] - child["rss_before_kib"]
        results[str(count)] = {
            "items": child["items"],
            "rss_before_mib": round(child["rss_before_kib"] / 1024, 1),
            "rss_peak_mib": round(child["rss_peak_kib"] / 1024, 1),
            "growth_mib": round(growth / 1024, 2),
            "growth_bytes_per_file": round(growth * 1024 / count),
            "files_per_s": round(count / child["seconds"]),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scan-files", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scan-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scan_child:
        scan_child(args.scan_child)
        return
    report = {"scan_memory": scan_memory(args.scan_files), "latent_cache": cache_throughput(args.images, args.runs)}
    publish(report, args.json)


if __name__ == "__main__":
    main()
