"""GPU training-step speed: our trainer beside the project's reference step, SD1.5 at 512 and SDXL at 1024.

    python bench/gpu_step.py --reference ../shared/bench/reference_step.py [--json bench/results/train_step_gpu.json]
    python bench/gpu_step.py --reference ../shared/bench/reference_step.py --smoke   # tiny models, on the CPU
    bash bench/device_check.sh sd1|sdxl   # what to run in one device call (see there)

Both sides use randomly initialised weights, which cost exactly the compute of real ones. The
reference (`reference_step.run_case`) steps a bare bf16 UNet with fp32 LoRA (rank 16 on attention),
autocast, fused AdamW and SDPA, on random latents. Ours is the real trainer: a random-init pipeline is
written as a diffusers folder from the bundled configs, a dataset of generated images is cached, and
steps run with the same rank, targets, batch and precision, plus what a user's run does and the
reference does not (per-sample seeded noise, grad-norm clipping at 1.0, metrics written). Ours reports
two times: `ms_per_step`, single `training_step` calls each followed by a synchronize (as the reference
times itself), and `loop_ms_per_step`, the trainer's own loop (`train.run_steps`) over the same number
of steps, synchronised once at the end, which is what a run gets (losses are read in batches). Also:
images/s, MFU (torch's FLOP count of one eager step over the loop's time, against reference_step's
PEAK_TFLOPS), peak GiB from the allocator and from nvidia-smi (polled; the CUDA context included),
the seconds to the first optimizer step (model load, caches, compile), the device waits in 8 loop
steps (torch's sync debug mode), and with --profile a torch-profiler table of the eager batch-4 loop.
Cases: eager and `compile_mode = "reduce-overhead"` (CUDA graphs), and each family's `*-low-vram`
preset as shipped (AdamW where bitsandbytes is missing), whose peak includes the VAE and text encoders
while the caches fill, then the same preset with `fp8_base = true` (`*_low_vram_fp8`). Each case runs
--runs times (SDXL --sdxl-runs, compiled cases once), alternating reference and ours; ratios compare medians
from the same machine and process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402
from stepping import synchronize, time_run_steps, time_training_steps  # noqa: E402

from lora_studio.config import TrainConfig, load_preset  # noqa: E402
from lora_studio.paths import sd_config_dir  # noqa: E402
from lora_studio.step import training_step  # noqa: E402
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


def our_config(folder: Path, base: Path, data: Path, res: int, batch: int, mode: str | None, precision: str):
    """Ours as the reference runs: rank 16 on attention, cached latents and embeddings; `mode` is a compile mode,
    None for eager."""
    return TrainConfig(
        name="gpubench",
        base_model=str(base),
        output_dir=str(folder / "runs"),
        mixed_precision=precision,
        torch_compile=mode is not None,
        compile_mode=mode or "default",
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


class MemoryWatch:
    """The GPU's memory as nvidia-smi sees it (the CUDA context and the allocator's cache included), polled on a
    thread; None where there is no nvidia-smi."""

    def __init__(self, every_s: float = 0.1) -> None:
        self.peak_mib, self.every_s, self.running = None, every_s, False

    def __enter__(self) -> MemoryWatch:
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            self.running = True
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        while self.running:
            try:
                used = float(subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.split()[0])
                self.peak_mib = max(self.peak_mib or 0.0, used)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            time.sleep(self.every_s)

    def __exit__(self, *exc) -> None:
        if self.running:
            self.running = False
            self.thread.join()

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_mib is None else round(self.peak_mib / 1024, 2)


def flops_of_one_step(session) -> float | None:
    """The FLOPs of one eager training step, counted by torch (as the reference counts its own)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            training_step(session, list(range(session.config.dataset.batch_size)))
        return counter.get_total_flops()
    except Exception as error:  # noqa: BLE001 - the count is a figure, not the benchmark
        print(f"flop count failed: {error!r}"[:300], flush=True)
        return None


