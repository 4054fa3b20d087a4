"""Training images/s through our Accelerate loop against a bare PyTorch loop, same model and data.

Both loops get the same batches from the device loader (so data loading is not what is measured),
the same model, optimizer and schedule; they alternate round by round in this one process and the
median of each is compared. Ours is ``cifar_accel.loop.train_steps`` on prepared objects.

    python benchmarks/loop_overhead.py --dataset ../shared/cifar10 [--quick]
"""

import argparse
import copy
import statistics
import time

import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from cifar_accel.config import TrainConfig
from cifar_accel.data import load_data
from cifar_accel.device_data import make_device_dataloader
from cifar_accel.loop import DataWaitClock, NonFiniteLossWatch, train_steps
from cifar_accel.models import get_model
from cifar_accel.optim import build_optimizers, build_scheduler

TARGET = 0.97


def bare_epoch(model, loader, optimizer, scheduler, criterion) -> None:
    model.train()
    for images, labels in loader:
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/cifar10")
    parser.add_argument("--model", default="bn_cnn")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=5120, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=5, help="epochs of each loop, alternating")
    parser.add_argument("--quick", action="store_true", help="1,024 images, 2 rounds")
    args = parser.parse_args()
    samples, rounds = (1024, 2) if args.quick else (args.samples, args.rounds)

    config = TrainConfig(dataset=args.dataset, model=args.model, batch_size=args.batch_size)
    data = load_data(config)
    data.train = data.train.select(range(min(samples, len(data.train))))
    samples = len(data.train)
    accelerator = Accelerator()

    def fresh(model_template):
        model = copy.deepcopy(model_template).to(accelerator.device)
        (optimizer,) = build_optimizers(model, config)
        loader = make_device_dataloader(data.train, data, True, args.batch_size, accelerator.device)
        scheduler = build_scheduler(optimizer, config, steps_per_epoch=len(loader))
        return model, loader, optimizer, scheduler

    template = get_model(args.model, num_classes=data.num_classes)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    bare = fresh(template)
    ours = accelerator.prepare(*fresh(template))
    times = {"bare PyTorch loop": [], "cifar_accel loop (Accelerate)": []}
    for round_index in range(rounds + 1):  # round 0 warms both up and is not counted
        for name in times:
            start = time.perf_counter()
            if name == "bare PyTorch loop":
                bare_epoch(*bare, criterion)
            else:
                # What train() does per step besides the step: data-wait clock, non-finite watch, progress bar.
                model, loader, optimizer, scheduler = ours
                totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
                watch = NonFiniteLossWatch(accelerator.device)
                batches = DataWaitClock().timed(loader)
                steps = train_steps(model, batches, [optimizer], [scheduler], criterion, accelerator, totals)
                with tqdm(disable=True) as progress_bar:
                    for step, loss in enumerate(steps, start=1):
                        watch.observe(loss, step)
                        progress_bar.update(1)
            if round_index:
                times[name].append(samples / (time.perf_counter() - start))
        print(
            f"round {round_index}: " + ", ".join(f"{n} {t[-1]:,.0f} img/s" for n, t in times.items() if t), flush=True
        )

    medians = {name: statistics.median(rates) for name, rates in times.items()}
    ratio = medians["cifar_accel loop (Accelerate)"] / medians["bare PyTorch loop"]
    print(f"\n{args.model}, batch {args.batch_size}, {samples:,} images per epoch, median of {rounds} epochs each")
    print("| loop | images/s (median) | vs bare | target |\n|---|---|---|---|")
    for name, rate in medians.items():
        target = f">= {TARGET:.2f}x" if name.startswith("cifar_accel") else "baseline"
        print(f"| {name} | {rate:,.0f} | {rate / medians['bare PyTorch loop']:.3f}x | {target} |")
    print(f"ratio {ratio:.3f} ({'meets' if ratio >= TARGET else 'misses'} the {TARGET:.2f}x target)")


if __name__ == "__main__":
    main()
