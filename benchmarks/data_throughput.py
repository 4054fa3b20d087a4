"""Images/s of one augmented training epoch: the seeds' classic pipeline against ours.

(a) classic: a torchvision.datasets-style dataset (uint8 HWC arrays -> PIL image per item) with
    transforms.Compose(RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize) and a
    DataLoader with 2 workers, as the seed projects train;
(b) ours, standard: ``datasets`` + transforms.v2 in DataLoader workers (``--data_loader torch``);
(c) ours, device loader on the CPU (``--data_loader device``).
All three run in this one process, one after the other, on the same images and batch size.

    python benchmarks/data_throughput.py --dataset ../shared/cifar10 [--quick]
"""

import argparse
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from cifar_accel.config import TrainConfig
from cifar_accel.data import decode_split, load_data, make_dataloader, measure_loader_throughput
from cifar_accel.device_data import make_device_dataloader

TARGETS = {"(b) datasets + transforms.v2": 1.0, "(c) device loader, CPU": 10.0}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/cifar10")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--passes", type=int, default=2, help="epochs per pipeline; the best counts")
    parser.add_argument("--quick", action="store_true", help="5,000 images and one pass")
    args = parser.parse_args()
    samples, passes = (5000, 1) if args.quick else (None, args.passes)

    data = load_data(TrainConfig(dataset=args.dataset))
    data.train = data.train.select(range(min(samples or len(data.train), len(data.train))))
    images, labels = decode_split(data.train, data.image_column, data.label_column)
    classic_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data.mean, data.std),
    ])  # fmt: skip
    classic = ClassicCifar(images.permute(0, 2, 3, 1).numpy(), labels.tolist(), classic_transform)
    start = time.perf_counter()
    device_loader = make_device_dataloader(data.train, data, True, args.batch_size, torch.device("cpu"))
    device_start_seconds = time.perf_counter() - start  # load_data above already filled the decode cache
    pipelines = {
        "(a) classic PIL + Compose": DataLoader(
            classic, batch_size=args.batch_size, shuffle=True, num_workers=2, persistent_workers=True
        ),
        "(b) datasets + transforms.v2": make_dataloader(data.train, data, True, args.batch_size, num_workers=2),
        "(c) device loader, CPU": device_loader,
    }
    rates = {}
    for name, loader in pipelines.items():
        rates[name] = images_per_second(loader, passes)
        print(f"{name}: {rates[name]:,.0f} images/s", flush=True)

    baseline = rates["(a) classic PIL + Compose"]
    print(f"\ndevice loader ready from the decoded-image cache in {device_start_seconds:.2f} s")
    print(f"{len(data.train):,} training images, batch {args.batch_size}, best of {passes} epoch(s)")
    print("| pipeline | images/s | vs (a) | target |\n|---|---|---|---|")
    for name, rate in rates.items():
        target = f">= {TARGETS[name]:.1f}x" if name in TARGETS else "baseline"
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x | {target} |")


if __name__ == "__main__":
    main()
