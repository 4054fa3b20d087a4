"""Images/s of one augmented training epoch: the seeds' classic pipeline against ours.

(a) classic: a torchvision.datasets-style dataset (uint8 HWC arrays -> PIL image per item) with
    transforms.Compose(RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize) and a
    DataLoader with 2 workers, as the seed projects train;
(b) ours, standard: ``datasets`` + transforms.v2 in DataLoader workers (``--data_loader torch``);
(c) ours, device loader on the CPU (``--data_loader device``);
then, per learned policy (AutoAugment's CIFAR-10 policy, RandAugment), the classic pipeline with the
policy inserted after RandomCrop/RandomHorizontalFlip against (b) with ``auto_augment`` set, the
two taking turns epoch by epoch (on the first ``--policy_images``). All run in this one process on the
same images, batch size and 2 workers.

    python benchmarks/data_throughput.py --dataset ../shared/cifar10 [--quick]
"""

import argparse
import statistics
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from cifar_accel.config import TrainConfig
from cifar_accel.data import load_data, make_dataloader, measure_loader_throughput
from cifar_accel.device_data import make_device_dataloader

TARGETS = {"(b) datasets + transforms.v2": 1.0, "(c) device loader, CPU": 10.0}
POLICY_TARGET = 1.5  # ours over the classic pipeline, with the same policy
# --auto_augment name: the classic (v1, PIL) transform with the same policy.
CLASSIC_POLICIES = {
    "cifar10": lambda: transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10),
    "randaugment": transforms.RandAugment,
}
WORKERS = 2


class ClassicCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: array -> PIL image -> transforms."""

    def __init__(self, images_hwc, labels, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def images_per_second(loader, passes: int) -> float:
    """Best of ``passes`` full epochs, after one warm-up batch (worker start-up is not counted)."""
    measure_loader_throughput(loader, max_batches=1)
    return max(measure_loader_throughput(loader) for _ in range(passes))


def classic_transform(mean: list[float], std: list[float], policy=None) -> transforms.Compose:
    """The seeds' per-image PIL pipeline; a policy goes after crop and flip, as in the literature."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        *([policy] if policy is not None else []),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip


def classic_loader(classic: ClassicCifar, batch_size: int) -> DataLoader:
    return DataLoader(classic, batch_size=batch_size, shuffle=True, num_workers=WORKERS, persistent_workers=True)


def measure(pipelines: dict, passes: int) -> dict[str, float]:
    rates = {}
    for name, loader in pipelines.items():
        rates[name] = images_per_second(loader, passes)
        print(f"{name}: {rates[name]:,.0f} images/s", flush=True)
    return rates


def alternating_rates(first, second, rounds: int) -> list[tuple[float, float]]:
    """One epoch of each per round, the two loaders taking turns: a change in the machine's load
    (another job on these shared cores) then falls on both rather than on whichever ran last."""
    for loader in (first, second):
        measure_loader_throughput(loader, max_batches=1)
    return [(measure_loader_throughput(first), measure_loader_throughput(second)) for _ in range(rounds)]


def policy_rates(data, images_hwc, labels: list[int], batch_size: int, rounds: int) -> dict[str, list[tuple]]:
    """Per policy, per round: (classic images/s, ours images/s)."""
    rates = {}
    for policy, make_classic_policy in CLASSIC_POLICIES.items():
        classic = ClassicCifar(images_hwc, labels, classic_transform(data.mean, data.std, make_classic_policy()))
        ours = make_dataloader(data.train, data, True, batch_size, num_workers=WORKERS, auto_augment=policy)
        rates[policy] = alternating_rates(classic_loader(classic, batch_size), ours, rounds)
        rounds_text = ", ".join(f"{theirs:,.0f} / {mine:,.0f}" for theirs, mine in rates[policy])
        print(f"classic / ours + {policy}, images/s by round: {rounds_text}", flush=True)
    return rates


def print_tables(rates: dict[str, float], count: int, batch_size: int, passes: int) -> None:
    baseline = rates["(a) classic PIL + Compose"]
    print(f"{count:,} training images, batch {batch_size}, {WORKERS} workers, best of {passes} epoch(s)")
    print("| pipeline | images/s | vs (a) | target |\n|---|---|---|---|")
    for name, rate in rates.items():
        target = f">= {TARGETS[name]:.1f}x" if name in TARGETS else "baseline"
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x | {target} |")


def print_policy_table(policies: dict[str, list[tuple]], count: int) -> None:
    rounds = len(next(iter(policies.values())))
    print(f"\n{count:,} training images, {WORKERS} workers each, best of {rounds} alternating round(s)")
    print(
        "| policy | classic PIL + policy, images/s | ours (`--auto_augment`), images/s | ours / classic | "
        "median ratio of a round | target |"
    )
    print("|---|---|---|---|---|---|")
    for policy, by_round in policies.items():
        classic, ours = (max(rates) for rates in zip(*by_round, strict=True))
        median = statistics.median(mine / theirs for theirs, mine in by_round)
        print(
            f"| {policy} | {classic:,.0f} | {ours:,.0f} | {ours / classic:.2f}x | {median:.2f}x | "
            f">= {POLICY_TARGET:.1f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/cifar10")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--passes", type=int, default=2, help="epochs per pipeline; the best counts")
    parser.add_argument("--policy_images", type=int, default=10_000, help="images per epoch in the policy rows")
    parser.add_argument("--policy_rounds", type=int, default=5, help="alternating epochs per policy; the best counts")
    parser.add_argument(
        "--quick", action="store_true", help="5,000 images and one pass; 2,000 and one round per policy"
    )
    args = parser.parse_args()
    if args.quick:
        samples, passes, policy_images, rounds = 5000, 1, 2000, 1
    else:
        samples, passes, policy_images, rounds = None, args.passes, args.policy_images, args.policy_rounds

    data = load_data(TrainConfig(dataset=args.dataset))
    data.train = data.train.select(range(min(samples or len(data.train), len(data.train))))
    images, labels = data.decoded(data.train)
    images_hwc, labels = images.permute(0, 2, 3, 1).numpy(), labels.tolist()
    classic = ClassicCifar(images_hwc, labels, classic_transform(data.mean, data.std))
    start = time.perf_counter()
    device_loader = make_device_dataloader(data.train, data, True, args.batch_size, torch.device("cpu"))
    device_start_seconds = time.perf_counter() - start  # load_data above already filled the decode cache
    pipelines = {
        "(a) classic PIL + Compose": classic_loader(classic, args.batch_size),
        "(b) datasets + transforms.v2": make_dataloader(data.train, data, True, args.batch_size, num_workers=WORKERS),
        "(c) device loader, CPU": device_loader,
    }
    rates = measure(pipelines, passes)
    # The policies are ~10x slower per image: fewer images, and more turns to even out the load.
    policy_count = min(policy_images, len(data.train))
    data.train = data.train.select(range(policy_count))
    policies = policy_rates(data, images_hwc[:policy_count], labels[:policy_count], args.batch_size, rounds)

    print(f"\ndevice loader ready from the decoded-image cache in {device_start_seconds:.2f} s")
    print_tables(rates, len(images_hwc), args.batch_size, passes)
    print_policy_table(policies, policy_count)


if __name__ == "__main__":
    main()
