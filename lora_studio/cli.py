"""`lora-studio`: the app by default, plus commands that work without it.

Exit codes: 0 success, 1 a problem with the input (the message says what to do), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import SAVE_PRECISIONS
from .errors import LoraStudioError
from .logs import attach_app_log

EXIT_OK, EXIT_INPUT, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-studio", description="Train Stable Diffusion LoRAs locally.")
    sub = parser.add_subparsers(dest="command")

    app = sub.add_parser("app", help="open the web app (the default)")
    add_app_arguments(app)

    detect = sub.add_parser("detect", help="say which family a base model is, without loading its weights")
    detect.add_argument("source", help="'demo', a .safetensors checkpoint, a diffusers folder or a cached hub id")
    detect.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt files (weights only)")

    config = sub.add_parser("config", help="validate a config or preset and print it resolved")
    config.add_argument("config", help="a TOML file or a preset name (see `lora-studio presets`)")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    config.add_argument("--save", metavar="NAME", help="save it as your preset NAME (listed beside the bundled ones)")

    presets = sub.add_parser("presets", help="list the bundled presets and yours")
    presets.add_argument("--delete", metavar="NAME", help="delete your preset NAME")

    train = sub.add_parser("train", help="train a LoRA from a config or preset; --resume continues a run")
    train.add_argument("config", nargs="?", help="a TOML config or a preset name")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped or killed run")

    sub.add_parser("demo", help="train the demo-cpu preset on the bundled demo model and dataset")

    dataset = sub.add_parser("dataset", help="scan and validate a dataset folder; exit 1 if it has errors")
    dataset.add_argument("path", help="the images folder ('demo' for the bundled demo dataset)")
    dataset.add_argument("--config", help="a TOML config or preset whose dataset settings apply")
    dataset.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    checkpoints = sub.add_parser(
        "checkpoints", help="list a run's LoRA files with their validation loss; --best prints the best one's path"
    )
    checkpoints.add_argument("run", type=Path, help="the run folder, e.g. runs/my-lora-20260101-120000")
    checkpoints.add_argument("--best", action="store_true", help="print only the path of the lowest validation loss")
    checkpoints.add_argument("--json", action="store_true", help="print one JSON object")
    reg = sub.add_parser(
        "reg-images", help="render a config's regularization images with its base model (cached), before training"
    )
    reg.add_argument("config", help="a TOML config or a preset name")
    reg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    caption = sub.add_parser("caption", help="caption a dataset with a captioner on disk (BLIP, Florence-2, WD14)")
    caption.add_argument("path", type=Path, help="the dataset folder (plain or kohya's N_name/ layout)")
    caption.add_argument("--model", type=Path, required=True,
                         help="the captioner's folder, e.g. models/captioners/wd-v1-4-vit-tagger-v2")  # fmt: skip
    caption.add_argument("--mode", choices=("missing", "prepend", "append", "overwrite"), default="missing",
                         help="missing: caption only images without one (default)")  # fmt: skip
    caption.add_argument("--trigger", default="", help="put this word first in every caption")
    caption.add_argument("--threshold", type=float, default=0.35, help="a tagger's tag threshold (default 0.35)")
    caption.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    caption.add_argument("--preview", type=int, metavar="N", help="only print the first N captions, write nothing")
    add_lora_tool_parsers(sub)
    add_sample_parser(sub)
    return parser


def add_sample_parser(sub) -> None:
    sample = sub.add_parser(
        "sample",
        help="render with LoRAs at chosen strengths, or a grid",
        description="Example: lora-studio sample --base demo --lora run.safetensors:0.8 --prompt 'zkz, a red star' "
        "--grid strength=0,0.5,1 seed=1,2 --out grid.png",
    )
    sample.add_argument("--base", help="anything load_base takes (default: the base model the first --lora's run "
                        "trained on, else the demo model)")
    sample.add_argument("--vae", help="a VAE file or folder instead of the base model's own ('' for its own; "
                        "default: the first --lora's run's, unless --base is given)")
    sample.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="repeat to stack")
    sample.add_argument("--prompt", default="")
    # Each unset setting below comes from the first --lora's run (its samples' settings), else the default shown.
    sample.add_argument("--negative", dest="negative_prompt", help="negative prompt (default: none)")
    sample.add_argument("--seed", type=int, default=42)
    sample.add_argument("--steps", type=int, help="default: 20")
    sample.add_argument("--cfg", type=float, help="default: 7.0")
    sample.add_argument("--sampler", help="euler_a (default), euler, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, pndm")
    sample.add_argument("--width", type=int, help="default: the size the first --lora trained at (its metadata), "
                        "else the base model's native size")
    sample.add_argument("--height", type=int)
    sample.add_argument("--clip-skip", type=int, help="default: 1 (the last layer)")
    sample.add_argument("--batch-count", type=int, default=1, help="images with seeds seed, seed+1, ...")
    sample.add_argument(
        "--grid", nargs="+", metavar="AXIS=V1,V2", help="one or two axes (x then y): strength=..., seed=..., "
        "checkpoint=FILE1,FILE2 (strength varies the first --lora; strength:NAME=... names another)",
    )  # fmt: skip
    sample.add_argument("--out", type=Path, required=True, help="a .png path; batch images get -1, -2, ...")


def add_lora_tool_parsers(sub) -> None:
    inspect = sub.add_parser("inspect", help="show a LoRA file's family, format, rank/alpha, hashes and metadata")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--modules", action="store_true", help="also list every module's rank and alpha")

    export = sub.add_parser("export", help="rewrite any LoRA file (kohya, OneTrainer, diffusers, PEFT) as kohya")
    export.add_argument("file", type=Path)
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--precision", choices=SAVE_PRECISIONS, default="fp16")

    resize = sub.add_parser("resize", help="shrink a LoRA's rank by SVD; reports the error per module and in total")
    resize.add_argument("file", type=Path)
    target = resize.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int, help="the new rank of every module")
    target.add_argument("--energy", type=float, help="keep this share (0-1] of each module's squared singular values")
    resize.add_argument("-o", "--output", type=Path, required=True)
    resize.add_argument("--precision", choices=SAVE_PRECISIONS, default="fp16")
    resize.add_argument("--json", action="store_true", help="print the error report as JSON")

    bake = sub.add_parser(
        "merge-loras", help="bake LoRAs at their strengths into one LoRA file (exact, or SVD to a rank)",
        description="Example: lora-studio merge-loras style.safetensors:0.7 face.safetensors:0.5 -o both.safetensors",
    )  # fmt: skip
    bake.add_argument("loras", nargs="+", metavar="FILE[:STRENGTH]", help="a LoRA file and its strength (default 1)")
    bake.add_argument("-o", "--output", type=Path, required=True)
    bake_target = bake.add_mutually_exclusive_group()
    bake_target.add_argument("--rank", type=int, help="SVD the result to this rank (default: exact, ranks added)")
    bake_target.add_argument("--energy", type=float, help="SVD keeping this share (0-1] of the energy")
    bake.add_argument("--precision", choices=SAVE_PRECISIONS, default="fp16")

    extract = sub.add_parser("extract", help="a LoRA of a fine-tuned checkpoint's difference to its base (SVD)")
    extract.add_argument("base", help="the base model: 'demo', a checkpoint file or a diffusers folder")
    extract.add_argument("tuned", help="its fine-tune, in any of the same forms")
    extract.add_argument("-o", "--output", type=Path, required=True)
    extract_target = extract.add_mutually_exclusive_group(required=True)
    extract_target.add_argument("--rank", type=int, help="the rank of every extracted layer")
    extract_target.add_argument("--energy", type=float, help="keep this share (0-1] of each layer's energy")
    extract.add_argument("--targets", choices=("attn", "attn-ff", "full"), default="attn-ff",
                         help="the UNet layers, as in training (full: with the resnet convs)")  # fmt: skip
    extract.add_argument("--unet-only", action="store_true", help="leave the text encoders out")
    extract.add_argument("--precision", choices=SAVE_PRECISIONS, default="fp16")
    extract.add_argument("--json", action="store_true", help="print the error report as JSON")

    merge = sub.add_parser("merge", help="bake a LoRA into a base model and write a single-file checkpoint")
    merge.add_argument("base", help="'demo', a .safetensors checkpoint, a diffusers folder or a cached hub id")
    merge.add_argument("lora", type=Path)
    merge.add_argument("-o", "--output", type=Path, required=True)
    merge.add_argument("--strength", type=float, default=1.0)
    merge.add_argument("--precision", choices=SAVE_PRECISIONS, default="fp16")


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument(
        "--listen", action="store_true",
        help="listen on all interfaces (0.0.0.0); needs a password: LORA_STUDIO_AUTH=user:password or --auth-file",
    )  # fmt: skip
    parser.add_argument("--port", type=int, help="default: the first free port from 7860")
    parser.add_argument("--auth-file", help="a file whose first line is user:password (kept out of `ps`)")
    parser.add_argument("--auth", help="user:password on the command line (visible in `ps`; prefer --auth-file)")
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (with --ssl-keyfile)")
    parser.add_argument("--ssl-keyfile", help="the certificate's private key")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument("--resume-queue", action="store_true",
                        help="start the jobs that were queued or running when the app last stopped (else they wait "
                             "for a click in the Train tab)")  # fmt: skip
    parser.add_argument(
        "--models-dir", type=Path, help="base models the Train tab lists (default: models/, or LORA_STUDIO_MODELS)"
    )
    parser.add_argument(
        "--allow-dir", action="append", default=[], metavar="FOLDER",
        help="also let the app read and write this folder (e.g. a dataset kept elsewhere); repeat for more",
    )  # fmt: skip
    parser.add_argument("--max-upload-mb", type=int, default=50, help="the largest file an upload may be (MB)")


def run_app(args: argparse.Namespace) -> int:
    from .ui.app import launch, read_auth_file  # gradio is imported only when the app is wanted

    host = "0.0.0.0" if args.listen else args.host
    if args.models_dir:
        os.environ["LORA_STUDIO_MODELS"] = str(args.models_dir)  # paths.models_dir() reads it on each listing
    if args.auth:
        print("note: --auth shows the password to anyone who can list processes; prefer --auth-file or "
              "LORA_STUDIO_AUTH", file=sys.stderr)  # fmt: skip
    auth = read_auth_file(args.auth_file) if args.auth_file else args.auth
    launch(
        host=host, port=args.port, auth=auth, open_browser=not args.no_browser, allow_dirs=tuple(args.allow_dir),
        max_upload_mb=args.max_upload_mb, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        resume_queue=args.resume_queue,
    )  # fmt: skip
    return EXIT_OK


def run_detect(args: argparse.Namespace) -> int:
    from .catalogue import describe_source
    from .models import FAMILY_NAMES

    summary = describe_source(args.source, allow_pickle=args.allow_pickle)
    print(
        f"{summary.source}: {FAMILY_NAMES[summary.family]} [{summary.family}] ({summary.kind}), "
        f"prediction type {summary.prediction_type}"
    )
    for note in summary.notes:
        print(f"note: {note}")
    return EXIT_OK


def run_config(args: argparse.Namespace) -> int:
    from .config import config_to_toml, save_user_preset

    config = _load_config_or_preset(args.config, args.overrides)
    if args.save:
        based_on = args.config if not Path(args.config).exists() else ""
        print(f"saved your preset {args.save}: {save_user_preset(config, args.save, based_on)}")
        return EXIT_OK
    print(config_to_toml(config), end="")
    return EXIT_OK


def run_presets(args: argparse.Namespace) -> int:
    from .config import bundled_presets, delete_user_preset, preset_description, user_presets

    if args.delete:
        print(f"deleted your preset {args.delete} ({delete_user_preset(args.delete)})")
        return EXIT_OK
    for name in bundled_presets():
        print(f"{name:22} {preset_description(name)}")
    for name in user_presets():
        print(f"{name:22} (yours) {preset_description(name)}")
    return EXIT_OK


def _load_config_or_preset(name: str, overrides: list[str]):
    from .config import load_config, preset_path

    path = Path(name)
    if not path.exists() and path.suffix not in (".toml", ".json"):
        path = preset_path(name)
    return load_config(path, overrides)


def run_dataset(args: argparse.Namespace) -> int:
    import json

    from .config import TrainConfig
    from .data import dataset_report

    overrides = [f"dataset.path={json.dumps(args.path)}"]
    config = (
        _load_config_or_preset(args.config, overrides) if args.config else TrainConfig(dataset={"path": args.path})
    )
    report = dataset_report(config)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_dataset_report(report)
    return EXIT_INPUT if report["errors"] else EXIT_OK


def print_dataset_report(report: dict) -> None:
    print(
        f"Dataset {report['path']} ({report['layout']} layout): {report['items']} images, "
        f"{report['images_per_epoch']} per epoch with repeats"
    )
    for folder in report["folders"]:
        print(f"  {folder['path']}: {folder['images']} images x {folder['repeats']} repeats ('{folder['concept']}')")
    print(f"Buckets at {report['resolution']} px, batch {report['batch_size']}:")
    for bucket in report["buckets"]:
        print(f"  {bucket['width']}x{bucket['height']}: {bucket['count']} images")
    print(f"Steps: {report['steps_per_epoch']} per epoch, {report['total_steps']} in all")
    if report["regularization_images_per_epoch"]:
        print(f"Regularization: {report['regularization_images_per_epoch']} images per epoch beside the training ones")
    if report["validation_images"]:
        print(f"Validation: {len(report['validation_images'])} images held out of training")
        for path in report["validation_images"]:
            print(f"  {path}")
    for kind in ("warnings", "errors"):
        if report[kind]:
            print(f"{kind.capitalize()} ({len(report[kind])}):")
            for problem in report[kind]:
                print(f"  {problem['path']}: {problem['message']}")


def run_checkpoints(args: argparse.Namespace) -> int:
    import json

    from .runs import RunFolder

    run = RunFolder.open(args.run)
    best, losses = run.best_lora(), run.validation_losses()
    if args.best:
        if best is None:
            raise LoraStudioError(f"{run.path} has no validated LoRA file; train with validation.fraction or "
                                  "validation.path set to have one")  # fmt: skip
        print(best)
        return EXIT_OK
    rows = [{"file": str(path), **losses.get(path, {}), "best": path == best} for path in run.lora_files()]
    if args.json:
        print(json.dumps({"run": str(run.path), "best": str(best) if best else None, "files": rows}, indent=2))
        return EXIT_OK
    for row in rows:
        loss = f"{row['validation_loss']:.6f}" if "validation_loss" in row else "-"
        print(f"{'*' if row['best'] else ' '} {loss:>10}  {row['file']}")
    print("* lowest validation loss" if best else "no file was validated (set validation.fraction or .path)")
    return EXIT_OK


def run_reg_images(args: argparse.Namespace) -> int:
    """Render (or find cached) what `regularization.generate` will train on, so it can be looked at first."""
    from .reg_images import render_for_config

    config = _load_config_or_preset(args.config, args.overrides)
    preparing = PreparingBar()
    try:
        folder, items = render_for_config(config, lambda done, total: preparing.show("rendering", done, total))
    finally:
        preparing.close()
    print(f"{len(items)} regularization images in {folder}")
    for item in items:
        print(f"  {item.path.name}: {item.caption}")
    return EXIT_OK


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .runs import RunFolder

    if args.resume:
        run = RunFolder.open(args.resume)  # a folder that is not a run: one sentence, exit 1
        config = load_config(run.config, args.overrides)
    elif args.config:
        config = _load_config_or_preset(args.config, args.overrides)
    else:
        print(
            "error: give a config or preset (lora-studio train sd15-character --set ...), or --resume RUN_DIR",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return train_with_progress(config, args.resume)


def run_demo(args: argparse.Namespace) -> int:
    from .config import load_preset

    return train_with_progress(load_preset("demo-cpu"))


class PreparingBar:
    """A tqdm bar for work before training (rendering regularization images), closed when it is done."""

    def __init__(self) -> None:
        self.bar = None

    def show(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=stage, unit="image", dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_with_progress(config, resume: Path | None = None) -> int:
    """Train with a tqdm bar; the first Ctrl-C stops after the current step and saves, a second aborts."""
    import signal

    from accelerate import PartialState
    from tqdm import tqdm

    from .events import Commands, DoneEvent, PreparingEvent, ProgressEvent, SampleEvent
    from .train import run_training

    commands = Commands()
    bars: list = []  # drawn at the first step, so a run that fails while loading leaves just its error
    preparing = PreparingBar()

    def on_event(event) -> None:
        if isinstance(event, PreparingEvent):
            preparing.show(event.stage, event.done, event.total)
        elif isinstance(event, ProgressEvent):
            preparing.close()
            if not bars:
                bars.append(tqdm(total=event.total_steps, initial=event.step, unit="step", dynamic_ncols=True))
            bars[0].total = event.total_steps
            bars[0].n = event.step
            bars[0].set_postfix(loss=f"{event.smoothed_loss:.4f}", lr=f"{event.lr:.2e}")
        elif isinstance(event, SampleEvent):
            tqdm.write(f"samples at step {event.step}: {event.images[0].parent}")
        elif isinstance(event, DoneEvent) and bars:
            bars[0].close()

    def on_interrupt(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("stopping after this step and saving; press Ctrl-C again to abort")
        commands.request_stop()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        done = run_training(config, on_event=on_event, commands=commands, resume_from=resume)
    finally:
        signal.signal(signal.SIGINT, previous)
        preparing.close()
        for bar in bars:
            bar.close()
    state = "stopped" if done.stopped_early else "finished"
    if PartialState().is_main_process:  # under accelerate launch / torchrun, one process reports
        print(f"{state} at step {done.step}\nrun folder: {done.run_dir}\nLoRA file:  {done.lora_path}")
    return EXIT_OK


def parse_lora_argument(text: str) -> tuple[Path, float]:
    """FILE or FILE:STRENGTH; the strength is whatever follows the last colon if it parses as a number."""
    path, _, strength = text.rpartition(":")
    if path and strength:
        try:
            return Path(path), float(strength)
        except ValueError:
            pass
    return Path(text), 1.0


def sample_vae(args: argparse.Namespace, defaults, loras: list[tuple[Path, float]]) -> str:
    """--vae, else the first LoRA's run's VAE when the base is its run's too (no --base), else the model's own."""
    if args.vae is not None:
        return args.vae
    vae = "" if args.base else defaults.vae or ""
    if vae:
        print(f"note: VAE {vae} (the one {loras[0][0].name} was trained with; --vae '' for the base model's own)")
    return vae


def run_sample(args: argparse.Namespace) -> int:
    from .lora_inspect import check_lora_path
    from .sample import Axis, Previewer, PreviewSettings, save_png
    from .workflows import PreviewDefaults, load_preview_base, parse_grid_axis, preview_defaults

    loras = [parse_lora_argument(text) for text in args.lora]
    for path, _strength in loras:
        check_lora_path(path)
    # As the Preview tab: what is not given comes from the first LoRA's run and metadata (preview_defaults).
    defaults = preview_defaults(loras[0][0]) if loras else PreviewDefaults()

    def given(name: str, fallback):
        """The command line's value of `name`, else the run's, else the fallback (0 is a value: CFG 0 is allowed)."""
        return next((v for v in (getattr(args, name), getattr(defaults, name)) if v is not None), fallback)

    def settings_with(strengths: dict[str, float], native: int) -> PreviewSettings:
        return PreviewSettings(
            prompt=args.prompt,
            negative_prompt=given("negative_prompt", ""),
            strengths=strengths,
            sampler=given("sampler", "euler_a"),
            steps=given("steps", 20),
            cfg=given("cfg", 7.0),
            seed=args.seed,
            width=args.width or defaults.width or native,
            height=args.height or defaults.height or native,
            clip_skip=given("clip_skip", 1),
            batch_count=args.batch_count,
        )

    # What can be refused is refused before the base model loads (an SDXL checkpoint takes half a minute).
    settings_with({path.stem: strength for path, strength in loras}, native=512).checked()
    if not args.base and defaults.base_model:
        print(f"note: base model {defaults.base_model} (the one {loras[0][0].name} was trained on; --base to change)")
    base = load_preview_base(args.base or defaults.base_model or "demo", sample_vae(args, defaults, loras))
    previewer = Previewer(base)
    settings = settings_with({previewer.add_lora(path): strength for path, strength in loras}, base.native_resolution)
    strengths = settings.strengths
    if args.grid:
        # A checkpoint grid turns its own checkpoints on one at a time, so the --lora stack stays off.
        with_checkpoints = any(spec.startswith("checkpoint") for spec in args.grid[:2])
        first = None if with_checkpoints else next(iter(strengths), None)
        axes = [parse_grid_axis(spec, previewer, first) for spec in args.grid[:2]]
        x, y = axes[0], axes[1] if len(axes) > 1 else Axis("seed", (settings.seed,))
        grid = previewer.grid(settings, x, y)
        notices = grid.previews[0][0].notices
        written = [save_png(grid.image, args.out, grid.previews[0][0].parameters)]
    else:
        previews = previewer.generate(settings)
        notices = previews[0].notices
        written = []
        for i, preview in enumerate(previews):
            path = args.out if len(previews) == 1 else args.out.with_name(f"{args.out.stem}-{i + 1}{args.out.suffix}")
            written.append(save_png(preview.image, path, preview.parameters))
    for notice in notices:
        print(f"note: {notice}")
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def run_inspect(args: argparse.Namespace) -> int:
    import json

    from .lora_inspect import inspect_lora

    info = inspect_lora(args.file)
    per_module = info.pop("per_module")
    if args.json:
        if args.modules:
            info["per_module"] = per_module
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{args.file}\n  format: {info['format']}   family: {info['family'] or 'unknown'}")
    print(f"  modules: {info['modules']} {info['modules_per_part']}   rank: {info['ranks']}   alpha: {info['alphas']}")
    blocks = "   ".join(f"{block}: {ranks}" for block, ranks in info["ranks_by_block"].items())
    if blocks:
        print(f"  UNet ranks by block (rank: modules): {blocks}")
    print(f"  network: {info['network']}   DoRA: {info['dora']}")
    print(f"  sshs_model_hash: {info['sshs_model_hash']} (matches: {info['hashes_match']})")
    for note in info["notes"]:
        print(f"  note: {note}")
    for key, value in sorted(info["metadata"].items()):
        print(f"  {key} = {value if len(value) <= 100 else value[:97] + '...'}")
    if args.modules:
        for name, row in per_module.items():
            print(f"  {name}: {row['network']} rank {row['rank']} alpha {row['alpha']:g}")
    return EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    from .workflows import export_lora_file

    written = export_lora_file(args.file, args.output, "kohya", args.precision)
    print(f"wrote {written}: kohya format")
    return EXIT_OK


def run_resize(args: argparse.Namespace) -> int:
    from .workflows import resize_lora_file

    written, report = resize_lora_file(args.file, args.output, args.rank, args.energy, args.precision)
    print_error_report(report, args.json)
    print(f"wrote {written}")
    return EXIT_OK


def run_extract(args: argparse.Namespace) -> int:
    from .workflows import extract_lora_file

    written, report = extract_lora_file(args.base, args.tuned, args.output, args.rank, args.energy, args.targets,
                                        not args.unet_only, args.precision)  # fmt: skip
    print_error_report(report, args.json)
    print(f"wrote {written} ({len(report.per_module)} layers)")
    return EXIT_OK


def print_error_report(report, as_json: bool) -> None:
    """An SVD's error: the five worst layers and the total (Frobenius norms), or all of it as JSON."""
    import json

    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    worst = sorted(report.per_module.items(), key=lambda kv: -kv[1]["error"])[:5]
    for name, row in worst:
        was = f"rank {row['from_rank']} -> {row['rank']}" if "from_rank" in row else f"rank {row['rank']}"
        print(f"  {name}: {was}, error {row['error']:.4g} of {row['norm']:.4g}")
    total, norm = report.total_error, report.total_norm
    print(f"total Frobenius error {total:.4g} of {norm:.4g} ({report.relative_error:.2%})")


