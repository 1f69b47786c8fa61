"""`lora-studio`: the app by default, plus commands that work without it.

Exit codes: 0 success, 1 a problem with the input (the message says what to do), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import LoraStudioError

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

    sub.add_parser("presets", help="list the bundled presets")

    train = sub.add_parser("train", help="train a LoRA from a config or preset; --resume continues a run")
    train.add_argument("config", nargs="?", help="a TOML config or a preset name")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped or killed run")

    sub.add_parser("demo", help="train the demo-cpu preset on the bundled demo model and dataset")

    dataset = sub.add_parser("dataset", help="scan and validate a dataset folder; exit 1 if it has errors")
    dataset.add_argument("path", help="the images folder ('demo' for the bundled demo dataset)")
    dataset.add_argument("--config", help="a TOML config or preset whose dataset settings apply")
    dataset.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", help="user:password, required when --host is not a loopback address")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")


def run_app(args: argparse.Namespace) -> int:
    from .ui.app import launch  # gradio is imported only when the app is wanted

    launch(host=args.host, port=args.port, auth=args.auth, open_browser=not args.no_browser)
    return EXIT_OK


def run_detect(args: argparse.Namespace) -> int:
    from .models import FAMILY_NAMES, describe_source

    summary = describe_source(args.source, allow_pickle=args.allow_pickle)
    print(
        f"{summary.source}: {FAMILY_NAMES[summary.family]} [{summary.family}] ({summary.kind}), "
        f"prediction type {summary.prediction_type}"
    )
    for note in summary.notes:
        print(f"note: {note}")
    return EXIT_OK


def run_config(args: argparse.Namespace) -> int:
    from .config import config_to_toml

    print(config_to_toml(_load_config_or_preset(args.config, args.overrides)), end="")
    return EXIT_OK


def run_presets(args: argparse.Namespace) -> int:
    from .config import list_presets, preset_description

    for name in list_presets():
        print(f"{name:16} {preset_description(name)}")
    return EXIT_OK


def _load_config_or_preset(name: str, overrides: list[str]):
    from .config import load_config, preset_path

    path = Path(name)
    if not path.exists() and path.suffix != ".toml":
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
    for concept, repeats in report["repeats"].items():
        print(f"  {concept}: {repeats} repeats")
    print(f"Buckets at {report['resolution']} px, batch {report['batch_size']}:")
    for bucket in report["buckets"]:
        print(f"  {bucket['width']}x{bucket['height']}: {bucket['count']} images")
    print(f"Steps: {report['steps_per_epoch']} per epoch, {report['total_steps']} in all")
    for kind in ("warnings", "errors"):
        if report[kind]:
            print(f"{kind.capitalize()} ({len(report[kind])}):")
            for problem in report[kind]:
                print(f"  {problem['path']}: {problem['message']}")


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config

    if args.resume:
        config = load_config(args.resume / "config.toml", args.overrides)
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


def train_with_progress(config, resume: Path | None = None) -> int:
    """Train with a tqdm bar; the first Ctrl-C stops after the current step and saves, a second aborts."""
    import signal

    from tqdm import tqdm

    from .events import Commands, DoneEvent, ProgressEvent, SampleEvent
    from .train import run_training

    commands = Commands()
    bar = tqdm(total=None, unit="step", dynamic_ncols=True)

    def on_event(event) -> None:
        if isinstance(event, ProgressEvent):
            bar.total = event.total_steps
            bar.n = event.step
            bar.set_postfix(loss=f"{event.smoothed_loss:.4f}", lr=f"{event.lr:.2e}")
        elif isinstance(event, SampleEvent):
            bar.write(f"samples at step {event.step}: {event.images[0].parent}")
        elif isinstance(event, DoneEvent):
            bar.close()

    def on_interrupt(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        bar.write("stopping after this step and saving; press Ctrl-C again to abort")
        commands.request_stop()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        done = run_training(config, on_event=on_event, commands=commands, resume_from=resume)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    state = "stopped" if done.stopped_early else "finished"
    print(f"{state} at step {done.step}\nrun folder: {done.run_dir}\nLoRA file:  {done.lora_path}")
    return EXIT_OK


COMMANDS = {
    "app": run_app,
    "detect": run_detect,
    "config": run_config,
    "presets": run_presets,
    "dataset": run_dataset,
    "train": run_train,
    "demo": run_demo,
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["app", *argv]  # `lora-studio --port 8000` opens the app
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LoraStudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # one sentence here; the traceback is in the run's log.txt when there is a run
        logging.getLogger(__name__).debug("unexpected failure", exc_info=True)
        print(
            f"error: unexpected failure ({type(exc).__name__}: {exc}); see the run's log.txt for details",
            file=sys.stderr,
        )
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
