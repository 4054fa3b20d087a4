"""A split's images decoded once to uint8 tensors, then read back from an on-disk cache (``CIFAR_ACCEL_CACHE``,
else ``~/.cache/cifar_accel``), written atomically."""

import os
import sys
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Image
from safetensors.torch import load_file, save_file

from cifar_accel.config import IMAGE_SIDE
from cifar_accel.errors import UserError
from cifar_accel.files import describe_os_error, remove_abandoned_temporaries, write_atomically
from cifar_accel.images import DECODING_VERSION, open_image, resized, to_rgb


def cache_directory() -> Path:
    return Path(os.environ.get("CIFAR_ACCEL_CACHE", Path.home() / ".cache" / "cifar_accel"))


def _cache_file(dataset: Dataset, image_column: str, label_column: str, resize_to: int | None) -> Path:
    # The key holds everything that changes the decoded tensors, so that a stale file is never read.
    resizing = f"-{resize_to}px" if resize_to else ""
    return cache_directory() / (
        f"{dataset._fingerprint}-{image_column}-{label_column}-rgb{DECODING_VERSION}{resizing}.safetensors"
    )


def _decode(encoded: dict | None, where: str, resize_to: int | None) -> torch.Tensor:
    if encoded is None or (encoded.get("bytes") is None and encoded.get("path") is None):
        raise UserError(f"{where} is missing (null); fix or drop that row")
    with open_image(encoded["bytes"] if encoded.get("bytes") is not None else encoded["path"], where) as image:
        if resize_to is None and image.size != (IMAGE_SIDE, IMAGE_SIDE):  # from the header: nothing decoded yet
            raise UserError(
                f"images must be {IMAGE_SIDE}x{IMAGE_SIDE} pixels; {where} is {image.width}x{image.height} "
                "(width x height; train with --image_size N to resize every image to NxN)"
            )
        pixels = torch.from_numpy(np.asarray(to_rgb(image, where)).copy()).permute(2, 0, 1)
    return pixels if resize_to is None else resized(pixels, resize_to, resize_to)


def decode_split(
    dataset: Dataset, image_column: str, label_column: str, split_name: str = "", resize_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 3, H, W], labels int64 [N])``, decoded once and then read from the cache."""
    return decode_splits([(dataset, split_name)], image_column, label_column, resize_to)[0]


_UNCACHED: list[Path] = []  # cache files that could not be written; the note is printed once


def decode_splits(
    splits: list[tuple[Dataset, str]], image_column: str, label_column: str, resize_to: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each ``(split, its name)`` decoded, every one before any is cached: a row refused in the last
    leaves no cache file of the first behind. The name is only for messages."""
    decoded, to_cache = [], []
    for dataset, split_name in splits:
        path = _cache_file(dataset, image_column, label_column, resize_to)
        if path.is_file():
            tensors = load_file(str(path))
        else:
            tensors = _decode_rows(dataset, image_column, label_column, split_name, resize_to)
            to_cache.append((path, tensors))
        decoded.append((tensors["images"], tensors["labels"]))
    for path, tensors in to_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned_temporaries(path.parent)
            write_atomically(path, lambda temporary, tensors=tensors: save_file(tensors, str(temporary)))
        except OSError as error:  # a cache that cannot be written costs time next run, not this run
            if not _UNCACHED:
                print(f"note: decoded images are not cached ({describe_os_error(error)})", file=sys.stderr)
            _UNCACHED.append(path)
    return decoded


def _decode_rows(
    dataset: Dataset, image_column: str, label_column: str, split_name: str, resize_to: int | None
) -> dict[str, torch.Tensor]:
    raw = dataset.cast_column(image_column, Image(decode=False)).select_columns([image_column, label_column])
    # Rows are named as in the split the user has (before a shuffled hold-out or selection reordered them).
    source_rows = dataset._indices.column(0).to_numpy() if dataset._indices is not None else None
    of_split = f" of split {split_name!r}" if split_name else ""
    images, labels = [], []
    for batch in raw.iter(batch_size=1000):
        for encoded, label in zip(batch[image_column], batch[label_column], strict=True):
            index = len(images)
            row = int(source_rows[index]) if source_rows is not None else index
            if label is None:
                raise UserError(f"the label in row {row}{of_split} is missing (null); fix or drop that row")
            images.append(_decode(encoded, f"the image in row {row}{of_split}", resize_to))
            labels.append(label)
    return {
        "images": torch.stack(images),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
