"""GPU training-step speed: our trainer beside the project's reference step, SD1.5 at 512 and SDXL at 1024.

    python bench/gpu_step.py --reference ../shared/bench/reference_step.py [--json bench/results/train_step_gpu.json]
    python bench/gpu_step.py --reference ../shared/bench/reference_step.py --smoke   # tiny models, on the CPU

Both sides use randomly initialised weights, which cost exactly the compute of real ones. The
reference (`reference_step.run_case`) steps a bare bf16 UNet with fp32 LoRA (rank 16 on attention),
autocast, fused AdamW and SDPA, on random latents ("ref" cases) or encoding random pixels and token
ids with a VAE and CLIP every step ("nocache" cases, the diffusers example's recipe). Ours is the real
trainer: a random-init pipeline is written as a diffusers folder from the bundled configs, a dataset of
generated images is cached, and `training_step` runs with the same rank, targets, batch and precision,
plus what a user's run does and the reference does not (per-sample seeded noise, grad-norm clipping
at 1.0, the loss read back every step). Each case is run --runs times (SDXL --sdxl-runs, compiled cases
once), alternating reference and ours, and reports the median ms/step of its timed steps; the ratios
compare medians of the same machine and process. Peak memory of ours includes the VAE and text
encoders, which stay on the GPU for samples.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402
from stepping import time_training_steps  # noqa: E402

from lora_studio.config import TrainConfig  # noqa: E402
from lora_studio.paths import sd_config_dir  # noqa: E402
from lora_studio.train import prepare  # noqa: E402


def load_reference(path: Path):
    """reference_step.py as a module; it reads --smoke from sys.argv when imported."""
    spec = importlib.util.spec_from_file_location("reference_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_pipeline(family: str, device: str, dtype: torch.dtype):
    """A full-size pipeline of `family` from the bundled configs, random weights, built on `device`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = sd_config_dir(family)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 2.6 G parameters on the CPU alone takes minutes
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        te2 = None
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
    parts = dict(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder=te.to(dtype),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
    if family == "sdxl":
        parts |= dict(
            text_encoder_2=te2.to(dtype), tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        )
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def smoke_pipeline(family: str):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_pipeline

    return tiny_pipeline(family)


def make_images(folder: Path, count: int, size: int) -> Path:
    """Smooth random colour fields (PNG noise at 1024 px would make the cache step slow for nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a random test image, number {i}")
    return folder


def our_config(folder: Path, base: Path, data: Path, res: int, batch: int, compile: bool, precision: str):
    return TrainConfig(
        name="gpubench",
        base_model=str(base),
        output_dir=str(folder / "runs"),
        mixed_precision=precision,
        torch_compile=compile,
        dataset={
            "path": str(data),
            "resolution": res,
            "min_bucket_reso": res,
            "max_bucket_reso": res,
            "batch_size": batch,
            "enable_bucket": False,
            "cache_dir": str(folder / "cache"),
            "cache_text_embeddings": True,
        },
        lora={"rank": 16, "alpha": 16.0, "unet_targets": "attn", "train_text_encoder": False},
        optimizer={"max_train_steps": 100_000, "min_snr_gamma": None, "lr_scheduler": "constant"},
        sample={"every_n_steps": 0},
        save={"every_n_epochs": 0, "save_state": False},
    )


def ours_case(name: str, config: TrainConfig, steps: int) -> dict:
    prepared_at = time.perf_counter()
    session = prepare(config)
    prepare_s = time.perf_counter() - prepared_at
    batch = config.dataset.batch_size
    warmup_s, times = time_training_steps(session, steps, warmup_steps=3 if config.torch_compile else 2)
    ms = statistics.median(times) * 1000
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    lora_params = sum(p.numel() for g in session.optimizer.param_groups for p in g["params"])
    result = dict(
        case=name,
        res=config.dataset.resolution,
        bs=batch,
        compile=config.torch_compile,
        ms_per_step=round(ms, 1),
        img_s=round(batch * 1000 / ms, 2),
        peak_gib=peak and round(peak, 2),
        prepare_s=round(prepare_s, 1),
        warmup_s=round(warmup_s, 1),
        lora_params=lora_params,
    )
    print(json.dumps(result), flush=True)
    del session
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def plans(smoke: bool, runs: int, sdxl_runs: int) -> list[dict]:
    """What to run, in order: per family, the reference cases and ours, each `runs` times.

    The compiled cases come last and once: a compile costs a minute of the device's short lease, and
    a cut-off run should lose them rather than SDXL."""
    if smoke:
        return [
            dict(
                family="sd1",
                res=64,
                runs=runs,
                ref=[("tiny", "TINY", 64, 2, {"dtype": torch.float32})],
                ours=[("ours_tiny_bs2", 2, False)],
            ),
            dict(family="sdxl", res=64, runs=sdxl_runs, ref=[], ours=[("ours_tiny_sdxl_bs2", 2, False)]),
        ]
    return [
        dict(
            family="sd1",
            res=512,
            runs=runs,
            ref=[
                ("sd15_ref_bs1", "SD15", 512, 1, {}),
                ("sd15_ref_bs4", "SD15", 512, 4, {}),
                ("sd15_nocache_bs1", "SD15", 512, 1, {"encode": True}),
                ("sd15_nocache_bs4", "SD15", 512, 4, {"encode": True}),
            ],
            ours=[("ours_sd15_bs1", 1, False), ("ours_sd15_bs4", 4, False)],
        ),
        dict(
            family="sdxl",
            res=1024,
            runs=sdxl_runs,
            ref=[("sdxl_ref_bs1", "SDXL", 1024, 1, {}), ("sdxl_ref_bs4", "SDXL", 1024, 4, {})],
            ours=[("ours_sdxl_bs1", 1, False), ("ours_sdxl_bs4", 4, False)],
        ),
        dict(
            family="sd1",
            res=512,
            runs=1,
            ref=[("sd15_compile_bs4", "SD15", 512, 4, {"compile_": True})],
            ours=[("ours_sd15_compile_bs4", 4, True)],
        ),
    ]


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """ours' speed over the reference's (ms_ref / ms_ours): above 1 means ours is faster."""
    pairs = {
        "ours_sd15_bs1 vs sd15_ref_bs1": ("ours_sd15_bs1", "sd15_ref_bs1"),
        "ours_sd15_bs4 vs sd15_ref_bs4": ("ours_sd15_bs4", "sd15_ref_bs4"),
        "ours_sd15_bs1 vs sd15_nocache_bs1": ("ours_sd15_bs1", "sd15_nocache_bs1"),
        "ours_sd15_bs4 vs sd15_nocache_bs4": ("ours_sd15_bs4", "sd15_nocache_bs4"),
        "ours_sd15_compile_bs4 vs sd15_ref_bs4": ("ours_sd15_compile_bs4", "sd15_ref_bs4"),
        "ours_sd15_compile_bs4 vs sd15_compile_bs4": ("ours_sd15_compile_bs4", "sd15_compile_bs4"),
        "ours_sdxl_bs1 vs sdxl_ref_bs1": ("ours_sdxl_bs1", "sdxl_ref_bs1"),
        "ours_sdxl_bs4 vs sdxl_ref_bs4": ("ours_sdxl_bs4", "sdxl_ref_bs4"),
    }
    return {k: round(medians[r] / medians[o], 2) for k, (o, r) in pairs.items() if o in medians and r in medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="the project's reference_step.py")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script runs")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--sdxl-runs", type=int, default=1, help="SDXL cases load 7 GB each time")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--families", default="sd1,sdxl")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reference = load_reference(args.reference)
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the reference sets them
        torch.backends.cudnn.allow_tf32 = True
    folder = Path(tempfile.mkdtemp(prefix="gpubench-"))
    runs: dict[str, list[dict]] = {}
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "runs": args.runs,
        "timed_steps_per_run": args.steps,
    }

    def record(result: dict) -> None:
        runs.setdefault(result["case"], []).append(result)
        medians = {k: round(statistics.median(r["ms_per_step"] for r in v), 1) for k, v in runs.items()}
        report["ms_per_step_median"] = medians
        report["ratios_ref_ms_over_ours_ms"] = ratios(medians)
        report["runs_detail"] = runs
        publish(report, args.json, echo=False)  # after every case, so a cut-off run still leaves figures

    bases: dict[str, tuple[Path, Path]] = {}

    def base_and_data(family: str, res: int) -> tuple[Path, Path]:
        """A random-init pipeline folder and a dataset per family, made once."""
        if family not in bases:
            built = time.perf_counter()
            pipeline = smoke_pipeline(family) if args.smoke else random_pipeline(family, device, dtype)
            pipeline.save_pretrained(folder / f"base-{family}", safe_serialization=True)
            del pipeline
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"{family}: random pipeline written in {time.perf_counter() - built:.1f} s", flush=True)
            bases[family] = (folder / f"base-{family}", make_images(folder / f"data-{family}", 8, res))
        return bases[family]

    precision = "no" if args.smoke else "bf16"
    for plan in plans(args.smoke, args.runs, args.sdxl_runs):
        if plan["family"] not in args.families.split(","):
            continue
        base, data = base_and_data(plan["family"], plan["res"])
        for run in range(plan["runs"]):  # alternating, so a drift in clocks or load hits both sides
            for name, cfg, res, bs, kw in plan["ref"]:
                try:
                    record(reference.run_case(name, getattr(reference, cfg), res, bs, steps=args.steps, **kw))
                except Exception as error:  # noqa: BLE001 - one failed case must not lose the others
                    print(json.dumps(dict(case=name, error=repr(error)[:300])), flush=True)
            for name, bs, compile in plan["ours"]:
                config = our_config(folder / f"{name}-{run}", base, data, plan["res"], bs, compile, precision)
                try:
                    record(ours_case(name, config, args.steps))
                except Exception as error:  # noqa: BLE001
                    print(json.dumps(dict(case=name, error=repr(error)[:300])), flush=True)
    publish(report, args.json)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
