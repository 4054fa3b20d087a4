"""Data: a ``datasets`` split in, augmented and normalised batches out.

``load_data(config)`` resolves the dataset, its image/label columns, class names, splits
and normalisation statistics; ``make_dataloader`` wraps one split in a ``DataLoader`` whose
torchvision ``transforms.v2`` pipeline runs on the fly in worker processes.
"""

import atexit
import hashlib
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Image, load_dataset
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from cifar_accel.augment import DecodedImages, erase_colour
from cifar_accel.config import IMAGE_SIDE, TrainConfig
from cifar_accel.errors import STOP_SIGNALS, UserError
from cifar_accel.files import describe_os_error, remove_abandoned_temporaries, write_atomically
from cifar_accel.hub import looks_like_local_path
from cifar_accel.images import DECODING_VERSION, open_image, resized, to_rgb
from cifar_accel.saved_model import preprocessing

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "fine_label", "labels")
HUB_UNREACHABLE = (
    "cannot reach the Hugging Face Hub to load {name!r}: pass --dataset PATH to a local copy, "
    "or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache"
)
NOT_CACHED = (
    "{name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: pass --dataset PATH to a local copy, "
    "or unset HF_HUB_OFFLINE where the Hub can be reached"
)


@dataclass
class DataBundle:
    """The splits of one run and what a saved model must remember about them."""

    train: Dataset
    evaluation: Dataset  # evaluated after every epoch; chooses the best checkpoint
    selection_split: str  # name of the split in ``evaluation``
    test: Dataset | None  # the eval split, kept apart when a validation hold-out chooses
    image_column: str
    label_column: str
    class_names: list[str]
    mean: list[float]
    std: list[float]
    resize_to: int | None = None  # --image_size: every image resized to this side on load
    dataset_revision: str | None = None  # the Hub commit of a Hub dataset id; None for a local copy
    dataset_pretty_name: str | None = None  # the dataset card's name for people ("CIFAR-10"), if it has one

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def decoded(self, split: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """One of this bundle's splits as ``(images uint8 [N, 3, H, W], labels int64 [N])``."""
        return decode_split(split, self.image_column, self.label_column, resize_to=self.resize_to)


def _hub_is_reachable(timeout_seconds: float = 3.0) -> bool:
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_seconds).close()
        return True
    except OSError:
        return False


def _load(path: str, name: str, config_name: str | None) -> DatasetDict:
    """``load_dataset``, with a dataset of several configs and an unknown config as one-line refusals."""
    try:
        return load_dataset(path, config_name)
    except yaml.YAMLError as error:  # the dataset card's metadata, which datasets reads for the configs
        reason = " ".join(str(error).split())
        raise UserError(f"cannot read dataset {name!r}: its README.md metadata is not valid YAML ({reason})") from None
    except ValueError as error:
        message = str(error)
        if "Config name is missing" not in message and "BuilderConfig" not in message:
            raise
        configs = re.search(r"\[([^\]]*)\]", message)
        choices = configs.group(1).replace("'", "") if configs else "see the dataset's card"
        if config_name is None:
            raise UserError(
                f"dataset {name!r} has several configs; pick one with --dataset_config: {choices}"
            ) from None
        raise UserError(
            f"--dataset_config {config_name!r} is not a config of {name!r}; choose one of: {choices}"
        ) from None


def load_dataset_dict(name: str, config_name: str | None = None) -> DatasetDict:
    """Open a Hub id (with one of its configs), a local copy in the Hub layout, or a local image folder."""
    from huggingface_hub import constants

    from cifar_accel.redaction import redact, redact_log_records

    redact_log_records()  # the Hub client's warnings name the URLs it retries

    path = os.path.expanduser(name)
    if os.path.exists(path):
        try:
            return _load(path, name, config_name)
        except UserError:
            raise
        except (FileNotFoundError, ValueError) as error:
            raise UserError(f"cannot read a dataset from {name!r}: {str(error).splitlines()[0]}") from None
    if looks_like_local_path(name):  # not on disk, and not a Hub id
        raise UserError(f"dataset path {name!r} does not exist; pass --dataset a Hub id or an existing folder")
    offline = constants.HF_HUB_OFFLINE
    # Checked first because the Hub client retries for ~25 s before it gives up.
    if not offline and not _hub_is_reachable():
        raise UserError(HUB_UNREACHABLE.format(name=name))
    try:
        return _load(name, name, config_name)
    except ConnectionError:
        raise UserError((NOT_CACHED if offline else HUB_UNREACHABLE).format(name=name)) from None
    except FileNotFoundError as error:  # DatasetNotFoundError is a FileNotFoundError
        raise UserError(redact(f"dataset {name!r} not found on the Hub or on disk ({error})")) from None


def hub_revision(name: str, split: Dataset) -> str | None:
    """The Hub commit that a Hub dataset id was loaded at: ``datasets`` prepares a Hub dataset under a folder
    named by that commit, offline too (from the cache). None for a local copy, or where it cannot tell."""
    if os.path.exists(os.path.expanduser(name)) or not split.cache_files:
        return None
    folder = Path(split.cache_files[0]["filename"]).parent.name
    return folder if re.fullmatch(r"[0-9a-f]{40}", folder) else None


