"""Command-line entry points: ``cifar-accel COMMAND`` (see ``COMMANDS``), ``train.py`` and ``push_model.py``.

Every entry point turns a ``UserError`` into one line on stderr and exit status 2, what the
operating system refused (a full disk, a read-only folder) into one line and exit status 74,
and a run stopped by SIGINT/SIGTERM/SIGUSR1 into exit status 130/143/138. No message shows a secret.
Heavy imports happen inside the commands so that ``--help`` stays fast.
"""

import argparse
import json
import signal
import sys
import typing
from collections.abc import Callable
from typing import Any

from cifar_accel.errors import EXIT_SYSTEM_REFUSED, EXIT_USER_ERROR, STOP_SIGNALS, StoppedBySignal, UserError
from cifar_accel.files import describe_os_error
from cifar_accel.redaction import redact
from cifar_accel.settings import OneLineErrorParser


def _print_line(text: str) -> None:
    print(redact(" ".join(text.split())), file=sys.stderr)


def _run(command: Callable[[], Any]) -> Any:
    try:
        return command()
    except UserError as error:
        _print_line(f"error: {error}")
        raise SystemExit(EXIT_USER_ERROR) from None
    except OSError as error:
        _print_line(f"error: {describe_os_error(error)}")
        raise SystemExit(EXIT_SYSTEM_REFUSED) from None
    except StoppedBySignal as stopped:  # without a message, the checkpoint and resume command are printed
        _exit_stopped(stopped)
    except KeyboardInterrupt:  # before a run installed its own handling: nothing was written yet
        _print_line("SIGINT: stopped before anything was written")
        raise SystemExit(130) from None
    except Exception as error:  # a library (datasets' split generation) may wrap the stop in its own error
        stopped = _stop_behind(error)
        if stopped is None:
            raise
        _exit_stopped(stopped)


