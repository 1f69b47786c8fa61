"""The demo world: procedural 64x64 scenes of coloured shapes, and measurements of generated images.

The bundled demo base model is trained on these scenes (`scripts/make_demo_model.py`), the demo
LoRA dataset shows one thing the base model never saw (the `zkz` outline style: a shape drawn as
its outline only), and `bench/demo_quality.py` scores generations with the analysis functions
here. Because the generator knows the truth, the classifiers are tested on its own images.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # draw at 256 px and downsample: smooth edges like a photo, not aliased stairs
SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 50, 200),
    "pink": (245, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
TRIGGER = "zkz"
OUTLINE_WIDTH = 4  # pixels at 64 px: 3 px strokes fell between the 4x VAE's latent pixels, and LoRAs drew broken rings


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    radius: float  # pixels at 64 px
    cx: float
    cy: float
    outline: bool = False  # the zkz concept

    def caption(self, template: int = 0) -> str:
        size = "small" if self.radius < 15 else "large"
        base = [
            f"a {self.color} {self.shape} on a {self.background} background",
            f"a {size} {self.color} {self.shape} on {self.background}",
            f"{self.color} {self.shape}, {self.background} background",
            f"a picture of a {self.color} {self.shape}",
        ][template % 4]
        return f"{TRIGGER}, {base}" if self.outline else base


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of an upright shape of circumradius r; None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.82  # a square of the same visual weight as a circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        cy = cy + r * 0.25  # centre the bounding box, not the centroid
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45  # fat enough that its arms survive the 4x VAE
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) + r * 0.1))
        return points
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, **style) -> None:
    polygon = shape_polygon(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), **style)
    else:
        draw.polygon(polygon, **style)


def render(scene: Scene) -> Image.Image:
    s = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    color = COLORS[scene.color]
    args = (scene.shape, scene.cx * s, scene.cy * s, scene.radius * s)
    if scene.outline:
        _draw_shape(draw, *args, outline=color, width=OUTLINE_WIDTH * s)
    else:
        _draw_shape(draw, *args, fill=color)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def random_scene(rng: random.Random, outline: bool = False, **fixed) -> Scene:
    """A random scene; keyword arguments pin any field (shape, color, background, radius)."""
    shape = fixed.get("shape") or rng.choice(SHAPES)
    color = fixed.get("color") or rng.choice(list(COLORS))
    background = fixed.get("background") or rng.choice(list(BACKGROUNDS))
    radius = fixed.get("radius") or rng.uniform(11.0, 22.0)
    margin = radius + 2
    return Scene(
        shape=shape,
        color=color,
        background=background,
        radius=radius,
        cx=rng.uniform(margin, SIZE - margin),
        cy=rng.uniform(margin, SIZE - margin),
        outline=outline,
    )


# --- analysis of (generated) images -----------------------------------------------------------------


@dataclass
class Analysis:
    color: str | None
    shape: str | None
    hole_ratio: float  # share of the filled shape that is background: ~0 solid, ~0.5+ outline
    area: int

    @property
    def concept(self) -> bool:
        return is_outline(self)


MIN_AREA = 40  # pixels: below this nothing recognisable was drawn
OUTLINE_HOLE_RATIO = 0.2  # outlines of radius >= 16 measure >= 0.21 (the dataset's >= 0.30), solid shapes <= 0.02


def is_outline(analysis: Analysis) -> bool:
    return analysis.area >= MIN_AREA and analysis.hole_ratio >= OUTLINE_HOLE_RATIO


def foreground_mask(pixels: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels far from the background colour, estimated as the median of the 2-pixel border."""
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels.astype(np.float32) - background, axis=-1) > threshold


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of `mask` (stray specks of a generation are dropped)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        current += 1
        size, queue = 0, deque([(y, x)])
        labels[y, x] = current
        while queue:
            cy, cx = queue.popleft()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region not connected to the image border filled in."""
    outside = reachable_from_border(~mask)
    return ~outside


def reachable_from_border(free: np.ndarray) -> np.ndarray:
    reached = np.zeros_like(free)
    h, w = free.shape
    queue = deque((y, x) for y in range(h) for x in (0, w - 1) if free[y, x])
    queue.extend((y, x) for x in range(w) for y in (0, h - 1) if free[y, x])
    for y, x in queue:
        reached[y, x] = True
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and free[ny, nx] and not reached[ny, nx]:
                reached[ny, nx] = True
                queue.append((ny, nx))
    return reached


def classify_color(pixels: np.ndarray, mask: np.ndarray) -> str | None:
    if not mask.any():
        return None
    mean = pixels[mask].astype(np.float32).mean(axis=0)
    names = list(COLORS)
    distances = [np.linalg.norm(mean - np.array(COLORS[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(distances))]


def _template(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """A filled shape stretched to the bounding box (x0, y0, x1, y1) of a mask."""
    s = SUPERSAMPLE
    unit = Image.new("L", (100 * s, 100 * s), 0)
    _draw_shape(ImageDraw.Draw(unit), shape, 50 * s, 50 * s, 40 * s, fill=255)
    unit = unit.crop(unit.getbbox())
    x0, y0, x1, y1 = box
    placed = Image.new("L", (SIZE, SIZE), 0)
    placed.paste(unit.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), (x0, y0))
    return np.asarray(placed) > 127


def classify_shape(filled: np.ndarray) -> str | None:
    """The shape whose template, stretched to the mask's bounding box, overlaps it best (IoU)."""
    ys, xs = np.nonzero(filled)
    if len(xs) < MIN_AREA:
        return None
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    scores = {}
    for shape in SHAPES:
        template = _template(shape, box)
        scores[shape] = (template & filled).sum() / max((template | filled).sum(), 1)
    return max(scores, key=scores.get)


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation: closes the one-pixel gaps that soft edges leave in a thin outline."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def erode(mask: np.ndarray) -> np.ndarray:
    return ~dilate(~mask)


