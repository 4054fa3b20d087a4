"""Accuracy and seconds per run: our airbench94 recipe against the ``airbench`` package, alternating.

Both sides are timed the same way: from training data already on the device to the end of the final
test-time-augmented evaluation (ours: ``results.json``'s ``timing.speed_run_seconds``; airbench: around
``train94`` + ``evaluate``, synchronised). Our end-to-end time (``timing.total_seconds``) goes in the JSON.

Fairness: run i of each side uses seed ``--seed_base + i`` (ours ``--seed``, airbench the global torch
generators, as ``train94`` takes no seed); the sides alternate run by run after one untimed warm-up each
(which also holds our ``torch.compile``, reported apart); ``cudnn.benchmark`` is set once for both; both
see the same images: airbench's ``cifar10/{train,test}.pt`` cache is written from the images our side
uses (``--train_images``/``--eval_images`` cap both), and ``--epochs`` goes to both (airbench: ``epochs=``).

airbench (``pip install -e ".[benchmarks]"``, airbench 0.1.8) needs CUDA unless ``--airbench_on_cpu``, which
runs its own ``train94`` in float32 on the CPU (see ``airbench_runs_on_cpu``), and ours with ``--cpu
--mixed_precision no``. Note that airbench's final lookahead step drops the steps after the last multiple
of 5, so a run of under 5 steps in all (batch 1,024: one epoch of under 5,120 images) leaves it untrained.

    python benchmarks/time_to_accuracy.py --dataset ../shared/cifar10 --runs 10
    python benchmarks/time_to_accuracy.py --airbench_on_cpu --train_images 10240 --epochs 1 --runs 2
    python benchmarks/time_to_accuracy.py --airbench_on_cpu --runs 1 --no-warm_up   # full length, ~1 h on 2 cores
    python benchmarks/time_to_accuracy.py --quick          # CPU smoke: our side, 2,000 images, 1 epoch
"""

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import accelerate
import datasets
import torch

from cifar_accel.config import TrainConfig
from cifar_accel.data import load_data
from cifar_accel.engine import train
from cifar_accel.recipes import list_recipes
from cifar_accel.run_files import METRICS_FILE
from cifar_accel.settings import parse_train_args

RESULTS_DIRECTORY = Path(__file__).parent / "results"
SETTINGS_RECORDED = (
    "runs", "seed_base", "cudnn_benchmark", "warm_up", "airbench_on_cpu", "train_images", "eval_images", "epochs",
)  # fmt: skip


def train_recorded(flags: list[str]) -> tuple[dict, list[dict]]:
    """``train`` on ``flags`` in a temporary ``--output_dir``: results.json's content and metrics.jsonl's records."""
    with tempfile.TemporaryDirectory() as output_dir:
        results = train(parse_train_args(["--output_dir", output_dir, *flags]))
        lines = (Path(output_dir) / METRICS_FILE).read_text().splitlines()
    return results, [json.loads(line) for line in lines if line.strip()]


def our_outcome(results: dict) -> dict:
    """A run's accuracy (with TTA where it was evaluated so) and seconds, from results.json's content."""
    top1 = results["tta_metrics"]["top1"] if "tta_metrics" in results else results["best_metrics"]["eval_top1"]
    timing = results["timing"]
    return {"accuracy": top1, "seconds": timing["speed_run_seconds"], "end_to_end_seconds": timing["total_seconds"]}


def run_ours(recipe: str, dataset: str, our_flags: list[str], seed: int) -> dict:
    results, _ = train_recorded(["--recipe", recipe, "--dataset", dataset, *our_flags, "--seed", str(seed)])
    return our_outcome(results)


