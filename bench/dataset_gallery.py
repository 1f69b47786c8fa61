"""Opening a dataset of phone photos in the Dataset tab: how long until its report and the gallery's visible pictures
are shown, and the CPU the browser spends on it. With `--baseline`, the same for another checkout, alternating.

    python bench/dataset_gallery.py                                     # this checkout, 2 rounds
    git worktree add /tmp/before <older commit>
    python bench/dataset_gallery.py --baseline /tmp/before --json bench/results/dataset_gallery_cpu.json

Each case is `python app.py` (from its checkout) with a fresh home whose datasets/photos holds --images generated
JPEGs of --width x --height (smooth colour fields: what costs is the pixels). Headless Chromium (Debian's, as in the
browser tests) opens the page, types datasets/photos into the Dataset folder field and clicks Open: `first_*` is
that open in a fresh app process, `again_*` a second open of the same folder (after the demo in between), as when
a person comes back to it. `*_s` is from the click until the report names the images and every gallery picture on
screen has loaded; `*_cpu_s` is Chromium's CPU seconds from the click to 3 s after that. Figures are medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_startup import checkout_rounds, serving_app  # noqa: E402
from dataset_rescan import make_photos  # noqa: E402
from page_idle import chromium_cpu_seconds  # noqa: E402
from report import commit_of, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTLE_S = 3.0
SHOWN = """() => {
    const pictures = [...document.querySelectorAll('#dataset-gallery img')].filter(img => {
        const box = img.getBoundingClientRect();
        return box.bottom > 0 && box.top < innerHeight;
    });
    return pictures.length > 0 && pictures.every(img => img.complete && img.naturalWidth > 0);
}"""


def open_folder(page, folder: str, count: int) -> dict[str, float]:
    page.get_by_label("Dataset folder").fill(folder)
    cpu, start = chromium_cpu_seconds(), time.perf_counter()
    page.get_by_role("button", name="Open", exact=True).click()
    page.locator("#dataset-report").get_by_text(f"{count} images").wait_for(timeout=300_000)
    page.wait_for_function(SHOWN, timeout=300_000)
    shown = time.perf_counter() - start
    time.sleep(SETTLE_S)
    return {"s": round(shown, 2), "cpu_s": round(chromium_cpu_seconds() - cpu, 2)}


def one_case(browser, root: Path, photos: Path, images: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="dataset-gallery-"))
    shutil.copytree(photos, home / "datasets" / "photos")  # a link out of the home would be refused
    time.sleep(2.5)  # older than data.SETTLED_NS, as a person's photos are
    with serving_app(root, {**os.environ, "LORA_STUDIO_HOME": str(home)}) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="load", timeout=60_000)
        page.get_by_role("tab", name="Train").wait_for(timeout=60_000)
        time.sleep(5)  # the page's opening events (the demo dataset opens)
        first = open_folder(page, "datasets/photos", images)
        open_folder(page, "demo", 24)
        again = open_folder(page, "datasets/photos", images)
        page.close()
    return {"first_s": first["s"], "first_cpu_s": first["cpu_s"], "again_s": again["s"],
            "again_cpu_s": again["cpu_s"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    photos = Path(tempfile.mkdtemp(prefix="photos-"))
    make_photos(photos, args.images, args.width, args.height)
    roots = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs = checkout_rounds(roots, args.rounds, lambda browser, root: one_case(browser, root, photos, args.images))
    report = {
        "what": f"opening a folder of {args.images} JPEGs of {args.width}x{args.height} in the Dataset tab, in a new "
                "app and again: seconds until the report and the gallery's visible pictures are shown, and "
                f"Chromium's CPU seconds until {SETTLE_S} s after",  # fmt: skip
        "cores": os.cpu_count(),
        "checkouts": {case: f"{root} at {commit_of(root)}" for case, root in roots.items()},
        "runs": runs,
        "medians": {case: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for case, rows in runs.items()},
    }
    publish(report, args.json)


if __name__ == "__main__":
    main()