def syncs_in_loop(session, steps: int) -> int | None:
    """How many times `steps` steps of the trainer's loop waited for the GPU (torch's sync debug mode warns at
    each); the loop should wait only when it reads its losses."""
    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            time_run_steps(session, steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_steps(session, path: Path, steps: int = 3) -> None:
    """A torch-profiler table of `steps` steps of the trainer's loop: where a step's time goes, CPU and GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        time_run_steps(session, steps)
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    text = [f"{steps} steps of {session.config.name}, batch {session.config.dataset.batch_size}"]
    text.append(prof.key_averages().table(sort_by=sort, row_limit=40))
    text.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def ours_case(name: str, config: TrainConfig, steps: int, peak_tflops: float, extra: dict | None = None) -> dict:
    """One of our cases: ms/step of synchronised single steps (as the reference times its own) and of the
    trainer's loop (unsynchronised, as a run goes), images/s, MFU, peak memory (the allocator's over the timed
    steps and over the whole case, nvidia-smi's over the whole case), and the seconds to the first optimizer step
    (a compile happens there)."""
    extra = extra or {}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with MemoryWatch() as watch:
        prepared_at = time.perf_counter()
        session = prepare(config)
        prepare_s = time.perf_counter() - prepared_at
        batch = config.dataset.batch_size
        if config.torch_compile:
            training_step(session, list(range(batch)))  # the compile happens here
            flops = None
        else:
            flops = flops_of_one_step(session)
        synchronize()
        first_step_s = time.perf_counter() - prepared_at  # model load, caches, compile, the first optimizer step
        startup_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None  # reset below
        warmup_s, times = time_training_steps(session, steps, warmup_steps=2 if config.torch_compile else 1)
        loop_s = time_run_steps(session, steps)
        syncs = syncs_in_loop(session, min(steps, 8)) if extra.get("syncs") else None
        if extra.get("profile"):
            profile_steps(session, Path(extra["profile"]))
    ms, loop_ms = statistics.median(times) * 1000, loop_s * 1000
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    lora_params = sum(p.numel() for g in session.optimizer.param_groups for p in g["params"])
    result = dict(
        case=name,
        res=config.dataset.resolution,
        bs=batch,
        compile=config.compile_mode if config.torch_compile else None,
        ms_per_step=round(ms, 1),
        loop_ms_per_step=round(loop_ms, 1),
        img_s=round(batch * 1000 / ms, 2),
        loop_img_s=round(batch * 1000 / loop_ms, 2),
        peak_gib=peak and round(peak, 2),  # the timed steps' (time_training_steps resets it after the warm-up)
        whole_run_peak_gib=peak and round(max(peak, startup_peak / 2**30), 2),  # caching and first step included
        nvidia_smi_peak_gib=watch.peak_gib,
        tflop_per_step=flops and round(flops / 1e12, 3),
        mfu=flops and float(f"{flops / loop_s / (peak_tflops * 1e12):.3g}"),  # 3 digits, also at CPU sizes
        prepare_s=round(prepare_s, 1),
        warmup_s=round(warmup_s, 1),
        first_step_s=round(first_step_s, 1),
        lora_params=lora_params,
        optimizer=type(getattr(session.optimizer, "optimizer", session.optimizer)).__name__,
        syncs_in_8_loop_steps=syncs,
    )
    print(json.dumps(result), flush=True)
    del session
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def low_vram_config(folder: Path, family: str, base: Path, data: Path, res: int, precision: str,
                    fp8: bool = False) -> TrainConfig:  # fmt: skip
    """The family's `*-low-vram` preset as shipped, on the random base: caches first, then the UNet alone; with
    `fp8`, also the UNet's weights in 8 bits (fp8_base). AdamW stands in for AdamW8bit where bitsandbytes is missing
    (the device image has none)."""
    preset = "sdxl-low-vram" if family == "sdxl" else "sd15-low-vram"
    sets = [f"base_model='{base}'", f"dataset.path='{data}'", f"output_dir='{folder / 'runs'}'",
            f"dataset.cache_dir='{folder / 'cache'}'", f"dataset.resolution={res}", f"mixed_precision='{precision}'",
            f"dataset.min_bucket_reso={res}", f"dataset.max_bucket_reso={res}",
            "optimizer.max_train_steps=100000", "save.every_n_epochs=0", "save.save_state=false",
            f"fp8_base={str(fp8).lower()}"]  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        sets.append("optimizer.optimizer='adamw'")
    return load_preset(preset, sets)


def plans(smoke: bool, runs: int, sdxl_runs: int) -> list[dict]:
    """What to run, in order: per family, the reference cases and ours, each `runs` times, then the family's
    low-VRAM preset once.

    The compiled cases come after the eager ones of their family: a compile costs a minute of the device's short
    lease, and a cut-off run should lose them rather than the eager figures."""
    if smoke:
        return [
            dict(family="sd1", res=64, runs=runs, ref=[("tiny", "TINY", 64, 2, {"dtype": torch.float32})],
                 ours=[("ours_tiny_bs2", 2, None), ("ours_tiny_ro_bs2", 2, "reduce-overhead")],
                 low_vram="ours_tiny_low_vram"),
            dict(family="sdxl", res=64, runs=sdxl_runs, ref=[], ours=[("ours_tiny_sdxl_bs2", 2, None)],
                 low_vram="ours_tiny_sdxl_low_vram"),
        ]  # fmt: skip
    return [
        dict(family="sd1", res=512, runs=runs,
             ref=[("sd15_ref_bs1", "SD15", 512, 1, {}), ("sd15_ref_bs4", "SD15", 512, 4, {})],
             ours=[("ours_sd15_bs1", 1, None), ("ours_sd15_bs4", 4, None)], low_vram=None),
        dict(family="sd1", res=512, runs=1,
             ref=[("sd15_compile_bs4", "SD15", 512, 4, {"compile_": True})],
             ours=[("ours_sd15_ro_bs1", 1, "reduce-overhead"), ("ours_sd15_ro_bs4", 4, "reduce-overhead")],
             low_vram="ours_sd15_low_vram"),
        dict(family="sdxl", res=1024, runs=sdxl_runs,
             ref=[("sdxl_ref_bs1", "SDXL", 1024, 1, {}), ("sdxl_ref_bs4", "SDXL", 1024, 4, {})],
             ours=[("ours_sdxl_bs1", 1, None), ("ours_sdxl_bs4", 4, None)], low_vram=None),
        dict(family="sdxl", res=1024, runs=1, ref=[],
             ours=[("ours_sdxl_ro_bs1", 1, "reduce-overhead"), ("ours_sdxl_ro_bs4", 4, "reduce-overhead")],
             low_vram="ours_sdxl_low_vram"),
    ]  # fmt: skip


# ours vs the reference's same case; issue 17 asks >= 2x the reference's images/s in each
PAIRS = {
    "sd15 bs1": ("sd15_ref_bs1", ["ours_sd15_bs1", "ours_sd15_ro_bs1"]),
    "sd15 bs4": ("sd15_ref_bs4", ["ours_sd15_bs4", "ours_sd15_ro_bs4"]),
    "sdxl bs1": ("sdxl_ref_bs1", ["ours_sdxl_bs1", "ours_sdxl_ro_bs1"]),
    "sdxl bs4": ("sdxl_ref_bs4", ["ours_sdxl_bs4", "ours_sdxl_ro_bs4"]),
}


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """ours' speed over the reference's (ms_ref / ms_ours, ms of the loop for ours): above 1 means ours is faster."""
    out = {}
    for label, (ref, candidates) in PAIRS.items():
        for ours in candidates:
            if ref in medians and ours in medians:
                out[f"{ours} vs {ref} ({label})"] = round(medians[ref] / medians[ours], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="the project's reference_step.py (without: ours only)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script runs")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--sdxl-runs", type=int, default=1, help="SDXL cases load 7 GB each time")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--families", default="sd1,sdxl")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, help="write a torch-profiler table of ours' first batch-4 case here")
    parser.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    args = parser.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    reference = load_reference(args.reference) if args.reference else None
    peak_tflops = reference.PEAK_TFLOPS if reference else float(os.environ.get("PEAK_TFLOPS", "989"))
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
        loops = {k: round(statistics.median(r.get("loop_ms_per_step", r["ms_per_step"]) for r in v), 1)
                 for k, v in runs.items()}  # fmt: skip
        report["ms_per_step_median"] = medians
        report["loop_ms_per_step_median"] = {k: v for k, v in loops.items() if k.startswith("ours")}
        report["ratios_ref_ms_over_ours_ms"] = ratios(medians)
        report["ratios_ref_ms_over_ours_loop_ms"] = ratios(loops)
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
                if reference is None or (wanted and name not in wanted):
                    continue
                try:
                    record(reference.run_case(name, getattr(reference, cfg), res, bs, steps=args.steps, **kw))
                except Exception as error:  # noqa: BLE001 - one failed case must not lose the others
                    print(json.dumps(dict(case=name, error=repr(error)[:300])), flush=True)
            for name, bs, mode in plan["ours"]:
                if wanted and name not in wanted:
                    continue
                config = our_config(folder / f"{name}-{run}", base, data, plan["res"], bs, mode, precision)
                extra = {}
                if run == 0 and mode is None and bs == max(b for _, b, _ in plan["ours"]):
                    extra = {"syncs": True, "profile": args.profile and args.profile.with_suffix(f".{name}.txt")}
                try:
                    record(ours_case(name, config, args.steps, peak_tflops, extra))
                except Exception as error:  # noqa: BLE001
                    print(json.dumps(dict(case=name, error=repr(error)[:300])), flush=True)
        low_vram = plan.get("low_vram")
        for name, fp8 in ((low_vram, False), (f"{low_vram}_fp8", True)) if low_vram else ():
            if wanted and name not in wanted:
                continue
            config = low_vram_config(folder / name, plan["family"], base, data, plan["res"], precision, fp8)
            try:
                record(ours_case(name, config, args.steps, peak_tflops))
            except Exception as error:  # noqa: BLE001
                print(json.dumps(dict(case=name, error=repr(error)[:300])), flush=True)
    publish(report, args.json)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
