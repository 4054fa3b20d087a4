"""The device loader against the torchvision path: same augmentation statistics, exact evaluation."""

from collections import Counter

import pytest
import torch

from cifar_accel.augment import DecodedImages, reflect_pad
from cifar_accel.config import TrainConfig
from cifar_accel.data import decode_split, load_data, make_dataloader
from cifar_accel.device_data import DeviceImageDataset, make_device_dataloader

SIDE = 32


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(tmp_path / "cache"))


def coordinate_images(count: int) -> torch.Tensor:
    """Channel 0 holds 7 x row, channel 1 holds 7 x column: a crop reveals its offset and flip."""
    rows = torch.arange(SIDE).view(SIDE, 1).expand(SIDE, SIDE) * 7
    columns = torch.arange(SIDE).view(1, SIDE).expand(SIDE, SIDE) * 7
    image = torch.stack([rows, columns, torch.zeros(SIDE, SIDE, dtype=torch.int64)]).to(torch.uint8)
    return image.expand(count, 3, SIDE, SIDE).contiguous()


def offsets_and_flips(images: torch.Tensor) -> tuple[list[tuple[int, int]], list[bool]]:
    """Read back each crop's (row, column) shift from the coordinate images, in pixels (-4..4)."""
    row_shift = (images[:, 0, 16, 16] / 7 - 16).round().int().tolist()
    flipped = (images[:, 1, 16, 17] < images[:, 1, 16, 16]).tolist()
    centre_column = images[:, 1, 16, 16] / 7
    column_shift = [
        round(c - 16) if not f else round(c - 15) for c, f in zip(centre_column.tolist(), flipped, strict=True)
    ]
    return list(zip(row_shift, column_shift, strict=True)), flipped


def device_batch(images: torch.Tensor, **options) -> torch.Tensor:
    dataset = DeviceImageDataset(
        images, torch.zeros(len(images), dtype=torch.int64), [0, 0, 0], [1, 1, 1], True, **options
    )
    batch, _ = dataset.__getitems__(list(range(len(images))))
    return (batch * 255).round().to(torch.uint8)


def test_translations_and_flips_cover_every_shift_evenly():
    offsets, flipped = offsets_and_flips(device_batch(coordinate_images(3600), seed=0))
    for axis in (0, 1):
        counts = Counter(offset[axis] for offset in offsets)
        assert sorted(counts) == list(range(-4, 5))  # every shift of up to 4 pixels, none beyond
        assert all(300 <= count <= 500 for count in counts.values())  # 400 expected for each
    assert 0.45 <= sum(flipped) / len(flipped) <= 0.55


@pytest.mark.parametrize("options", [{}, {"cutout": 8}, {"alternating_flip": True, "crop_padding": 2}])
def test_the_torchvision_path_gives_the_device_loaders_images_for_the_same_seed_and_epoch(options):
    images = torch.randint(0, 256, (300, 3, SIDE, SIDE), dtype=torch.uint8)
    labels = torch.arange(300)
    per_image = DecodedImages(images, labels, True, seed=5, **options)
    batched = DeviceImageDataset(images, labels, [0] * 3, [1] * 3, True, seed=5, **options)
    for epoch in (0, 3):
        per_image.set_epoch(epoch)
        batched.set_epoch(epoch)
        expected = (batched.__getitems__(list(range(300)))[0] * 255).round().to(torch.uint8)
        assert torch.equal(torch.stack([per_image[index][0] for index in range(300)]), expected)


def test_reflect_padding_matches_torch():
    images = torch.randint(0, 256, (4, 3, SIDE, SIDE), dtype=torch.uint8)
    expected = torch.nn.functional.pad(images.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    assert torch.equal(reflect_pad(images, 4), expected)


def test_augmentation_is_per_example_reproducible_and_changes_each_epoch():
    images = torch.randint(0, 256, (64, 3, SIDE, SIDE), dtype=torch.uint8)
    labels = torch.arange(64)
    dataset = DeviceImageDataset(images, labels, [0.5] * 3, [0.25] * 3, train=True, cutout=8, seed=3)
    first, first_labels = dataset.__getitems__([5, 9, 20])
    # The same example looks the same whichever batch fetches it, and in a fresh copy with the same seed.
    alone, _ = dataset.__getitems__([9])
    assert torch.equal(first[1], alone[0]) and first_labels.tolist() == [5, 9, 20]
    again = DeviceImageDataset(images, labels, [0.5] * 3, [0.25] * 3, train=True, cutout=8, seed=3)
    assert torch.equal(again.__getitems__([5, 9, 20])[0], first)
    other_seed = DeviceImageDataset(images, labels, [0.5] * 3, [0.25] * 3, train=True, cutout=8, seed=4)
    assert not torch.equal(other_seed.__getitems__([5, 9, 20])[0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset.__getitems__([5, 9, 20])[0], first)
    assert first.dtype == torch.float32 and first.shape == (3, 3, SIDE, SIDE)


def test_alternating_flip_flips_each_image_in_exactly_one_of_two_epochs():
    images = coordinate_images(400)
    dataset = DeviceImageDataset(
        images, torch.zeros(400, dtype=torch.int64), [0] * 3, [1] * 3, True, alternating_flip=True
    )
    flips = []
    for epoch in (0, 1, 2):
        dataset.set_epoch(epoch)
        batch = (dataset.__getitems__(list(range(400)))[0] * 255).round().to(torch.uint8)
        flips.append(torch.tensor(offsets_and_flips(batch)[1]))
    assert torch.equal(flips[0], ~flips[1]) and torch.equal(flips[0], flips[2])
    assert 0.4 <= flips[0].float().mean() <= 0.6


def test_cutout_erases_a_square_to_black():
    images = torch.full((200, 3, SIDE, SIDE), 200, dtype=torch.uint8)
    erased = device_batch(images, cutout=8)
    zeros_per_image = (erased[:, 0] == 0).sum(dim=(1, 2))
    assert zeros_per_image.max() == 64 and zeros_per_image.min() >= 16  # 8x8, clipped at the border


def test_batches_match_the_torch_loader_for_evaluation(colour_dataset):
    data = load_data(TrainConfig(dataset=str(colour_dataset)))
    device_loader = make_device_dataloader(data.evaluation, data, False, 32, torch.device("cpu"))
    torch_loader = make_dataloader(data.evaluation, data, False, 32, num_workers=0)
    for (device_images, device_labels), (torch_images, torch_labels) in zip(device_loader, torch_loader, strict=True):
        assert device_images.shape == torch_images.shape and device_images.dtype == torch.float32
        assert torch.allclose(device_images, torch_images, atol=1e-5) and torch.equal(device_labels, torch_labels)
    train_images, train_labels = next(iter(make_device_dataloader(data.train, data, True, 64, torch.device("cpu"))))
    assert train_images.shape == (64, 3, SIDE, SIDE) and train_labels.dtype == torch.int64


def test_decoded_split_is_cached_under_the_dataset_fingerprint(colour_dataset, tmp_path):
    data = load_data(TrainConfig(dataset=str(colour_dataset)))
    images, labels = decode_split(data.train, "img", "label")
    assert images.shape == (256, 3, SIDE, SIDE) and images.dtype == torch.uint8 and labels.tolist()[:4] == [0, 1, 2, 3]
    cache_files = sorted(path.name for path in (tmp_path / "cache").iterdir())  # train and test, both decoded
    assert len(cache_files) == 2 and any(data.train._fingerprint in name for name in cache_files)
    cached_images, _ = decode_split(data.train, "img", "label")
    assert torch.equal(cached_images, images)
