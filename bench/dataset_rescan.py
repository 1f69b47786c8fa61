"""How long a scan of a dataset of photos takes, the first time and again with nothing changed.

    python bench/dataset_rescan.py [--images 100] [--width 4000 --height 3000] [--runs 3] [--json FILE]

The app scans the open folder each time the Dataset tab is shown, and the Train form's dataset at each estimate
("Check settings", a field left). The first scan reads, checks and decodes every image; `data.probe_image` remembers
what it found by each file's identity, so a scan again reads only what changed. Generated JPEGs of phone-photo size
(smooth colour fields: the time goes into decoding the pixels, not the entropy); medians of --runs scans again.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

from lora_studio import data  # noqa: E402
from lora_studio.config import DatasetConfig  # noqa: E402


def make_photos(folder: Path, count: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    field = np.asarray(small.resize((width, height), Image.BICUBIC))
    for i in range(count):
        Image.fromarray(np.roll(field, i * 7, axis=1)).save(folder / f"{i:03d}.jpg", quality=90)
        (folder / f"{i:03d}.txt").write_text(f"a photo, number {i}")


def timed_scan(folder: Path) -> float:
    start = time.perf_counter()
    report = data.scan(DatasetConfig(path=str(folder)))
    assert report.items and not report.errors
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="rescan-"))
    make_photos(folder, args.images, args.width, args.height)
    time.sleep(data.SETTLED_NS / 1e9 + 0.5)  # files as a person's dataset is: written a while ago
    first = timed_scan(folder)
    again = [timed_scan(folder) for _ in range(args.runs)]
    report = {
        "images": args.images,
        "size": f"{args.width}x{args.height}",
        "first_scan_s": round(first, 3),
        "scan_again_s": [round(s, 4) for s in again],
        "scan_again_median_s": round(statistics.median(again), 4),
        "first_over_again": round(first / statistics.median(again), 1),
    }
    publish(report, args.json)


if __name__ == "__main__":
    main()
