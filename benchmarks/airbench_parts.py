"""Two parts of an airbench94 run, each against what it replaced, alternating round by round in one process.

- whitening: the first layer's filters from 5,000 training images, the patch covariance summed in float32
  (as now) against float64 (the same function given float64 images, as it summed before);
- evaluation: one forward pass of the evaluation images through airbench94 in eval mode, with its BatchNorm
  folded into the convolutions (``folded_for_inference``, what the timed TTA evaluation runs) against the
  network as trained. Both channels_last, float32, no autograd.

    python benchmarks/airbench_parts.py --dataset ../shared/cifar10 [--rounds 5] [--quick]
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

from cifar_accel.config import TrainConfig
from cifar_accel.data import first_images, load_data
from cifar_accel.models import get_model
from cifar_accel.models.airbench import whitening_filters


def seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/cifar10")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eval_images", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="500/200 images, 1 round: runs end to end, no result")
    args = parser.parse_args()
    train_images, eval_images, rounds = (500, 200, 1) if args.quick else (5000, args.eval_images, args.rounds)
    data = load_data(TrainConfig(dataset=args.dataset, max_train_samples=train_images, max_eval_samples=eval_images))
    whitening_input = first_images(data.train, data, count=train_images)
    batch = first_images(data.evaluation, data, count=eval_images).contiguous(memory_format=torch.channels_last)

    torch.manual_seed(0)
    model = get_model("airbench94", num_classes=data.num_classes).to(memory_format=torch.channels_last)
    for norm in (module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)):
        norm.running_mean.normal_()  # statistics as training leaves them, not the identity they start as
        norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    folded = model.folded_for_inference()
    with torch.no_grad():
        difference = (folded(batch) - model(batch)).abs().max().item()
    parts = {
        ("whitening, float64 sum", "whitening, float32 sum"): (
            lambda: whitening_filters(whitening_input.double()),
            lambda: whitening_filters(whitening_input),
        ),
        ("forward pass, BatchNorm", "forward pass, folded"): (
            torch.no_grad()(lambda: model(batch)),
            torch.no_grad()(lambda: folded(batch)),
        ),
    }
    for before, after in parts.values():  # warm-up: allocator, oneDNN primitive caches
        before(), after()
    times: dict[str, list[float]] = {name: [] for names in parts for name in names}
    for _ in range(rounds):
        for (before_name, after_name), (before, after) in parts.items():
            times[before_name].append(seconds(before))
            times[after_name].append(seconds(after))

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    sizes = f"{train_images} whitening images, {eval_images} evaluation images, {rounds} round(s)"
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d} {machine}, torch {torch.__version__}; {sizes}")
    print(f"folded logits differ from the network's by at most {difference:.1e}")
    print("| part | before, median s | after, median s | after / before |\n|---|---|---|---|")
    for before_name, after_name in parts:
        before, after = statistics.median(times[before_name]), statistics.median(times[after_name])
        print(f"| {before_name} -> {after_name} | {before:.3f} | {after:.3f} | {after / before:.3f} |")


if __name__ == "__main__":
    main()