def write_airbench_cache(config: TrainConfig, directory: Path) -> None:
    """airbench reads ``cifar10/{train,test}.pt``: uint8 NHWC images, int64 labels, class names."""
    data = load_data(config)  # with our caps, so both sides see the same first N images
    (directory / "cifar10").mkdir(parents=True, exist_ok=True)
    for name, split in (("train", data.train), ("test", data.evaluation)):
        images, labels = data.decoded(split)
        payload = {"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": data.class_names}
        torch.save(payload, directory / "cifar10" / f"{name}.pt")


class WallClockEvent:
    """Stands in for ``torch.cuda.Event(enable_timing=True)``: on the CPU, work is done when it returns."""

    def __init__(self, **_cuda_options: object) -> None:
        self.recorded_at = 0.0

    def record(self) -> None:
        self.recorded_at = time.perf_counter()

    def elapsed_time(self, end: "WallClockEvent") -> float:
        return 1000 * (end.recorded_at - self.recorded_at)  # milliseconds, as CUDA events report


@contextlib.contextmanager
def airbench_runs_on_cpu() -> Iterator[None]:
    """airbench 0.1.8 hard-codes CUDA and fp16; while this is active its ``train94`` runs on the CPU in float32.

    ``.cuda()``/``.half()`` become no-ops (fp16 convolutions are slow or missing on CPUs), ``torch.load`` maps
    to the CPU (its loader asks for ``cuda:0``), and CUDA events/synchronisation become wall-clock stand-ins.
    Its algorithm is untouched, and everything is restored on exit so that our side never sees the patches.
    """
    load = torch.load

    def load_on_cpu(*args: object, **kwargs: object) -> object:
        return load(*args, **{**kwargs, "map_location": "cpu"})

    def unchanged(self: object, *args: object, **kwargs: object) -> object:
        return self

    with contextlib.ExitStack() as patches:
        for owner, name, replacement in (
            (torch.nn.Module, "cuda", unchanged),
            (torch.nn.Module, "half", unchanged),
            (torch.Tensor, "half", unchanged),  # uint8 images stay uint8; airbench's "/ 255" then gives float32
            (torch, "load", load_on_cpu),
            (torch.cuda, "Event", WallClockEvent),
            (torch.cuda, "synchronize", lambda *args, **kwargs: None),
        ):
            patches.enter_context(mock.patch.object(owner, name, replacement))
        yield


def run_airbench(
    variant: str, cache_directory: str, seed: int, epochs: float | None, on_cpu: bool, batch_size: int | None = None
) -> dict:
    """One airbench run on the images in ``cache_directory/cifar10``, timed as ours is; with its own batch size
    unless ``batch_size`` is given (benchmarks/gpu_session.py --quick: a few steps on the CPU)."""
    import airbench

    train_function = getattr(airbench, f"train{variant}")
    hyperparameters = getattr(airbench, f"lib_airbench{variant}").hyp  # its own batch size and augmentation
    working_directory = os.getcwd()
    with airbench_runs_on_cpu() if on_cpu else contextlib.nullcontext():
        os.chdir(cache_directory)  # train() opens "cifar10/test.pt" relative to the working directory
        try:
            batch_size, augmentation = batch_size or hyperparameters["opt"]["batch_size"], hyperparameters["aug"]
            loader = airbench.CifarLoader("cifar10", train=True, batch_size=batch_size, aug=augmentation, altflip=True)
            test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
            torch.manual_seed(seed)  # train94 has no seed: its initialisation, shuffling and crops use these
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed)
            torch.cuda.synchronize()
            start = time.perf_counter()
            epoch_option = {} if epochs is None else {"epochs": epochs}
            model = train_function(train_loader=loader, verbose=False, **epoch_option)
            accuracy = airbench.evaluate(model, test_loader, tta_level=hyperparameters["net"]["tta_level"])
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        finally:
            os.chdir(working_directory)
    return {"accuracy": float(accuracy), "seconds": seconds}


def mean_and_standard_error(values: list[float]) -> tuple[float, float | None]:
    """Standard error of the mean (stdev / sqrt(n)); None for a single run, which has no spread."""
    spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.mean(values), spread