def run_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .captioner import caption_dataset, load_captioner

    captioner = load_captioner(args.model, threshold=args.threshold)
    if args.preview:
        for result in caption_dataset(args.path, captioner, args.mode, args.trigger, args.batch, limit=args.preview,
                                      write=False):  # fmt: skip
            shown = result.after if result.after is not None else f"(kept) {result.before}"
            print(f"{result.image.name}: {shown}")
        return EXIT_OK
    bar = tqdm(unit="image", dynamic_ncols=True, desc="captioning")

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        results = caption_dataset(args.path, captioner, args.mode, args.trigger, args.batch, progress=progress)
    finally:
        bar.close()
    print(f"wrote {sum(r.written for r in results)} captions in {args.path} ({len(results)} images)")
    return EXIT_OK


def run_merge_loras(args: argparse.Namespace) -> int:
    from .workflows import bake_lora_files, parse_stack_entry

    stack = [parse_stack_entry(text) for text in args.loras]
    _baked, report, written = bake_lora_files(stack, args.output, args.rank, args.energy, args.precision)
    print(report.sentence())
    print(f"wrote {written}")
    return EXIT_OK


def run_merge(args: argparse.Namespace) -> int:
    from .workflows import merge_into_base

    merge_into_base(args.base, args.lora, args.strength, args.output, args.precision)
    print(f"wrote {args.output} ({args.base} + {args.lora.name} at strength {args.strength:g})")
    return EXIT_OK