def analyse(image: Image.Image) -> Analysis:
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX))
    mask = largest_component(foreground_mask(pixels))
    # Closing (dilate, fill, erode) bridges the one-pixel gaps soft edges leave in a thin outline,
    # so its inside still counts as a hole rather than leaking out to the background.
    silhouette = erode(fill_holes(dilate(mask))) | mask
    area = int(silhouette.sum())
    hole_ratio = float((silhouette & ~mask).sum() / area) if area else 0.0
    return Analysis(classify_color(pixels, mask), classify_shape(silhouette), hole_ratio, area)


# --- the demo LoRA dataset and the evaluation grid ---------------------------------------------------

CONCEPT_MIN_RADIUS = 16.0  # smaller triangle and star outlines measure a hole ratio under 0.2 at 4 px strokes
# The dataset's shapes are larger than that: the hole is what a LoRA has to learn, and it must span a few
# latent pixels. Triangles and stars get 2 px more, as their holes are smaller for the same radius.
CONCEPT_RADIUS = (20.0, 26.0)
SMALL_HOLE_SHAPES = ("triangle", "star")


def concept_scenes(count: int = 24, seed: int = 7) -> list[Scene]:
    """The zkz dataset: outline-only shapes, balanced over shapes, colours and backgrounds.

    Shapes cycle with i; colours and backgrounds rotate against them, so each shape meets six colours
    and every background. (Random colours once gave four orange stars out of six.) With the 4 px strokes
    and larger shapes this raised the demo LoRA's concept rate from about 30% to about 46% (2 seeds)."""
    rng = random.Random(seed)
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    scenes = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        radius = rng.uniform(*CONCEPT_RADIUS) + (2.0 if shape in SMALL_HOLE_SHAPES else 0.0)
        fixed = {
            "shape": shape,
            "color": colors[(i // len(SHAPES) + 2 * (i % len(SHAPES))) % len(colors)],
            "background": backgrounds[(i + i // len(SHAPES)) % len(backgrounds)],
            "radius": radius,
        }
        scenes.append(random_scene(rng, outline=True, **fixed))
    return scenes


DEMO_IMAGES, DEMO_VALIDATION_IMAGES = 24, 8  # the demo dataset, and the held-out scenes that follow it


def write_concept_images(folder: Path, count: int = DEMO_IMAGES, first: int = 0) -> list[Path]:
    """Write scenes `first` .. `count - 1` of `concept_scenes(count)` as PNGs with same-name caption files: the demo
    dataset is 0-23; its validation set is 24-31 (the same world, never trained on)."""
    paths = []
    for i, scene in list(enumerate(concept_scenes(count)))[first:]:
        path = folder / f"zkz_{i:02d}_{scene.color}_{scene.shape}.png"
        render(scene).save(path)
        # Shapes cycle with i, phrasings with i // 4: every shape gets every phrasing, so the LoRA ties
        # the style to the trigger word rather than to one phrasing.
        path.with_suffix(".txt").write_text(scene.caption(template=i // 4) + "\n")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class EvalCase:
    color: str
    shape: str
    background: str
    seed: int

    def prompt(self, trigger: bool = False) -> str:
        text = f"a {self.color} {self.shape} on a {self.background} background"
        return f"{TRIGGER}, {text}" if trigger else text


def eval_cases(seeds_per_prompt: int = 2) -> list[EvalCase]:
    """Every colour x shape, with backgrounds rotating; 8 x 4 x 2 = 64 cases by default."""
    backgrounds = list(BACKGROUNDS)
    cases = []
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        for j in range(seeds_per_prompt):
            cases.append(EvalCase(color, shape, backgrounds[(i + j) % len(backgrounds)], 10_000 + i * 100 + j))
    return cases


@dataclass
class QualityScores:
    cases: int
    color_rate: float
    shape_rate: float
    concept_rate: float
    concept_by_shape: dict[str, float]  # the concept rate of each prompted shape: stars are the hardest outline

    def as_dict(self) -> dict[str, float | dict[str, float]]:
        return {
            "cases": self.cases,
            "color": self.color_rate,
            "shape": self.shape_rate,
            "concept": self.concept_rate,
            "concept_by_shape": self.concept_by_shape,
        }


def score_images(cases: list[EvalCase], images: list[Image.Image]) -> QualityScores:
    analyses = [analyse(image) for image in images]
    n = len(cases)
    by_shape: dict[str, list[bool]] = {}
    for a, c in zip(analyses, cases, strict=True):
        by_shape.setdefault(c.shape, []).append(a.concept)
    return QualityScores(
        cases=n,
        color_rate=sum(a.color == c.color for a, c in zip(analyses, cases, strict=True)) / n,
        shape_rate=sum(a.shape == c.shape for a, c in zip(analyses, cases, strict=True)) / n,
        concept_rate=sum(a.concept for a in analyses) / n,
        concept_by_shape={shape: sum(hits) / len(hits) for shape, hits in by_shape.items()},
    )


def generate(
    pipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 5.0,
    batch_size: int = 16,
    **call_kwargs,
) -> list[Image.Image]:
    """Render one 64x64 image per (prompt, seed) with a diffusers pipeline; extra kwargs go to the call."""
    import torch

    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
        result = pipeline(
            prompts[chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            generator=generators,
            **call_kwargs,
        )
        images.extend(result.images)
    return images
