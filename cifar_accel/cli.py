"""Command-line entry points: ``cifar-accel train|evaluate|models|loader-speed`` and ``train.py``.

Every entry point turns a ``UserError`` into one line on stderr and exit status 2, and a
run stopped by SIGINT/SIGTERM into exit status 130/143.
Heavy imports happen inside the commands so that ``--help`` stays fast.
"""

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from cifar_accel.config import OneLineErrorParser
from cifar_accel.errors import StoppedBySignal, UserError


def _run(command: Callable[[], Any]) -> Any:
    try:
        return command()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except StoppedBySignal as stopped:  # the checkpoint and the resume command are already printed
        raise SystemExit(stopped.exit_code) from None


def train_main(argv: list[str] | None = None) -> None:
    """``train.py`` and ``cifar-accel train``: every flag comes from ``TrainConfig``."""
    from cifar_accel.config import parse_train_args
    from cifar_accel.engine import train

    _run(lambda: train(parse_train_args(argv)))


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="uoft-cs/cifar10", help="Hub id, local copy or image folder")
    parser.add_argument("--image_column", default=None, help="image column (default: detect 'img' or 'image')")
    parser.add_argument("--label_column", default=None, help="label column (default: detect 'label' or 'fine_label')")
    parser.add_argument("--batch_size", type=int, default=1024, help="examples per step")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")


def evaluate_main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="cifar-accel evaluate", description="Evaluate a saved model on one split.")
    parser.add_argument("--model", required=True, help="folder holding model.safetensors and config.json")
    parser.add_argument("--split", default="test", help="split to evaluate")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="use only the first N examples")
    _data_arguments(parser)
    args = _run(lambda: parser.parse_args(argv))

    def evaluate_command() -> None:
        from cifar_accel.config import TrainConfig
        from cifar_accel.data import load_evaluation_data, make_dataloader
        from cifar_accel.engine import build_accelerator, evaluate
        from cifar_accel.saved_model import load_model

        model, saved = load_model(args.model)
        data = load_evaluation_data(
            args.dataset, args.split, args.max_eval_samples, args.image_column, args.label_column, saved
        )
        loader = make_dataloader(
            data.evaluation, data, train=False, batch_size=args.batch_size, num_workers=args.num_workers
        )
        accelerator = build_accelerator(TrainConfig())
        model, loader = accelerator.prepare(model, loader)
        metrics = evaluate(model, loader, accelerator)
        if accelerator.is_main_process:
            print(json.dumps(metrics))

    _run(evaluate_command)


def loader_speed_main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(
        prog="cifar-accel loader-speed", description="Images/s of the augmented training loader alone, one epoch."
    )
    parser.add_argument("--max_train_samples", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--cutout", type=int, default=0, help="cutout square side in pixels (0: off)")
    _data_arguments(parser)
    args = _run(lambda: parser.parse_args(argv))

    def loader_speed_command() -> None:
        from cifar_accel.config import TrainConfig
        from cifar_accel.data import load_data, make_dataloader, measure_loader_throughput

        config = TrainConfig(
            dataset=args.dataset,
            image_column=args.image_column,
            label_column=args.label_column,
            max_train_samples=args.max_train_samples,
        )
        data = load_data(config)
        loader = make_dataloader(
            data.train, data, train=True, batch_size=args.batch_size, num_workers=args.num_workers, cutout=args.cutout
        )
        measure_loader_throughput(loader, max_batches=2)  # start the workers before timing
        rate = measure_loader_throughput(loader)
        print(f"{len(data.train)} images, batch {args.batch_size}, {args.num_workers} workers: {rate:,.0f} images/s")

    _run(loader_speed_command)


def models_main(argv: list[str] | None = None) -> None:
    from cifar_accel.models import list_models

    parser = OneLineErrorParser(prog="cifar-accel models", description="List the registered architectures.")
    _run(lambda: parser.parse_args(argv))
    print("\n".join(list_models()))


def recipes_main(argv: list[str] | None = None) -> None:
    from cifar_accel.recipes import list_recipes

    parser = OneLineErrorParser(prog="cifar-accel recipes", description="List the shipped training recipes.")
    _run(lambda: parser.parse_args(argv))
    recipes = list_recipes()
    width = max(map(len, recipes))
    print("\n".join(f"{name:<{width}}  {description}" for name, description in recipes.items()))


COMMANDS = {
    "train": (train_main, "train a model (same flags as train.py)"),
    "evaluate": (evaluate_main, "evaluate a saved model; prints JSON with top1, top5, loss, n"),
    "models": (models_main, "list the model names"),
    "recipes": (recipes_main, "list the training recipes (train --recipe NAME)"),
    "loader-speed": (loader_speed_main, "measure images/s of the training data loader alone"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]][0](argv[1:])
        return
    commands = "\n".join(f"  {name:<13} {summary}" for name, (_, summary) in COMMANDS.items())
    usage = f"usage: cifar-accel COMMAND [--help]\n\ncommands:\n{commands}"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    problem = f"unknown command {argv[0]!r}" if argv else "no command given"
    print(f"{usage}\n\nerror: {problem}", file=sys.stderr)
    raise SystemExit(2)