# The rest only read files (and must answer fast).
LOGGED_COMMANDS = {"app", "train", "demo", "sample", "merge", "reg-images"}
COMMANDS = {
    "app": run_app,
    "detect": run_detect,
    "config": run_config,
    "presets": run_presets,
    "dataset": run_dataset,
    "checkpoints": run_checkpoints,
    "reg-images": run_reg_images,
    "merge-loras": run_merge_loras,
    "caption": run_caption,
    "extract": run_extract,
    "train": run_train,
    "demo": run_demo,
    "inspect": run_inspect,
    "export": run_export,
    "resize": run_resize,
    "merge": run_merge,
    "sample": run_sample,
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["app", *argv]  # `lora-studio --port 8000` opens the app
    args = parser.parse_args(argv)
    if args.command in LOGGED_COMMANDS:
        attach_app_log()
    try:
        return COMMANDS[args.command](args)
    except LoraStudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except BrokenPipeError:  # `lora-studio inspect ... | head`: the reader left; nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe: no error at exit
        return EXIT_OK
    except Exception as exc:  # one sentence here; the traceback goes to the app's log file, whose path is given
        where = attach_app_log()
        logging.getLogger(__name__).error("lora-studio %s failed", args.command, exc_info=True)
        print(f"error: unexpected failure ({type(exc).__name__}: {exc}); the details are in {where}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
