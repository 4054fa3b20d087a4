"""The splits of a run (or of an evaluation) gathered in a ``DataBundle``: validated, with the class names
and the normalisation statistics that a saved model must remember."""

import hashlib
from dataclasses import dataclass

import torch
from datasets import Dataset

from cifar_accel.config import TrainConfig
from cifar_accel.data.decode_cache import decode_split, decode_splits
from cifar_accel.data.sources import hub_revision, load_dataset_dict, pretty_name
from cifar_accel.data.splits import (
    LABEL_COLUMNS,
    check_labels,
    check_model_classes,
    class_names_of,
    detect_column,
    get_split,
    image_column_of,
    random_subset,
)
from cifar_accel.errors import UserError


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


def compute_mean_std(images: torch.Tensor, max_images: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units over the first ``max_images`` uint8 NCHW images."""
    pixels = images[:max_images].double() / 255
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3), correction=0)
    std = std.clamp(min=1 / 255)  # a channel constant over every image would divide by zero; one grey level instead
    return [round(float(value), 4) for value in mean], [round(float(value), 4) for value in std]


def load_data(config: TrainConfig) -> DataBundle:
    """Everything ``train`` needs from the dataset, validated with clear errors."""
    splits = load_dataset_dict(config.dataset, config.dataset_config)
    train = get_split(splits, config.train_split)
    image_column = image_column_of(train, config.image_column)
    label_column = detect_column(train, config.label_column, LABEL_COLUMNS, "label")
    class_names = class_names_of(train, label_column)
    train = random_subset(train, config.max_train_samples, "--max_train_samples")
    test = random_subset(get_split(splits, config.eval_split), config.max_eval_samples, "--max_eval_samples")
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
    (train_images, _), *_ = decode_splits(named_splits, image_column, label_column, config.resize_on_load)
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
        resize_to=config.resize_on_load,
        dataset_revision=(revision := hub_revision(config.dataset, train)),
        dataset_pretty_name=pretty_name(config.dataset, revision),
    )


def load_evaluation_data(
    dataset: str, split: str, max_samples: int | None, image_column: str | None, label_column: str | None, saved: dict,
    dataset_config: str | None = None,
) -> DataBundle:  # fmt: skip
    """One split to evaluate a saved model on, normalised as the model was trained."""
    examples = get_split(load_dataset_dict(dataset, dataset_config), split)
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


def content_digest(data: DataBundle) -> str:
    """SHA-256 of the decoded training and evaluation examples: the same data under any path or copy,
    and different data under the same path, are told apart."""
    digest = hashlib.sha256()
    for split in (data.train, data.evaluation):
        images, labels = data.decoded(split)
        digest.update(images.contiguous().numpy())
        digest.update(labels.contiguous().numpy())
    return digest.hexdigest()