def pretty_name(name: str, revision: str | None) -> str | None:
    """The dataset card's ``pretty_name``: from a local copy's README.md, or for a Hub id from the card that
    loading it put in the Hugging Face cache (nothing more is downloaded). None where there is none."""
    from huggingface_hub import DatasetCard, hf_hub_download

    path = Path(os.path.expanduser(name))
    try:
        if path.exists():
            readme = path / "README.md"
        else:  # a Hub id (a missing local path was refused when the dataset was loaded)
            readme = hf_hub_download(name, "README.md", repo_type="dataset", revision=revision, local_files_only=True)
        if not Path(readme).is_file():
            return None
        value = DatasetCard.load(readme).data.pretty_name
    except (OSError, ValueError, yaml.YAMLError):  # no card, or no usable metadata: the name is only for people
        return None
    return value if isinstance(value, str) and value.strip() else None


def detect_column(dataset: Dataset, requested: str | None, candidates: tuple[str, ...], kind: str) -> str:
    columns = list(dataset.column_names)
    if requested is not None:
        if requested not in columns:
            raise UserError(f"{kind} column {requested!r} not found; columns present: {', '.join(columns)}")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise UserError(
        f"no {kind} column found (looked for {', '.join(candidates)}); columns present: {', '.join(columns)}; "
        f"name it with --{kind}_column"
    )


def image_column_of(dataset: Dataset, requested: str | None) -> str:
    """The image column, which must hold images (``datasets.Image``), not numbers or text."""
    column = detect_column(dataset, requested, IMAGE_COLUMNS, "image")
    if not isinstance(dataset.features[column], Image):
        raise UserError(
            f"image column {column!r} holds {dataset.features[column]}, not images; name the image column "
            "with --image_column"
        )
    return column


def _get_split(splits: DatasetDict, name: str) -> Dataset:
    if name not in splits:
        raise UserError(f"split {name!r} not found; splits present: {', '.join(splits)}")
    return splits[name]


SUBSET_SEED = 0  # --max_train_samples/--max_eval_samples draw the same examples for every run and command


def random_subset(dataset: Dataset, count: int | None, flag: str) -> Dataset:
    """``count`` examples drawn at random (seed ``SUBSET_SEED``), in their order in the split.

    The first rows would do only for a split stored in random order: an image folder is listed class by
    class, so its first rows are one or two classes. The seed is fixed rather than ``--seed``, so that runs
    of several seeds train on the same examples and ``cifar-accel evaluate`` scores the ones a run scored.
    """
    if count is None:
        return dataset
    if count > len(dataset):
        raise UserError(f"{flag} {count} is larger than the split ({len(dataset)} examples)")
    if count == len(dataset):
        return dataset
    rows = np.random.default_rng(SUBSET_SEED).choice(len(dataset), size=count, replace=False)
    return dataset.select(np.sort(rows))


def classes_without_examples(split: Dataset, label_column: str, class_names: list[str]) -> list[str]:
    """The classes of which ``split`` holds no example."""
    present = set(np.unique(np.asarray(split.with_format("numpy")[label_column])).tolist())
    return [name for index, name in enumerate(class_names) if index not in present]


SHOWN_DIFFERENCES = 3  # of a long list of classes, enough to see what went wrong


def class_names_of(split: Dataset, label_column: str) -> list[str]:
    """The names a ``ClassLabel`` column gives its indices; any other column (names as text, bare numbers) has
    none. The wording is ``load_data``'s, for the same problem in training."""
    feature = split.features[label_column]
    if not isinstance(feature, ClassLabel):
        raise UserError(f"label column {label_column!r} is {feature}, not a ClassLabel; class names are unknown")
    return list(feature.names)


def check_model_classes(model_names: list[str], dataset_names: list[str], where: str) -> None:
    """Refuse a dataset whose classes differ from the model's in number, in name or in order. The same names in
    another order are refused too, not remapped: the decoded labels are the dataset's indices, scored as they are."""
    if len(model_names) != len(dataset_names):
        raise UserError(f"the model predicts {len(model_names)} classes but {where} has {len(dataset_names)}")
    differences = [
        f"class {index} is {ours!r} in the model but {theirs!r} in the dataset"
        for index, (ours, theirs) in enumerate(zip(model_names, dataset_names, strict=True))
        if ours != theirs
    ]
    if not differences:
        return
    more = len(differences) - SHOWN_DIFFERENCES
    listed = ", ".join(differences[:SHOWN_DIFFERENCES]) + (f" and {more} more" if more > 0 else "")
    reordered = (
        " (the same names in another order: labels are compared as class indices, so the order must be the model's)"
        if sorted(model_names) == sorted(dataset_names)
        else ""
    )
    raise UserError(f"the model's classes are not those of {where}: {listed}{reordered}")


