"""Fine-tuning images/s of one timm model at its own input size: our data paths against the transformers example's.

Both sides train the same network (random weights, the same initial ones), with the same AdamW, batch size, number
of DataLoader workers and number of steps, on the same training images; a step is forward, cross-entropy, backward
and the optimizer's step, fed by the side's real loader. They take turns repeat by repeat (the order swapped each
repeat) in this one process; each repeat starts a fresh epoch (so fresh workers, as both loaders have
``persistent_workers=False``), runs ``--warmup_steps`` untimed, then times ``--steps``.

- ours: what ``train.py --model local-dir:FOLDER`` builds, through the trainer's own ``build.load_run_data``: the
  split decoded once into uint8 32x32 tensors (cached on disk), random crop (reflect padding 4) and flip per image
  in the workers, the batch normalised with the model's mean and std (``make_dataloader``), then
  ``ZooClassifier`` resizing the whole batch to the model's input size as its first operation;
- ours, device loader (``--data_loader device``): the same, with the split held as one uint8 tensor and each batch
  cropped and flipped by tensor ops in the training process, no workers;
- transformers example (``examples/pytorch/image-classification/run_image_classification_no_trainer.py``):
  ``datasets`` ``with_transform`` applying, per image in the DataLoader workers, ``Compose([RandomResizedCrop(size),
  RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])`` to the decoded PIL image, a ``collate_fn`` stacking
  ``pixel_values`` and labels, feeding the bare timm network. ``size``, ``mean`` and ``std`` are the model's timm
  data config's (the example reads them from the image processor).

The model is saved with ``timm.models.save_for_hf`` to a temporary folder, which our side loads as the trainer
does (``local-dir:``, ``--pretrained false``). ``--model NAME@SIZE`` trains NAME at another input size (both sides).
After each training repeat the same side's data path runs alone (no model) for as many batches: ours with the
``ZooClassifier`` resize, theirs as the loader gives them.

Where this differs from the example: its DataLoader takes the default ``num_workers=0`` (the transforms then run in
the training process), here both sides get ``--num_workers``; it resizes bilinearly (``RandomResizedCrop``'s
default), ours with the model's own interpolation (bicubic for timm's models); neither side goes through
``accelerator.prepare`` (``loop_overhead.py`` measures that), and AdamW here decays every parameter on both sides
(the example exempts biases and LayerNorm weights; the trainer all one-dimensional ones). The two augmentations
differ by design: RandomResizedCrop (scale 0.08-1) of the full image, against a padded 32x32 crop and flip.

    python benchmarks/hub_model_data_path.py --model mobilenetv3_small_050 mobilenetv3_small_050@112 [--dataset DIR]
    python benchmarks/hub_model_data_path.py --quick      # 256 images, seconds: runs end to end, no result
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import datasets
import timm
import torch
import torchvision
from accelerate import Accelerator
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

from cifar_accel.build import load_run_data
from cifar_accel.config import TrainConfig
from cifar_accel.zoo import InputSpec

TARGET = 1.5  # ours over the transformers example's data path
SETTINGS_RECORDED = ("dataset", "batch_size", "num_workers", "train_images", "warmup_steps", "steps", "repeats")
MODULES = (torch, torchvision, timm, datasets)  # versions printed
OURS = "ours, torch loader (uint8 32x32 in workers + batched resize)"
OURS_DEVICE = "ours, device loader (whole split as uint8 32x32, no workers + batched resize)"
THEIRS = "transformers example (PIL RandomResizedCrop in workers)"
OUR_SIDES = (OURS, OURS_DEVICE)


class ExamplePreprocessing:
    """The example's ``preprocess_train``: the torchvision transforms on each (RGB) PIL image of a batch."""

    def __init__(self, image_column: str, size: int, mean: list[float], std: list[float]):
        self.image_column = image_column
        self.transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])

    def __call__(self, example_batch: dict) -> dict:
        example_batch["pixel_values"] = [
            self.transforms(image.convert("RGB")) for image in example_batch[self.image_column]
        ]
        return example_batch


class ExampleCollate:
    """The example's ``collate_fn`` (its label column is ``labels``; here it is the dataset's)."""

    def __init__(self, label_column: str):
        self.label_column = label_column

    def __call__(self, examples: list[dict]) -> dict:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example[self.label_column] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}


def example_loader(data, size: int, mean: list[float], std: list[float], batch_size: int, workers: int) -> DataLoader:
    train_dataset = data.train.with_transform(ExamplePreprocessing(data.image_column, size, mean, std))
    return DataLoader(
        train_dataset, shuffle=True, collate_fn=ExampleCollate(data.label_column), batch_size=batch_size,
        num_workers=workers,
    )  # fmt: skip