def _stop_behind(error: BaseException) -> StoppedBySignal | None:
    """The ``StoppedBySignal`` an error was raised from or while handling, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, StoppedBySignal):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _exit_stopped(stopped: StoppedBySignal) -> typing.NoReturn:
    # The process is leaving: a second Ctrl-C or SIGTERM must not break its clean-up (the loader workers' shutdown)
    # with a KeyboardInterrupt traceback.
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if stopped.message:
        _print_line(f"{stopped.signal_name}: {stopped.message}")
    raise SystemExit(stopped.exit_code) from None


def train_main(argv: list[str] | None = None) -> None:
    """``train.py`` and ``cifar-accel train``: every flag comes from ``TrainConfig``."""
    from cifar_accel.settings import parse_train_args

    config = _run(lambda: parse_train_args(argv))  # before the heavy imports: --help and bad flags answer at once
    if config.seeds:
        from cifar_accel.seeds import run_seeds

        _run(lambda: run_seeds(config))
        return
    from cifar_accel.engine import train

    _run(lambda: train(config))


UNBOUNDED = sys.maxsize


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, or a one-line error saying so."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            valid = f"at least {low}" if high == UNBOUNDED else f"{low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {valid}, got {value}")
        return value

    return convert


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="uoft-cs/cifar10", help="Hub id, local copy or image folder")
    parser.add_argument("--dataset_config", default=None, help="the dataset's config, for one with several")
    parser.add_argument("--image_column", default=None, help="image column (default: detect 'img' or 'image')")
    parser.add_argument("--label_column", default=None, help="label column (default: detect 'label' or 'fine_label')")
    parser.add_argument("--batch_size", type=_whole_number(1, 2**31), default=1024, help="examples per step")
    parser.add_argument("--num_workers", type=_whole_number(0, 64), default=2, help="DataLoader worker processes")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="Hub repo id (USER/NAME), folder holding a saved model, or a run folder (its best/)",
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (default: main)")


def evaluate_main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="cifar-accel evaluate", description="Evaluate a saved model on one split.")
    _model_arguments(parser)
    parser.add_argument("--split", default="test", help="split to evaluate")
    parser.add_argument(
        "--max_eval_samples",
        type=_whole_number(1, UNBOUNDED),
        default=None,
        help="N examples at random (seed 0, as train)",
    )
    _data_arguments(parser)
    args = _run(lambda: parser.parse_args(argv))

    def evaluate_command() -> None:
        from cifar_accel.accel import build_accelerator
        from cifar_accel.classifier import load_model
        from cifar_accel.config import TrainConfig
        from cifar_accel.data import load_evaluation_data, make_dataloader
        from cifar_accel.loop import evaluate

        model = load_model(args.model, args.revision)
        data = load_evaluation_data(
            args.dataset, args.split, args.max_eval_samples, args.image_column, args.label_column, model.config,
            args.dataset_config,
        )  # fmt: skip
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
    parser.add_argument(
        "--max_train_samples",
        type=_whole_number(1, UNBOUNDED),
        default=None,
        help="N examples at random (seed 0, as train)",
    )
    parser.add_argument("--cutout", type=_whole_number(0, 31), default=0, help="cutout square side in pixels (0: off)")
    _data_arguments(parser)
    args = _run(lambda: parser.parse_args(argv))

    def loader_speed_command() -> None:
        from cifar_accel.config import TrainConfig
        from cifar_accel.data import load_data, make_dataloader, measure_loader_throughput

        config = TrainConfig(
            dataset=args.dataset,
            dataset_config=args.dataset_config,
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


def predict_main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="cifar-accel predict", description="Classify image files with a saved model.")
    _model_arguments(parser)
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (any size; resized to the model's input size)"
    )
    parser.add_argument("--top_k", type=int, default=5, help="how many classes to show per image")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of tables")
    args = _run(lambda: parser.parse_args(argv))

    def predict_command() -> None:
        from cifar_accel.classifier import load_model
        from cifar_accel.images import open_image, to_rgb

        if args.top_k < 1:
            raise UserError(f"--top_k must be at least 1, got {args.top_k}")
        images = []
        for path in args.images:  # every file is checked before the model is fetched
            with open_image(path, f"image {path}") as image:  # a missing, undecodable or bomb file: one line
                images.append(to_rgb(image, f"image {path}"))
        predictions = load_model(args.model, args.revision).predict(images, top_k=args.top_k)
        for path, ranked in zip(args.images, predictions, strict=True):
            if args.json:
                print(json.dumps({"image": path, "predictions": ranked}))
                continue
            width = max(len(entry["label"]) for entry in ranked)
            print(path)
            print("\n".join(f"  {entry['label']:<{width}}  {entry['score']:7.2%}" for entry in ranked))

    _run(predict_command)


def push_main(argv: list[str] | None = None) -> None:
    """``push_model.py`` and ``cifar-accel push``."""
    parser = OneLineErrorParser(
        prog="cifar-accel push",
        description="Publish a finished run's best model, with its card, plots and records, to the Hugging Face Hub.",
    )
    parser.add_argument("--run_dir", required=True, help="the run folder (train --output_dir)")
    parser.add_argument("--repo_id", required=True, help="USER/NAME or ORG/NAME of the model repo")
    parser.add_argument("--private", action="store_true", help="create the repo as private (an existing one is kept)")
    parser.add_argument("--revision", default=None, help="branch to commit to, created if needed (default: main)")
    parser.add_argument("--commit_message", default=None, help="message of the upload commit")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` store)")
    parser.add_argument("--dataset_id", default=None, help="Hub dataset for the card (default: the run's --dataset)")
    parser.add_argument("--license", default="apache-2.0", help="license of the weights, for the card")
    args = _run(lambda: parser.parse_args(argv))

    def push_command() -> None:
        from cifar_accel.hub import push_run

        url = push_run(
            args.run_dir, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, token=args.token, dataset_id=args.dataset_id, license=args.license,
        )  # fmt: skip
        print(f"pushed {args.run_dir} to {url}")

    _run(push_command)


def compare_main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="cifar-accel compare", description="Finished runs side by side.")
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR",
        help="run folders (train --output_dir), train --seeds folders (seeds.json) or folders of run folders",
    )  # fmt: skip
    parser.add_argument(
        "--plot", default=None, metavar="PATH",
        help="also draw their evaluation curves to this PNG, and with groups of seeds their accuracies to PATH_groups",
    )  # fmt: skip
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--markdown", action="store_true", help="print a Markdown table")
    output.add_argument("--json", action="store_true", help="print the groups, their statistics and tests as JSON")
    parser.add_argument("--per_run", action="store_true", help="one row per run even where runs form groups")
    args = _run(lambda: parser.parse_args(argv))

    def compare_command() -> None:
        from cifar_accel.compare import load_runs
        from cifar_accel.compare_groups import comparison_json, draw_comparison, format_report, group_runs

        if args.plot and not args.plot.lower().endswith(".png"):
            raise UserError(f"--plot {args.plot}: the figure is a PNG; give a path ending in .png")
        runs = load_runs(args.run_dirs)
        groups = group_runs(runs)
        if args.json:  # one JSON object on stdout: the figures are drawn first and named in it
            plots = draw_comparison(runs, groups, args.plot) if args.plot else {}
            print(json.dumps(comparison_json(groups, plots), indent=2))
            return
        print(format_report(runs, groups, markdown=args.markdown, per_run=args.per_run))
        if args.plot:
            plots = draw_comparison(runs, groups, args.plot)
            print(f"curves of {len(runs)} runs drawn to {args.plot}")
            if "groups" in plots:
                print(f"accuracies of {len(groups)} groups ({len(runs)} runs) drawn to {plots['groups']}")

    _run(compare_command)


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


def sweep_main(argv: list[str] | None = None) -> None:
    """``cifar-accel sweep``: a hyperparameter search on Optuna (``cifar_accel.sweep``). Its own flags are parsed
    here; every other flag is a training flag, fixing what the space does not vary."""
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineErrorParser(
        prog="cifar-accel sweep",
        description="Search training settings with Optuna: one run per trial in OUTPUT_DIR/trial_K. Any number of "
        "workers may run the same command on one --storage. Every other flag is a training flag (cifar-accel train "
        "--help) fixing what the space does not vary; --output_dir is the sweep's folder.",
        allow_abbrev=False,  # an abbreviation would take a training flag's place
    )
    parser.add_argument("--space", required=True, metavar="YAML", help="flag: {type: float|int|categorical, ...}")
    parser.add_argument("--study", required=True, metavar="NAME", help="the study's name in the storage")
    parser.add_argument(
        "--storage", required=True, metavar="PATH|URL", help="a journal file, or a database URL (sqlite:///FILE)"
    )
    parser.add_argument(
        "--trials", required=True, type=_whole_number(1, 10**6), metavar="N", help="trials in all, across workers"
    )
    parser.add_argument(
        "--pruner",
        choices=("median", "none"),
        default="median",
        help="median: stop a trial whose epoch scores below the median of the complete trials' (from the 6th trial)",
    )
    parser.add_argument(
        "--heartbeat_seconds",
        type=_whole_number(1, 86400),
        default=60,
        metavar="S",
        help="a worker silent for 2 x S seconds is taken for dead: its trial is run again (default: 60)",
    )
    args, training_flags = _run(lambda: parser.parse_known_args(argv))
    from cifar_accel.settings import parse_train_args

    config = _run(lambda: parse_train_args(training_flags))

    def sweep_command() -> None:
        try:
            from cifar_accel.sweep import SweepOptions, run_sweep
        except ModuleNotFoundError as error:
            if not (error.name or "").startswith("optuna"):
                raise
            raise UserError(
                'optuna is not installed: pip install "cifar-accel[sweep]" (or pip install optuna)'
            ) from None
        options = SweepOptions(
            args.space, args.study, args.storage, args.trials, args.pruner, args.heartbeat_seconds,
            command=shlex.join(["cifar-accel", "sweep", *argv]),
        )  # fmt: skip
        run_sweep(options, config)

    _run(sweep_command)


COMMANDS = {
    "train": (train_main, "train a model (same flags as train.py)"),
    "evaluate": (evaluate_main, "evaluate a saved model; prints JSON with top1, top3, top5, loss, n"),
    "compare": (compare_main, "finished runs side by side; seeds of one setting as groups, tested against their noise"),
    "predict": (predict_main, "classify image files with a saved model (local folder or Hub repo)"),
    "push": (push_main, "publish a finished run to the Hugging Face Hub (same as push_model.py)"),
    "models": (models_main, "list the model names"),
    "recipes": (recipes_main, "list the training recipes (train --recipe NAME)"),
    "loader-speed": (loader_speed_main, "measure images/s of the training data loader alone"),
    "sweep": (sweep_main, "search training settings with Optuna; several workers may share one study"),
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
