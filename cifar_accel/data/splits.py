"""A split's columns, classes and labels, checked with clear errors, and the random subsets of
--max_train_samples/--max_eval_samples."""

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Image

from cifar_accel.errors import UserError

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "fine_label", "labels")


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


def get_split(splits: DatasetDict, name: str) -> Dataset:
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
