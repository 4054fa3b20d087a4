"""``make_dataloader`` wraps one split in a ``DataLoader`` whose torchvision ``transforms.v2`` pipeline runs on
the fly in worker processes; and how those workers are started, stopped and timed."""

import atexit
import multiprocessing
import os
import signal
import time

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from cifar_accel.augment import DecodedImages, erase_colour
from cifar_accel.data.loading import DataBundle
from cifar_accel.errors import STOP_SIGNALS
from cifar_accel.saved_model import preprocessing


def make_dataloader(
    dataset: Dataset,
    data: DataBundle,
    train: bool,
    batch_size: int,
    num_workers: int,
    cutout: int = 0,
    seed: int = 0,
    channels_last: bool = False,
    crop_padding: int = 4,
    alternating_flip: bool = False,
    drop_last: bool = False,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
) -> DataLoader:
    """Batches of ``(images, labels)``; augmentation runs per image in the workers, on the fly.

    ``auto_augment`` (a ``config.AUTO_AUGMENT`` policy) and ``random_erasing`` (a probability) apply
    to training images only. Erasing runs on uint8 images, before ``BatchCollator`` normalises the
    batch; v2 ``RandomErasing``'s default fill of 0 would there mean black, not the 0 it gives after
    ``Normalize`` (where its documentation places it), so it fills with the training mean colour.
    """
    images, labels = data.decoded(dataset)
    split = DecodedImages(
        images, labels, train, crop_padding, cutout, alternating_flip, seed,
        auto_augment=auto_augment, random_erasing=random_erasing, erase_value=erase_colour(data.mean),
    )  # fmt: skip
    return DataLoader(
        split,
        batch_size=batch_size,
        shuffle=train,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # Workers start afresh each epoch, so they copy the dataset with that epoch's draws.
        persistent_workers=False,
        collate_fn=BatchCollator(data.mean, data.std, channels_last),
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_leave_signals_to_the_main_process,
    )


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C, SIGTERM and SLURM's SIGUSR1 often reach a whole process group; a worker they killed would make the
    main process fail before it could save a checkpoint. Workers exit when the main process is done."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit handler (torch imports it first): runs before it
def _end_loader_workers() -> None:
    """A run stopped by a signal can reach the interpreter's exit with a loader's workers still waiting for work.
    multiprocessing would end them with SIGTERM, which they ignore, and then wait for them forever; they hold
    nothing that needs saving, so they are killed, and the process exits."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


class BatchCollator:
    """Stack a batch's uint8 images, then scale and normalise them in one go.

    Normalising the batch rather than each image: the same v2 arithmetic, a fraction of the calls.
    """

    def __init__(self, mean: list[float], std: list[float], channels_last: bool = False):
        self.normalize = preprocessing(mean, std)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, examples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in examples])
        labels = torch.tensor([label for _, label in examples])
        return self.normalize(images).contiguous(memory_format=self.memory_format), labels


def first_images(dataset: Dataset, data: DataBundle, count: int) -> torch.Tensor:
    """The first ``count`` images of a split, normalised and not augmented (e.g. for whitening)."""
    images, _ = data.decoded(dataset)
    return BatchCollator(data.mean, data.std).normalize(images[:count])


def default_num_workers(num_processes: int) -> int:
    """Share the machine's cores between the processes' loaders; more than 8 rarely helps."""
    return max(1, min(8, (os.cpu_count() or 1) // num_processes))


def measure_loader_throughput(loader: DataLoader, max_batches: int | None = None) -> float:
    """Images per second of the loader alone (no model), over one pass or ``max_batches``."""
    images = 0
    start = time.perf_counter()
    for index, (batch, _) in enumerate(loader):
        images += len(batch)
        if max_batches is not None and index + 1 >= max_batches:
            break
    return images / (time.perf_counter() - start)