def formatted(values: list[float], digits: int) -> str:
    mean, error = mean_and_standard_error(values)
    return f"{mean:.{digits}f} (n=1)" if error is None else f"{mean:.{digits}f} ± {error:.{digits}f}"


def time_ratio(ours: list[float], theirs: list[float]) -> dict:
    """Ratio of the mean seconds, its standard error by the delta method, and the per-round ratios' range."""
    mean_ours, error_ours = mean_and_standard_error(ours)
    mean_theirs, error_theirs = mean_and_standard_error(theirs)
    ratio = mean_ours / mean_theirs
    # Independent means: the relative standard errors add in quadrature to first order.
    error = None if error_ours is None else ratio * math.hypot(error_ours / mean_ours, error_theirs / mean_theirs)
    per_round = [mine / other for mine, other in zip(ours, theirs, strict=True)]
    return {"ratio": ratio, "standard_error": error, "min": min(per_round), "max": max(per_round)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/cifar10")
    shipped = [variant for variant in ("94", "96") if f"airbench{variant}" in list_recipes()]
    parser.add_argument("--variant", default="94", choices=shipped, help="airbench variant, on both sides")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per side, after one warm-up each")
    parser.add_argument("--seed_base", type=int, default=0, help="run i of each side uses seed seed_base + i")
    on_or_off = argparse.BooleanOptionalAction
    parser.add_argument("--cudnn_benchmark", action=on_or_off, default=True, help="cudnn.benchmark for both sides")
    parser.add_argument("--our_flags", default="", help="extra train.py flags for our side, e.g. '--compile'")
    parser.add_argument("--airbench_on_cpu", action="store_true", help="run both sides on the CPU, in float32")
    parser.add_argument("--train_images", type=int, help="both sides: only the first N training images")
    parser.add_argument("--eval_images", type=int, help="both sides: only the first N test images")
    parser.add_argument(
        "--epochs", type=float, help="both sides, fractions allowed (ours --epochs, airbench train94's epochs=)"
    )
    parser.add_argument(
        "--warm_up", action=on_or_off, default=True,
        help="one untimed run per side first (compiles ours); --no-warm_up for long uncompiled runs on the CPU",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: our side, 2,000 images, 1 epoch, 1 run")
    parser.add_argument("--results_dir", default=str(RESULTS_DIRECTORY), help="where the per-run JSON goes")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.quick:
        args.runs, args.train_images, args.eval_images, args.epochs = 1, 2000, 1000, args.epochs or 1
    recipe, dataset = f"airbench{args.variant}", os.path.abspath(args.dataset)
    # On the CPU airbench runs float32, so ours does too (flags in --our_flags come later and win).
    our_flags = ["--cpu", "--mixed_precision", "no"] * args.airbench_on_cpu + args.our_flags.split()
    caps = {"max_train_samples": args.train_images, "max_eval_samples": args.eval_images}
    for option, value in {**caps, "epochs": args.epochs}.items():
        our_flags += [f"--{option}", str(value)] if value is not None else []
    compiles = parse_train_args(["--recipe", recipe, "--dataset", dataset, *our_flags]).compile
    on_gpu = torch.cuda.is_available() and not args.airbench_on_cpu
    with_airbench = (on_gpu or args.airbench_on_cpu) and not args.quick

    cache = tempfile.TemporaryDirectory()
    sides: dict[str, Callable[[int], dict]] = {"cifar_accel": lambda seed: run_ours(recipe, dataset, our_flags, seed)}
    if with_airbench:
        try:  # imported before cudnn.benchmark is set below: importing airbench sets the flag to True
            import airbench  # noqa: F401
        except ImportError:
            sys.exit("airbench is not installed: pip install -e '.[benchmarks]' (airbench==0.1.8)")

        write_airbench_cache(TrainConfig(dataset=dataset, **caps), Path(cache.name))
        sides["airbench"] = lambda seed: run_airbench(args.variant, cache.name, seed, args.epochs, args.airbench_on_cpu)
    else:
        print("no CUDA device (or --quick): timing our side only; --airbench_on_cpu runs both on the CPU", flush=True)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    results: dict[str, list[dict]] = {name: [] for name in sides}
    warm_ups: dict[str, dict] = {}
    # Round -1 warms each side up (and compiles ours) with a seed no counted run uses; --quick skips it.
    for round_index in range(0 if args.quick or not args.warm_up else -1, args.runs):
        seed = args.seed_base + (args.runs if round_index < 0 else round_index)
        for name, run in sides.items():
            outcome = {"seed": seed, **run(seed)}
            label = "warm-up" if round_index < 0 else f"run {round_index + 1}"
            print(
                f"{label} {name} (seed {seed}): accuracy {outcome['accuracy']:.4f}, {outcome['seconds']:.2f} s",
                flush=True,
            )
            if round_index < 0:
                warm_ups[name] = outcome
            else:
                results[name].append(outcome)
    seconds_of = {name: [outcome["seconds"] for outcome in outcomes] for name, outcomes in results.items()}
    accuracies_of = {name: [outcome["accuracy"] for outcome in outcomes] for name, outcomes in results.items()}
    ratio = time_ratio(seconds_of["cifar_accel"], seconds_of["airbench"]) if with_airbench else None

    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "processor": platform.processor() or platform.machine(),
        "versions": {module.__name__: module.__version__ for module in (torch, accelerate, datasets)},
        "command": " ".join(["python", "benchmarks/time_to_accuracy.py", *sys.argv[1:]]),
        "recipe": recipe,
        "our_flags": our_flags,
        "settings": {key: getattr(args, key) for key in SETTINGS_RECORDED},
        "compiled": compiles,
        "warm_ups": warm_ups,
        "runs": results,
        "summary": {  # the standard error is null for a single run
            name: {
                measure: dict(zip(("mean", "standard_error"), mean_and_standard_error(values[name]), strict=True))
                for measure, values in (("accuracy", accuracies_of), ("seconds", seconds_of))
            }
            for name in results
        },
        "time_ratio": ratio,
    }
    results_directory = Path(args.results_dir)
    results_directory.mkdir(parents=True, exist_ok=True)
    stamp = record["date"].replace(":", "").replace("-", "")[:15]
    output = results_directory / f"time_to_accuracy-{recipe}-{stamp}{'-quick' if args.quick else ''}.json"
    output.write_text(json.dumps(record, indent=2) + "\n")
    cache.cleanup()

    print(
        f"\n{recipe} on {record['device']}, {args.runs} run(s) per side, seeds {args.seed_base} to "
        f"{args.seed_base + args.runs - 1}, cudnn.benchmark {args.cudnn_benchmark}; raw runs in {output}"
    )
    print("| system | accuracy (mean ± s.e.) | seconds (mean ± s.e.) | warm-up (compile) seconds, not counted |")
    print("|---|---|---|---|")
    for name in results:
        warm_up = f"{warm_ups[name]['seconds']:.2f}" if name in warm_ups else "none"
        print(f"| {name} | {formatted(accuracies_of[name], 4)} | {formatted(seconds_of[name], 2)} | {warm_up} |")
    if compiles:
        print(
            "our torch.compile ran in-process during the untimed warm-up, so the timed runs reuse it"
            if warm_ups
            else "no warm-up: the compile time is inside the first timed run"
        )
    if ratio:
        spread = "(n=1)" if ratio["standard_error"] is None else f"± {ratio['standard_error']:.3f}"
        print(
            f"time ratio cifar_accel / airbench (ratio of means): {ratio['ratio']:.3f} {spread}, "
            f"per-round {ratio['min']:.3f} to {ratio['max']:.3f} (target <= 0.8)"
        )


if __name__ == "__main__":
    main()
