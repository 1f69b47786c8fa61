"""Do the compiled paths train the weights eager training does? Issue 17's device check of torch_compile.

    python bench/compile_equality.py [--steps 6] [--precisions no bf16] [--modes default reduce-overhead]
                                     [--json bench/results/compile_equality_gpu.json]

Trains the bundled demo model on the demo dataset (the demo-cpu preset, batch 8 at 64 px, no warm-up, no samples,
no validation) for --steps optimizer steps on the GPU when there is one, and compares each run with an eager run:
the gradients the optimizer is handed at every step (relative error of their global norm), the losses the run
logged (kept on the device and read in batches on a GPU, where a CUDA-graph replay must not overwrite them), and
the final LoRA weights. Gradients and losses are the judge: AdamW's normalised update turns gradient rounding of
the order of its eps into weight differences of up to the learning rate, so the weights only show that the runs
stayed close, while a wrong graph (a replay that overwrote a gradient, a stale input) changes the gradients.

- `eager again`: a second eager run, the floor (cuDNN and atomics may make even eager runs differ on a GPU);
- `compiled <mode>` for each of --modes: `torch_compile = true` with that `compile_mode`;
- `accumulating, reduce-overhead`: 2 micro-batches per step, eager against CUDA graphs. The config refuses this
  combination today ("cannot accumulate gradients yet"): this check is what would lift that guard, so here, and
  only here, the refusal is set aside.

A case passes when every step's gradient and logged-loss error is at most GRADIENT_TOLERANCE for its precision, or
10x the eager floor. On the CPU (`--modes` may be left empty for a quick run) reduce-overhead records no graphs;
the GPU is where it matters.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from report import publish  # noqa: E402

from lora_studio.config import TrainConfig, load_preset  # noqa: E402
from lora_studio.runs import RunFolder  # noqa: E402
from lora_studio.train import run_training  # noqa: E402

# Largest relative error of a step's gradient (global norm) against eager: fp32 rounding, or bf16's 8-bit mantissa.
GRADIENT_TOLERANCE = {"no": 1e-3, "bf16": 5e-2, "fp16": 2e-2}
ACCUMULATION_GUARD = "cannot accumulate gradients yet"


@contextmanager
def accumulation_guard_lifted() -> Iterator[None]:
    """TrainConfig without its refusal of CUDA graphs with gradient accumulation, for the check that decides it."""
    refusing = TrainConfig.combination_problems

    def problems(self: TrainConfig) -> list[str]:
        return [p for p in refusing(self) if ACCUMULATION_GUARD not in p]

    TrainConfig.combination_problems = problems
    try:
        yield
    finally:
        TrainConfig.combination_problems = refusing


@dataclass
class Run:
    weights: dict[str, torch.Tensor]  # the LoRA file's tensors
    gradients: list[torch.Tensor]  # per optimizer step, every trained parameter's gradient, flattened, on the CPU
    losses: list[float]  # per step, as metrics.jsonl logged them (read from the device in batches on a GPU)
    seconds: float  # a compiled run's include its compile


@contextmanager
def gradients_recorded(into: list[torch.Tensor]) -> Iterator[None]:
    """Keep what every optimizer step is handed (after accumulation and clipping), via torch's global step hook."""

    def record(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        into.append(torch.cat([g.detach().float().flatten() for g in grads]).cpu())

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield
    finally:
        handle.remove()


def trained(out: Path, steps: int, precision: str, overrides: list[str]) -> Run:
    """One training run on the demo."""
    config = load_preset("demo-cpu", [
        f"output_dir='{out}'", "seed=0", f"mixed_precision='{precision}'", "sample.every_n_steps=0",
        "validation.path=''", f"optimizer.max_train_steps={steps}", "optimizer.lr_warmup_steps=0",
        "save.every_n_steps=0", *overrides,
    ])  # fmt: skip
    gradients: list[torch.Tensor] = []
    start = time.perf_counter()
    with gradients_recorded(gradients):
        done = run_training(config)
    seconds = time.perf_counter() - start
    losses = [row["loss"] for row in RunFolder(done.run_dir).read_metrics() if "loss" in row]
    return Run(load_file(str(done.lora_path)), gradients, losses, seconds)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"the runs wrote different tensors: {sorted(a.keys() ^ b.keys())[:4]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def gradient_errors(reference: list[torch.Tensor], other: list[torch.Tensor]) -> list[float]:
    """Per step, |g - g_reference| / |g_reference| over all trained parameters at once."""
    if len(reference) != len(other) or any(r.shape != o.shape for r, o in zip(reference, other, strict=False)):
        raise ValueError("the runs took different numbers of steps or trained different parameters")
    return [((o - r).norm() / r.norm()).item() for r, o in zip(reference, other, strict=True)]


def cases(modes: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """(name, the eager run's overrides, the compared run's overrides)."""
    out = [("eager again", [], [])]
    out += [(f"compiled {m}", [], ["torch_compile=true", f"compile_mode='{m}'"]) for m in modes]
    if "reduce-overhead" in modes:
        accumulating = ["optimizer.gradient_accumulation_steps=2"]
        out.append(("accumulating, reduce-overhead", accumulating,
                    [*accumulating, "torch_compile=true", "compile_mode='reduce-overhead'"]))  # fmt: skip
    return out


def loss_errors(reference: list[float], other: list[float]) -> list[float]:
    """Per step, the logged losses' relative difference: a compiled run whose losses, kept on the device until
    read, were overwritten by a later CUDA-graph replay would log another step's numbers."""
    if len(reference) != len(other):
        raise ValueError(f"the runs logged {len(reference)} and {len(other)} steps")
    return [abs(o - r) / abs(r) for r, o in zip(reference, other, strict=True)]


def compared(name: str, precision: str, eager: Run, run: Run, floor: float) -> dict:
    errors = gradient_errors(eager.gradients, run.gradients)
    logged = loss_errors(eager.losses, run.losses)
    limit = max(GRADIENT_TOLERANCE[precision], 10 * floor)
    return {"case": name, "precision": precision, "gradient_errors": [f"{e:.2e}" for e in errors],
            "loss_errors": [f"{e:.2e}" for e in logged], "largest_gradient_error": max(errors), "limit": limit,
            "within": max(errors) <= limit and max(logged) <= limit,
            "largest_weight_difference": largest_difference(eager.weights, run.weights),
            "seconds": round(run.seconds, 1)}  # fmt: skip


def check(steps: int, precisions: list[str], modes: list[str], folder: Path,
          progress: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:  # fmt: skip
    """Every case in every precision; `progress` sees the rows after each, so a cut-off device call keeps them. A
    case that fails (a CUDA-graph error, say) is a row with its error, and the others still run."""
    rows: list[dict] = []
    for precision in precisions:
        eager_runs: dict[tuple[str, ...], Run] = {}
        floor = 0.0
        for name, eager_overrides, overrides in cases(modes):
            key = tuple(eager_overrides)
            try:
                if key not in eager_runs:
                    eager_runs[key] = trained(folder / f"{precision}-eager-{len(eager_runs)}", steps, precision,
                                              eager_overrides)  # fmt: skip
                with accumulation_guard_lifted():
                    run = trained(folder / f"{precision}-{len(rows)}", steps, precision, overrides)
                rows.append(compared(name, precision, eager_runs[key], run, floor))
            except Exception as error:  # noqa: BLE001 - one failed case must not lose the others' figures
                rows.append({"case": name, "precision": precision, "error": repr(error)[:500], "within": False})
            if name == "eager again" and "error" not in rows[-1]:
                floor = rows[-1]["largest_gradient_error"]
            print(rows[-1], flush=True)
            progress(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precisions", nargs="+", default=None, help="default: no and bf16 on a GPU, no on the CPU")
    parser.add_argument("--modes", nargs="*", default=["default", "reduce-overhead"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    precisions = args.precisions or (["no", "bf16"] if gpu else ["no"])
    device = torch.cuda.get_device_name() if gpu else "cpu"

    def report(rows: list[dict], echo: bool = False) -> None:
        publish({"device": device, "torch": torch.__version__, "steps": args.steps, "cases": rows,
                 "all_within": all(r["within"] for r in rows)}, args.json, echo=echo)  # fmt: skip

    with tempfile.TemporaryDirectory() as folder:
        report(check(args.steps, precisions, args.modes, Path(folder), report), echo=True)


if __name__ == "__main__":
    main()
