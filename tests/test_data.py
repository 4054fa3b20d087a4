from collections import Counter

import pytest
import torch
from conftest import write_hub_layout

from cifar_accel.config import TrainConfig
from cifar_accel.data import load_data, make_dataloader
from cifar_accel.errors import UserError


def test_columns_class_names_and_statistics_come_from_the_data(colour_dataset):
    data = load_data(TrainConfig(dataset=str(colour_dataset)))
    assert (data.image_column, data.label_column) == ("img", "label")
    assert data.class_names == ["red", "green", "blue", "yellow"]
    assert data.selection_split == "test" and data.test is None
    assert len(data.train) == 256 and len(data.evaluation) == 101
    assert all(0 < value < 1 for value in data.mean + data.std)


def test_cifar100_layout_with_fine_labels_works_unchanged(tmp_path):
    names = [f"class_{i}" for i in range(100)]
    root = write_hub_layout(
        tmp_path, {"train": 200, "test": 100}, names, image_column="image", label_column="fine_label"
    )
    data = load_data(TrainConfig(dataset=str(root)))
    assert (data.image_column, data.label_column, data.num_classes) == ("image", "fine_label", 100)


def test_an_image_folder_is_a_dataset_with_one_class_per_subfolder(tmp_path):
    from PIL import Image

    for split, count in (("train", 6), ("test", 3)):
        for index, colour in enumerate(["red", "green", "blue"] * (count // 3)):
            folder = tmp_path / split / colour
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), colour).save(folder / f"{index}.png")
    data = load_data(TrainConfig(dataset=str(tmp_path)))
    assert (data.image_column, data.label_column) == ("image", "label")
    assert data.class_names == ["blue", "green", "red"]
    assert (len(data.train), len(data.evaluation)) == (6, 3)


def test_missing_column_lists_the_columns_present(colour_dataset):
    with pytest.raises(UserError, match="image column 'pixels' not found; columns present: img, label"):
        load_data(TrainConfig(dataset=str(colour_dataset), image_column="pixels"))


def test_validation_hold_out_is_stratified_and_chooses_the_model(colour_dataset):
    data = load_data(TrainConfig(dataset=str(colour_dataset), validation_size=40))
    assert data.selection_split == "validation" and len(data.test) == 101
    assert len(data.train) == 216
    assert Counter(data.evaluation["label"]) == {0: 10, 1: 10, 2: 10, 3: 10}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset": "/no/such/folder"}, "dataset path '/no/such/folder' does not exist"),
        ({"max_train_samples": 1000}, "--max_train_samples 1000 is larger than the split \\(256 examples\\)"),
        ({"eval_split": "validation"}, "split 'validation' not found; splits present: train, test"),
    ],
)
def test_bad_data_settings_raise_clear_errors(colour_dataset, overrides, message):
    config = TrainConfig(**{"dataset": str(colour_dataset), **overrides})
    with pytest.raises(UserError, match=message):
        load_data(config)


def test_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=f"cannot read a dataset from '{tmp_path}'"):
        load_data(TrainConfig(dataset=str(tmp_path)))


def test_unreachable_hub_names_the_offline_alternatives(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub.*--dataset PATH.*HF_HUB_OFFLINE=1"):
        load_data(TrainConfig(dataset="uoft-cs/cifar10"))


def test_offline_mode_without_a_cached_copy_says_so(monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants

    # Both libraries read HF_HUB_OFFLINE at import time: set their constants as a fresh process would.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # an empty cache
    with pytest.raises(UserError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set.*--dataset PATH"):
        load_data(TrainConfig(dataset="someone/not-cached"))


def test_loader_yields_normalised_augmented_batches(colour_dataset):
    data = load_data(TrainConfig(dataset=str(colour_dataset)))
    train_loader = make_dataloader(data.train, data, train=True, batch_size=64, num_workers=0, cutout=8)
    eval_loader = make_dataloader(data.train, data, train=False, batch_size=64, num_workers=0)
    images, labels = next(iter(train_loader))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert abs(float(images.mean())) < 0.5
    clean = torch.cat([batch for batch, _ in eval_loader])
    # Evaluation is deterministic; training augments (crop, flip, cutout) so images differ from the clean ones.
    assert torch.equal(clean, torch.cat([batch for batch, _ in eval_loader]))
    assert abs(float(clean.mean())) < 0.2 and abs(float(clean.std()) - 1) < 0.2
    shuffled_again = torch.cat([batch for batch, _ in train_loader])
    assert not torch.equal(shuffled_again.sort(dim=0).values, clean.sort(dim=0).values)


def test_loader_augmentation_is_reproducible_for_a_seed(colour_dataset):
    data = load_data(TrainConfig(dataset=str(colour_dataset)))

    def first_batch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        loader = make_dataloader(data.train, data, train=True, batch_size=32, num_workers=2, seed=seed)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))
