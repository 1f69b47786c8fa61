"""Measure the demo model's generations with plain image statistics (no learned model).

    python bench/demo_quality.py                               # base model: colour, shape, concept rates
    python bench/demo_quality.py --lora runs/x/x.safetensors   # + concept rate at strengths 0, 0.5, 1
    python bench/demo_quality.py --json bench/results/demo_quality.json

Cases: every colour x shape of the demo world with rotating backgrounds, `--seeds` seeds each
(8 x 4 x 2 = 64 by default). Colour: the palette colour nearest the mean colour of the shape mask.
Shape: the template (circle, square, triangle, star) that best overlaps the shape's silhouette.
Concept: the zkz outline detector (the share of the silhouette that is background), overall and per
prompted shape (`concept_by_shape` in the JSON).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/report.py, when imported by tests
from report import publish  # noqa: E402

from lora_studio import demo_data  # noqa: E402
from lora_studio.models import load_base  # noqa: E402


def scoring_pipeline(model: str = "demo", device: str = "cpu"):
    """The base model's pipeline in fp32, quiet: what every bench scores generations with."""
    pipeline = load_base(model, dtype=torch.float32, device=device).pipeline
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def base_report(pipeline, cases, steps: int, guidance: float, triggers: tuple[bool, ...] = (False, True)) -> dict:
    """The base model's rates without (`base`) and with (`base_with_trigger`) the trigger word, as asked."""
    seeds = [c.seed for c in cases]
    report = {}
    for label, trigger in (("base", False), ("base_with_trigger", True)):
        if trigger not in triggers:
            continue
        images = demo_data.generate(pipeline, [c.prompt(trigger) for c in cases], seeds, steps, guidance)
        report[label] = demo_data.score_images(cases, images).as_dict()
    concept = [demo_data.analyse(demo_data.render(s)).concept for s in demo_data.concept_scenes()]
    report["dataset_concept"] = sum(concept) / len(concept)
    return report


def lora_report(
    pipeline, lora: Path, strengths: list[float], cases, steps: int, guidance: float, no_trigger: tuple = ()
) -> dict:
    """Concept, colour and shape rates with the trigger word at each adapter strength, and without it
    (`"<strength> no trigger"`) at the strengths in `no_trigger`: how specific to its trigger the concept is."""
    pipeline.load_lora_weights(str(lora), adapter_name="demo")
    seeds = [c.seed for c in cases]
    report = {}
    for strength in strengths:
        pipeline.set_adapters(["demo"], adapter_weights=[strength])
        for trigger in (True, False) if strength in no_trigger else (True,):
            images = demo_data.generate(pipeline, [c.prompt(trigger) for c in cases], seeds, steps, guidance)
            label = f"{strength:g}" + ("" if trigger else " no trigger")
            report[label] = demo_data.score_images(cases, images).as_dict()
    pipeline.unload_lora_weights()
    return report


def print_table(report: dict) -> None:
    print(f"{'setting':28} {'cases':>5} {'colour':>7} {'shape':>7} {'concept':>8}")
    rows = [(k, report[k]) for k in ("base", "base_with_trigger")]
    rows += [(f"lora strength {k}", v) for k, v in report.get("lora", {}).items()]  # "1 no trigger": without it
    for name, r in rows:
        print(f"{name:28} {r['cases']:>5} {r['color']:>7.0%} {r['shape']:>7.0%} {r['concept']:>8.0%}")
    print(f"{'demo dataset images':28} {'':>5} {'':>7} {'':>7} {report['dataset_concept']:>8.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="base model (default: the bundled demo model)")
    parser.add_argument("--lora", type=Path, help="a LoRA file to score at --strengths")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--no-trigger", type=float, nargs="*", default=[1.0],
                        help="strengths also scored without the trigger word (trigger specificity)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per colour x shape prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    pipeline = scoring_pipeline(args.model)
    cases = demo_data.eval_cases(args.seeds)
    report = base_report(pipeline, cases, args.steps, args.guidance)
    if args.lora:
        report["lora"] = lora_report(pipeline, args.lora, args.strengths, cases, args.steps, args.guidance,
                                     tuple(args.no_trigger))
    report["settings"] = {
        "model": args.model,
        "steps": args.steps,
        "guidance": args.guidance,
        "seconds": round(time.time() - start, 1),
    }
    print_table(report)
    publish(report, args.json, echo=False)


if __name__ == "__main__":
    main()
