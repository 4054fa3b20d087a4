"""Accuracy and seconds per run: our airbench94 recipe against the ``airbench`` package, alternating.

Both sides are timed the same way: from training data already on the device to the end of the
final test-time-augmented evaluation (ours: ``results.json``'s ``timing.speed_run_seconds``; airbench: around
``train94`` + ``evaluate``, with the GPU synchronised). End-to-end wall time of each of our runs
(``timing.total_seconds``: from the start of ``train``, data loading included) is reported too.

airbench runs only on CUDA and is a benchmark-only extra (``pip install airbench``); it is fed the
same images by writing its ``cifar10/train.pt`` and ``test.pt`` cache from our dataset. Without a GPU
only our side runs. Per-run JSON goes to ``benchmarks/results/``.

    python benchmarks/time_to_accuracy.py --dataset ../shared/cifar10 --runs 5
    python benchmarks/time_to_accuracy.py --quick          # CPU smoke: our side, 2,000 images, 1 epoch
"""

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import accelerate
import datasets
import torch

from cifar_accel.config import TrainConfig, parse_train_args
from cifar_accel.data import decode_split, load_data
from cifar_accel.engine import train
from cifar_accel.recipes import list_recipes

RESULTS_DIRECTORY = Path(__file__).parent / "results"


def run_ours(recipe: str, dataset: str, extra_flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        flags = ["--recipe", recipe, "--dataset", dataset, "--output_dir", output_dir, *extra_flags]
        results = train(parse_train_args(flags))
    top1 = results["tta_metrics"]["top1"] if "tta_metrics" in results else results["best_metrics"]["eval_top1"]
    timing = results["timing"]
    return {"accuracy": top1, "seconds": timing["speed_run_seconds"], "end_to_end_seconds": timing["total_seconds"]}


def write_airbench_cache(dataset: str, directory: Path) -> None:
    """airbench reads ``cifar10/{train,test}.pt``: uint8 NHWC images, int64 labels, class names."""
    data = load_data(TrainConfig(dataset=dataset))
    (directory / "cifar10").mkdir(parents=True, exist_ok=True)
    for name, split in (("train", data.train), ("test", data.evaluation)):
        images, labels = decode_split(split, data.image_column, data.label_column)
        payload = {"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": data.class_names}
        torch.save(payload, directory / "cifar10" / f"{name}.pt")


def run_airbench(variant: str) -> dict:
    """One airbench run in the current directory (which holds ``cifar10/``), timed as ours is."""
    import airbench

    train_function = getattr(airbench, f"train{variant}")
    hyperparameters = importlib.import_module(f"airbench.lib_airbench{variant}").hyp  # its own batch and augmentation
    loader = airbench.CifarLoader(
        "cifar10", train=True, batch_size=hyperparameters["opt"]["batch_size"], aug=hyperparameters["aug"], altflip=True
    )
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = train_function(train_loader=loader, verbose=False)
    accuracy = airbench.evaluate(model, test_loader, tta_level=2)
    torch.cuda.synchronize()
    return {"accuracy": float(accuracy), "seconds": time.perf_counter() - start}


def summary(runs: list[dict], key: str) -> str:
    values = [run[key] for run in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/cifar10")
    shipped = [variant for variant in ("94", "96") if f"airbench{variant}" in list_recipes()]
    parser.add_argument("--variant", default="94", choices=shipped, help="airbench variant, on both sides")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side, after one warm-up each")
    parser.add_argument(
        "--our_flags", default="", help="extra train.py flags for our side, e.g. '--mixed_precision bf16'"
    )
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: our side, 2,000 images, 1 epoch, 1 run")
    parser.add_argument("--results_dir", default=str(RESULTS_DIRECTORY), help="where the per-run JSON goes")
    args = parser.parse_args()
    recipe = f"airbench{args.variant}"
    dataset = os.path.abspath(args.dataset)
    our_flags = args.our_flags.split()
    if args.quick:
        our_flags += ["--max_train_samples", "2000", "--max_eval_samples", "1000", "--epochs", "1"]
    runs = 1 if args.quick else args.runs
    with_airbench = torch.cuda.is_available() and not args.quick

    sides = {"cifar_accel": lambda: run_ours(recipe, dataset, our_flags)}
    workdir = tempfile.TemporaryDirectory()
    if with_airbench:
        write_airbench_cache(dataset, Path(workdir.name))
        os.chdir(workdir.name)  # airbench's train() opens "cifar10/test.pt" relative to the working directory
        sides["airbench"] = lambda: run_airbench(args.variant)
    else:
        print("no CUDA device (or --quick): timing our side only; airbench runs only on CUDA", flush=True)

    results: dict[str, list[dict]] = {name: [] for name in sides}
    first_round = 1 if args.quick else 0  # round 0 warms each side up and is not counted; --quick skips it
    for round_index in range(first_round, runs + 1):
        for name, run in sides.items():
            outcome = run()
            label = "warm-up" if round_index == 0 else f"run {round_index}"
            print(f"{label} {name}: accuracy {outcome['accuracy']:.4f}, {outcome['seconds']:.2f} s", flush=True)
            if round_index:
                results[name].append(outcome)

    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
        },
        "command": " ".join(["python", "benchmarks/time_to_accuracy.py", *sys.argv[1:]]),
        "recipe": recipe,
        "our_flags": our_flags,
        "runs": results,
    }
    results_directory = Path(args.results_dir)
    results_directory.mkdir(parents=True, exist_ok=True)
    stamp = record["date"].replace(":", "").replace("-", "")[:15]
    output = results_directory / f"time_to_accuracy-{recipe}-{stamp}{'-quick' if args.quick else ''}.json"
    output.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\n{recipe} on {record['device']}, {len(results['cifar_accel'])} run(s) per side; raw runs in {output}")
    print("| system | accuracy (mean ± std) | seconds (mean ± std) |\n|---|---|---|")
    for name, outcomes in results.items():
        print(f"| {name} | {summary(outcomes, 'accuracy')} | {summary(outcomes, 'seconds')} |")
    if with_airbench:
        ratio = statistics.mean(r["seconds"] for r in results["cifar_accel"]) / statistics.mean(
            r["seconds"] for r in results["airbench"]
        )
        print(f"time ratio cifar_accel / airbench: {ratio:.3f} (target <= 0.8)")


if __name__ == "__main__":
    main()