def check_labels(split: Dataset, label_column: str, num_classes: int, split_name: str) -> None:
    """Every label must index a class: an out-of-range one would fail deep inside the loss."""
    missing = np.flatnonzero(split.with_format("arrow")[label_column].is_null().to_numpy())
    if len(missing):
        raise UserError(
            f"the label in row {int(missing[0])} of split {split_name!r} is missing (null) ({len(missing)} such rows); "
            f"every row of column {label_column!r} needs a label from 0 to {num_classes - 1}"
        )
    labels = np.asarray(split.with_format("numpy")[label_column])
    outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(outside):
        row = int(outside[0])
        raise UserError(
            f"label {int(labels[row])} in row {row} of split {split_name!r} is outside [0, {num_classes}) "
            f"({len(outside)} such rows); labels of column {label_column!r} must be 0 to {num_classes - 1}"
        )


def compute_mean_std(images: torch.Tensor, max_images: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units over the first ``max_images`` uint8 NCHW images."""
    pixels = images[:max_images].double() / 255
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3), correction=0)
    std = std.clamp(min=1 / 255)  # a channel constant over every image would divide by zero; one grey level instead
    return [round(float(value), 4) for value in mean], [round(float(value), 4) for value in std]


def load_data(config: TrainConfig) -> DataBundle:
    """Everything ``train`` needs from the dataset, validated with clear errors."""
    splits = load_dataset_dict(config.dataset, config.dataset_config)
    train = _get_split(splits, config.train_split)
    image_column = image_column_of(train, config.image_column)
    label_column = detect_column(train, config.label_column, LABEL_COLUMNS, "label")
    class_names = class_names_of(train, label_column)
    train = random_subset(train, config.max_train_samples, "--max_train_samples")
    test = random_subset(_get_split(splits, config.eval_split), config.max_eval_samples, "--max_eval_samples")
    for split, split_name in ((train, config.train_split), (test, config.eval_split)):
        detect_column(split, image_column, (), "image")
        detect_column(split, label_column, (), "label")
        check_labels(split, label_column, len(class_names), split_name)

    evaluation, selection_split, held_out_test = test, config.eval_split, None
    if config.validation_size:
        if config.validation_size >= len(train):
            raise UserError(
                f"--validation_size {config.validation_size} leaves no training data ({len(train)} examples)"
            )
        try:
            parts = train.train_test_split(
                test_size=config.validation_size, stratify_by_column=label_column, seed=config.seed
            )
        except ValueError as error:  # a stratified split needs every class on both sides
            raise UserError(
                f"--validation_size {config.validation_size}: cannot hold out a sample stratified by class from "
                f"{len(train)} examples ({str(error).splitlines()[0]})"
            ) from None
        train, evaluation, selection_split, held_out_test = parts["train"], parts["test"], "validation", test

    named_splits = [(train, config.train_split), (evaluation, selection_split)]
    if held_out_test is not None:
        named_splits.append((held_out_test, config.eval_split))
    (train_images, _), *_ = decode_splits(named_splits, image_column, label_column, config.image_size)
    mean, std = compute_mean_std(train_images)
    return DataBundle(
        train=train,
        evaluation=evaluation,
        selection_split=selection_split,
        test=held_out_test,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        mean=mean,
        std=std,
        resize_to=config.image_size,
        dataset_revision=(revision := hub_revision(config.dataset, train)),
        dataset_pretty_name=pretty_name(config.dataset, revision),
    )


def load_evaluation_data(
    dataset: str, split: str, max_samples: int | None, image_column: str | None, label_column: str | None, saved: dict,
    dataset_config: str | None = None,
) -> DataBundle:  # fmt: skip
    """One split to evaluate a saved model on, normalised as the model was trained."""
    examples = _get_split(load_dataset_dict(dataset, dataset_config), split)
    image_column = image_column_of(examples, image_column)
    label_column = detect_column(examples, label_column, LABEL_COLUMNS, "label")
    # Scores compare class indices: they mean something only if the dataset's classes are the model's.
    where = f"{dataset} (split {split!r}, column {label_column!r})"
    check_model_classes(saved["class_names"], class_names_of(examples, label_column), where)
    examples = random_subset(examples, max_samples, "--max_eval_samples")
    return DataBundle(
        train=examples.select([]),
        evaluation=examples,
        selection_split=split,
        test=None,
        image_column=image_column,
        label_column=label_column,
        class_names=saved["class_names"],
        mean=saved["mean"],
        std=saved["std"],
        resize_to=saved.get("image_size"),  # absent from the configs of models saved before --image_size
    )


def cache_directory() -> Path:
    return Path(os.environ.get("CIFAR_ACCEL_CACHE", Path.home() / ".cache" / "cifar_accel"))


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
    resizing = f"-{resize_to}px" if resize_to else ""
    for dataset, split_name in splits:
        path = cache_directory() / (
            f"{dataset._fingerprint}-{image_column}-{label_column}-rgb{DECODING_VERSION}{resizing}.safetensors"
        )
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


def content_digest(data: DataBundle) -> str:
    """SHA-256 of the decoded training and evaluation examples: the same data under any path or copy,
    and different data under the same path, are told apart."""
    digest = hashlib.sha256()
    for split in (data.train, data.evaluation):
        images, labels = data.decoded(split)
        digest.update(images.contiguous().numpy())
        digest.update(labels.contiguous().numpy())
    return digest.hexdigest()


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
