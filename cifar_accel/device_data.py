"""Device-resident data (``--data_loader device``): a split decoded once, kept on the accelerator.

A split is decoded a single time into one uint8 tensor, cached on disk under the dataset's
fingerprint, and moved to the device. A plain ``DataLoader`` still draws the batches, so
``accelerator.prepare`` shards them across processes and ``gather_for_metrics`` stays exact;
but each batch is fetched in one ``__getitems__`` call that augments it with a few tensor ops
instead of one Python call per image.

Augmentation parameters are drawn per example and per epoch from ``(seed, epoch)`` alone
(``draw_augmentation``, shared with the standard loader), so an example gets the same crop and
flip whichever process, batch or attempt fetches it. They move to the device once per epoch.

Fetching a batch never makes the host wait for the device: the batch's positions travel from
pinned memory without blocking, and every choice is made with tensor ops (``torch.where``, a
gather) rather than boolean-mask indexing, whose output size the host would have to read.
"""

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from cifar_accel.augment import AugmentedSplit, cutout
from cifar_accel.data import DataBundle


class DeviceImageDataset(AugmentedSplit):
    """A split on the device; ``__getitems__`` returns a normalised, augmented batch."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: list[float],
        std: list[float],
        train: bool,
        cutout: int = 0,
        alternating_flip: bool = False,
        seed: int = 0,
        channels_last: bool = False,
        crop_padding: int = 4,
    ):
        super().__init__(images, labels, train, crop_padding, cutout, alternating_flip, seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        device = images.device
        # x -> (x / 255 - mean) / std as one multiply-add in float32.
        self.scale = (1 / (255 * torch.tensor(std, device=device))).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, 3, 1, 1)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = positions_on(self.labels.device, indices)
        images = self.images[index]
        if self.train:
            images = self._augment(images, index)
        return self._normalise(images), self.labels[index]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        normalised = images.float().mul_(self.scale).add_(self.shift)
        return normalised.contiguous(memory_format=self.memory_format)

    def unaugmented(self, count: int) -> torch.Tensor:
        """The first ``count`` images, normalised and neither cropped nor flipped (airbench's whitening
        input), computed where the split lives."""
        side = self.images.shape[-1] - 2 * self.padding
        window = slice(self.padding, self.padding + side)
        return self._normalise(self.images[:count, :, window, window])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([position])
        return images[0], labels[0]

    def _augment(self, padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        batch, channels, padded_size, _ = padded.shape
        size, shifts = padded_size - 2 * self.padding, 2 * self.padding + 1
        # Every 32x32 window of each padded image as a strided view, then one gather picks each
        # example's window: a single copy for the whole batch.
        stride = padded.stride()
        windows = padded.as_strided(
            (batch, shifts, shifts, channels, size, size),
            (stride[0], stride[2], stride[3], stride[1], stride[2], stride[3]),
        )
        offsets = self.draws.offsets[index]
        images = windows[torch.arange(batch, device=padded.device), offsets[:, 0], offsets[:, 1]]
        flips = self.draws.flips[index].view(batch, 1, 1, 1)
        images = torch.where(flips, images.flip(-1), images)
        if self.cutout:
            images = cutout(images, self.draws.cutout_centres[index], self.cutout)
        return images


def positions_on(device: torch.device, indices: list[int]) -> torch.Tensor:
    """A batch's example positions on ``device``; to a GPU, copied from pinned memory without blocking
    (a plain copy from pageable memory would make the host wait for the device's queue to drain)."""
    positions = torch.as_tensor(indices)
    if device.type == "cuda":
        return positions.pin_memory().to(device, non_blocking=True)
    return positions.to(device)


def _keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def split_on_device(data: DataBundle, dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the bundle's splits decoded, as (uint8 images, labels) on ``device``."""
    images, labels = data.decoded(dataset)
    return images.to(device), labels.to(device)


def make_device_dataloader(
    dataset: Dataset,
    data: DataBundle,
    train: bool,
    batch_size: int,
    device: torch.device,
    cutout: int = 0,
    alternating_flip: bool = False,
    seed: int = 0,
    channels_last: bool = False,
    crop_padding: int = 4,
    drop_last: bool = False,
    on_device: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DataLoader:
    """Same batches as ``make_dataloader`` (shuffled when training), served from device memory. ``on_device``: the
    split's images and labels already there (several runs in one process share them)."""
    images, labels = on_device or split_on_device(data, dataset, device)
    device_dataset = DeviceImageDataset(
        images, labels, data.mean, data.std, train, cutout, alternating_flip, seed, channels_last,
        crop_padding,
    )  # fmt: skip
    return DataLoader(
        device_dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=drop_last,
        collate_fn=_keep_batch,
        generator=torch.Generator().manual_seed(seed),
    )
