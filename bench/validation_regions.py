"""Can any held-out loss pick the demo's best checkpoint? Masks over the shape, and training that memorises less.

    python bench/validation_regions.py --seed 42 --json bench/results/validation_regions_cpu.json

Issue 18 asks that the checkpoint with the lowest validation loss score at least as well on the concept rate as
the final one; on the shipped demo it does not (bench/validation_pick.py). This tries two ways out, one run at a
time on the CPU, each the demo-cpu preset (seed 42, validation at 10 timesteps, a checkpoint every 25 steps):

- *where* the held-out error is measured: each held-out image's squared error is kept per latent pixel, and the
  loss is recomputed inside regions the demo generator knows (the shape filled in, its hollow interior, its
  stroke, everything outside it dilated by 4 px), as a validation mask (`name.mask.png`) would weight it;
- *what* is trained: variants that memorise the 24 images less (flips, LoRA dropout, strong weight decay).

Each checkpoint at a multiple of 50 steps, and each variant's lowest-loss checkpoint, is scored at strength 1
(bench/demo_quality.py's 64 cases).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from demo_quality import lora_report, scoring_pipeline  # noqa: E402
from report import publish  # noqa: E402

from lora_studio import demo_data, validation  # noqa: E402
from lora_studio.config import load_preset  # noqa: E402
from lora_studio.runs import RunFolder  # noqa: E402
from lora_studio.train import run_training  # noqa: E402

VARIANTS = {
    "as shipped": [],
    "flips": ["dataset.flip_aug=true"],
    "LoRA dropout 0.1": ["lora.dropout=0.1"],
    "weight decay 1.0": ["optimizer.weight_decay=1.0"],
}
REGIONS = ("whole image", "shape filled", "shape interior", "shape stroke", "outside the shape")
Maps = dict[int, dict[str, np.ndarray]]  # step -> held-out image name -> (timesteps, C, h, w) squared error


@contextmanager
def errors_recorded(maps: Maps) -> Iterator[None]:
    """The validation pass as it is, keeping each held-out image's squared error per latent pixel: its
    `timestep_losses` says which image and step are scored, its `masked_mse` sees the prediction and target."""
    scoring, mse = validation.timestep_losses, validation.masked_mse
    current: list[tuple[int, str]] = []

    def timestep_losses(session, image, timesteps):
        current[:] = [(session.step, image.item.path.name)]
        return scoring(session, image, timesteps)

    def masked_mse(pred, target, weights=None):
        step, name = current[0]
        maps.setdefault(step, {})[name] = ((pred.float() - target.float()) ** 2).cpu().numpy()
        return mse(pred, target, weights)

    validation.timestep_losses, validation.masked_mse = timestep_losses, masked_mse
    try:
        yield
    finally:
        validation.timestep_losses, validation.masked_mse = scoring, mse


def drawn(scene: demo_data.Scene, **style) -> np.ndarray:
    """The scene's shape drawn white on black as the generator draws it (supersampled, box-filtered), in [0, 1]."""
    s = demo_data.SUPERSAMPLE
    image = Image.new("L", (demo_data.SIZE * s, demo_data.SIZE * s), 0)
    demo_data._draw_shape(ImageDraw.Draw(image), scene.shape, scene.cx * s, scene.cy * s, scene.radius * s, **style)
    small = image.resize((demo_data.SIZE, demo_data.SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def held_out_scene(name: str) -> demo_data.Scene:
    """The scene held-out image `zkz_<i>_...png` shows: scene i of the demo world (demo_data.write_concept_images)."""
    return demo_data.concept_scenes(demo_data.DEMO_IMAGES + demo_data.DEMO_VALIDATION_IMAGES)[int(name.split("_")[1])]


def region_masks(name: str, latent_side: int) -> dict[str, np.ndarray]:
    """The regions of held-out image `name`, averaged down to latent size."""
    scene = held_out_scene(name)
    filled = drawn(scene, fill=255)
    stroke = drawn(scene, outline=255, width=demo_data.OUTLINE_WIDTH * demo_data.SUPERSAMPLE)
    dilated = F.max_pool2d(torch.from_numpy(filled)[None, None], 9, 1, 4)[0, 0].numpy()

    def down(a: np.ndarray) -> np.ndarray:
        return F.interpolate(torch.from_numpy(a)[None, None], size=(latent_side,) * 2, mode="area")[0, 0].numpy()

    regions = [np.ones_like(filled), filled, np.clip(filled - stroke, 0, 1), stroke, 1 - dilated]
    return {r: down(m) for r, m in zip(REGIONS, regions, strict=True)}


def region_losses(maps: Maps) -> dict[int, dict[str, float]]:
    """Per checkpoint, the mean over held-out images of each region's weighted MSE (a mean over every latent pixel,
    as masked loss computes it)."""
    names = sorted(next(iter(maps.values())))
    masks = {n: region_masks(n, next(iter(maps.values()))[n].shape[-1]) for n in names}
    return {
        step: {r: round(float(np.mean([(errors[n] * masks[n][r]).mean() for n in names])), 6) for r in REGIONS}
        for step, errors in sorted(maps.items())
    }


def one_variant(name: str, overrides: list[str], seed: int, pipeline, out: Path) -> dict:
    maps: Maps = {}
    config = load_preset("demo-cpu", [f"seed={seed}", f"output_dir='{out}'", "sample.every_n_steps=0",
                                      "validation.timesteps=10", "save.every_n_steps=25", *overrides])  # fmt: skip
    with errors_recorded(maps):
        run = RunFolder(run_training(config).run_dir)
    losses = region_losses(maps)
    lowest = {r: min(losses, key=lambda s, r=r: losses[s][r]) for r in REGIONS}
    concept = {}
    for path in run.checkpoint_files():
        step = int(path.stem[-6:])
        if step % 50 == 0 or step in lowest.values():
            concept[step] = lora_report(pipeline, path, [1.0], demo_data.eval_cases(), 20, 5.0)["1"]["concept"]
            print(f"{name}: step {step} concept {concept[step]:.0%} loss {losses[step]}", flush=True)
    final = max(losses)
    return {"variant": name, "overrides": overrides, "final_step": final, "lowest_loss_step": lowest,
            "concept": concept, "met": {r: concept[s] >= concept[final] for r, s in lowest.items()},
            "losses": losses}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run these variants (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pipeline = scoring_pipeline()
    runs = []
    for name in args.only or VARIANTS:
        with tempfile.TemporaryDirectory() as out:
            runs.append(one_variant(name, VARIANTS[name], args.seed, pipeline, Path(out)))
    publish({"seed": args.seed, "regions": list(REGIONS), "runs": runs}, args.json)


if __name__ == "__main__":
    main()