def as_pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch


def timed_repeat(model, optimizer, loader, warmup_steps: int, steps: int, device: torch.device) -> dict:
    """One fresh epoch: ``warmup_steps`` untimed, then ``steps`` timed; images/s and the share of the time spent
    waiting for the loader."""
    model.train()
    batches = iter(loader)
    images, waited, start = 0, 0.0, 0.0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            images, waited, start = 0, 0.0, time.perf_counter()
        asked = time.perf_counter()
        inputs, labels = as_pair(next(batches))
        waited += time.perf_counter() - asked
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del batches  # ends the epoch's workers before the other side starts its own
    return {"images_per_second": images / seconds, "data_wait_share": waited / seconds, "seconds": seconds}


def data_path_repeat(loader, prepare, warmup_steps: int, steps: int, device: torch.device) -> float:
    """Images/s of the data path alone, no model: the loader's batches, as the network's first layer gets them
    (``prepare``: ours resized as ``ZooClassifier`` resizes them), counted as ``timed_repeat`` counts steps."""
    batches = iter(loader)
    images, start = 0, 0.0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            images, start = 0, time.perf_counter()
        inputs, labels = as_pair(next(batches))
        prepare(inputs.to(device, non_blocking=True))
        images += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del batches
    return images / seconds


def zoo_resize(spec: InputSpec):
    """``ZooClassifier.forward``'s resize, without the network."""
    side = spec.side

    def resize(images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (side, side):
            return images
        return F.interpolate(images, size=(side, side), mode=spec.interpolation, align_corners=False, antialias=True)

    return resize


def parse_row(text: str) -> tuple[str, int | None]:
    name, _, size = text.partition("@")
    return name, int(size) if size else None


def measure_row(model_text: str, args, accelerator: Accelerator, folder: Path) -> dict:
    name, image_size = parse_row(model_text)
    torch.manual_seed(0)
    timm.models.save_for_hf(
        timm.create_model(name, pretrained=False, num_classes=10), str(folder), safe_serialization=True
    )
    config = TrainConfig(
        dataset=args.dataset, model=f"local-dir:{folder}", pretrained=False, image_size=image_size,
        max_train_samples=args.train_images, max_eval_samples=args.batch_size, batch_size=args.batch_size,
        num_workers=args.num_workers, optimizer="adamw",
    )  # fmt: skip
    config.validate()
    data, our_loader, _, zoo = load_run_data(config, accelerator, None)
    # The trainer's fast path: the split on the accelerator, each batch cropped and flipped by a few tensor ops.
    _, device_loader, _, _ = load_run_data(dataclasses.replace(config, data_loader="device"), accelerator, None)
    spec = zoo.spec
    their_loader = example_loader(data, spec.side, spec.mean, spec.std, args.batch_size, args.num_workers)
    needed = args.warmup_steps + args.steps
    if len(our_loader) < needed:
        sys.exit(f"{len(data.train)} images make {len(our_loader)} batches of {args.batch_size}; {needed} are needed")
    theirs = copy.deepcopy(zoo.network)  # the bare timm network, the same initial weights
    sides = {
        OURS: (zoo.to(accelerator.device), our_loader),
        OURS_DEVICE: (copy.deepcopy(zoo).to(accelerator.device), device_loader),
        THEIRS: (theirs.to(accelerator.device), their_loader),
    }
    optimizers = {side: torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05) for side, (model, _) in
                  sides.items()}  # fmt: skip
    prepare = {OURS: zoo_resize(spec), OURS_DEVICE: zoo_resize(spec), THEIRS: lambda images: images}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        order = list(sides)[repeat % len(sides) :] + list(sides)[: repeat % len(sides)]  # each side first in turn
        for side in order:
            model, loader = sides[side]
            outcome = timed_repeat(model, optimizers[side], loader, args.warmup_steps, args.steps, accelerator.device)
            with torch.no_grad():
                outcome["data_path_images_per_second"] = data_path_repeat(
                    loader, prepare[side], args.warmup_steps, args.steps, accelerator.device
                )
            runs[side].append(outcome)
        print(
            f"{name} at {spec.side}, repeat {repeat + 1}: "
            + ", ".join(
                f"{side} {runs[side][-1]['images_per_second']:,.1f} img/s "
                f"(data path alone {runs[side][-1]['data_path_images_per_second']:,.0f})"
                for side in sides
            ),
            flush=True,
        )
    rates = {side: [run["images_per_second"] for run in outcomes] for side, outcomes in runs.items()}
    per_repeat = {
        side: [mine / other for mine, other in zip(rates[side], rates[THEIRS], strict=True)] for side in OUR_SIDES
    }
    return {
        "model": name,
        "input_size": spec.side,
        "interpolation": spec.interpolation,
        "mean": spec.mean,
        "std": spec.std,
        "parameters": sum(parameter.numel() for parameter in theirs.parameters()),
        "train_images": len(data.train),
        "runs": runs,
        "summary": {side: summarised(values, runs[side]) for side, values in rates.items()},
        "ratio_of_means": {side: statistics.fmean(rates[side]) / statistics.fmean(rates[THEIRS]) for side in OUR_SIDES},
        "ratio_per_repeat": per_repeat,
        "ratio_median_per_repeat": {side: statistics.median(per_repeat[side]) for side in OUR_SIDES},
    }


def summarised(values: list[float], runs: list[dict]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "data_wait_share": statistics.fmean(run["data_wait_share"] for run in runs),
        "data_path_images_per_second": statistics.fmean(run["data_path_images_per_second"] for run in runs),
    }


def spread(summary: dict) -> str:
    stdev = f" ± {summary['stdev']:,.1f}" if summary["stdev"] is not None else ""
    return f"{summary['mean']:,.1f}{stdev} ({summary['min']:,.1f}–{summary['max']:,.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=os.environ.get("CIFAR10_DIR", "../shared/cifar10"))
    parser.add_argument(
        "--model", nargs="+", default=["mobilenetv3_small_050"],
        help="timm architecture(s), one row each; NAME@SIZE trains at another input size",
    )  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers, each side")
    parser.add_argument("--train_images", type=int, default=2048, help="a random subset (seed 0) of the train split")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps at the start of each repeat")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=6, help="repeats per side, alternating")
    parser.add_argument("--json", help="also write the figures, settings and versions to this file")
    parser.add_argument("--quick", action="store_true", help="256 images, batch 8, 1+3 steps, 2 repeats: no result")
    args = parser.parse_args()
    if args.quick:
        args.train_images, args.batch_size, args.warmup_steps, args.steps, args.repeats = 256, 8, 1, 3, 2
    args.dataset = os.path.abspath(args.dataset)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as folders:
        for index, model_text in enumerate(args.model):
            rows.append(measure_row(model_text, args, accelerator, Path(folders) / f"model{index}"))
    load_after = os.getloadavg()

    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu"
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/hub_model_data_path.py", *sys.argv[1:]]),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": device,
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        },
        "versions": {
            "python": platform.python_version(),
            **{module.__name__: module.__version__ for module in MODULES},
        },
        "settings": {key: getattr(args, key) for key in SETTINGS_RECORDED} | {"quick": args.quick},
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")

    versions = ", ".join(f"{module} {version}" for module, version in record["versions"].items())
    print(f"\n{record['date']}, {record['machine']['processor']}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, {device}; {versions}")  # fmt: skip
    print(f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; command: {record['command']}")
    print(
        f"batch {args.batch_size}, {args.num_workers} workers each, {args.warmup_steps} untimed + {args.steps} timed "
        f"steps per repeat, {args.repeats} alternating repeats per side; random weights, AdamW"
    )
    print(
        "| model | input | side | training images/s, mean ± stdev (min–max) | waiting for data | "
        "ours / theirs: ratio of means (median, range per repeat) | target | data path alone, images/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for side, summary in row["summary"].items():
            cells = "baseline | "
            if side in OUR_SIDES:
                low, high = min(row["ratio_per_repeat"][side]), max(row["ratio_per_repeat"][side])
                median = row["ratio_median_per_repeat"][side]
                cells = f"{row['ratio_of_means'][side]:.2f}x ({median:.2f}x, {low:.2f}–{high:.2f}) | >= {TARGET:.1f}x"
            print(
                f"| {row['model']} | {row['input_size']} | {side} | {spread(summary)} | "
                f"{summary['data_wait_share']:.0%} | {cells} | {summary['data_path_images_per_second']:,.0f} |"
            )
    for row in rows:
        for side, ratio in row["ratio_of_means"].items():
            verdict = "meets" if ratio >= TARGET else "misses"
            print(f"{row['model']} at {row['input_size']}, {side}: ratio {ratio:.2f} ({verdict} the {TARGET}x target)")


if __name__ == "__main__":
    main()
