import json
from collections import Counter

import pytest
from conftest import write_hub_layout

from cifar_accel.config import TrainConfig
from cifar_accel.data.loading import load_data
from cifar_accel.errors import UserError
from cifar_accel.settings import parse_train_args


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


def test_a_dataset_with_several_configs_needs_one_and_lists_them(tmp_path):
    """A Hub-layout repo whose card declares two configs, as SVHN's declares cropped_digits and full_numbers."""
    for config_name, classes in (("colours", ["red", "green", "blue", "yellow"]), ("two", ["red", "green"])):
        write_hub_layout(tmp_path / config_name, {"train": 16, "test": 8}, classes)
    card = "".join(
        f"- config_name: {name}\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: {name}/data/{split}-*.parquet\n" for split in ("train", "test"))
        for name in ("colours", "two")
    )
    (tmp_path / "README.md").write_text(f"---\npretty_name: Colour sets\nconfigs:\n{card}---\n")
    with pytest.raises(UserError, match="has several configs; pick one with --dataset_config: colours, two$"):
        load_data(TrainConfig(dataset=str(tmp_path)))
    with pytest.raises(UserError, match="^--dataset_config .three. is not a config of .*; choose one of: colours, two"):
        load_data(TrainConfig(dataset=str(tmp_path), dataset_config="three"))
    data = load_data(parse_train_args(["--dataset", str(tmp_path), "--dataset_config_name", "two"]))
    assert data.class_names == ["red", "green"] and len(data.train) == 16
    assert data.dataset_revision is None and data.dataset_pretty_name == "Colour sets"  # a local copy with a card


def test_a_hub_dataset_records_the_commit_it_was_prepared_at_and_a_local_copy_none(tmp_path):
    from datasets import Dataset, load_from_disk

    from cifar_accel.data.sources import hub_revision

    commit = "0123456789abcdef0123456789abcdef01234567"
    Dataset.from_dict({"label": [0, 1]}).save_to_disk(str(tmp_path / commit))  # as datasets prepares a Hub id
    prepared = load_from_disk(str(tmp_path / commit))
    assert hub_revision("uoft-cs/cifar10", prepared) == hub_revision("uoft-cs/cifar10", prepared.select([1])) == commit
    assert hub_revision(str(tmp_path), prepared) is None  # a folder on disk is a local copy, whatever it holds
    Dataset.from_dict({"label": [0]}).save_to_disk(str(tmp_path / "not-a-commit"))
    assert hub_revision("uoft-cs/cifar10", load_from_disk(str(tmp_path / "not-a-commit"))) is None


def write_image_folder(root, counts: dict[str, dict[str, int]]) -> None:
    """``root/split/class/N.png``: ``datasets`` lists such a folder class by class."""
    from PIL import Image

    for split, classes in counts.items():
        for colour, count in classes.items():
            folder = root / split / colour
            folder.mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (32, 32), colour).save(folder / f"{index}.png")


def test_sample_limits_draw_every_class_of_a_class_sorted_folder_the_same_for_every_seed(tmp_path):
    write_image_folder(
        tmp_path, {split: dict.fromkeys(["blue", "green", "red", "yellow"], 30) for split in ("train", "test")}
    )
    subsets = [
        load_data(TrainConfig(dataset=str(tmp_path), max_train_samples=40, max_eval_samples=20, seed=seed))
        for seed in (0, 1)
    ]
    for data in subsets:
        assert (len(data.train), len(data.evaluation)) == (40, 20)
        # The first 40 rows would be 30 blue and 10 green images.
        assert set(Counter(data.train["label"])) == {0, 1, 2, 3} and min(Counter(data.train["label"]).values()) >= 5
        assert set(Counter(data.evaluation["label"])) == {0, 1, 2, 3}
    assert subsets[0].train["image"] == subsets[1].train["image"]  # runs of several seeds train on the same examples


def test_evaluate_scores_the_examples_a_run_with_the_same_limit_scored(colour_dataset):
    from cifar_accel.data.loading import load_evaluation_data

    trained = load_data(TrainConfig(dataset=str(colour_dataset), max_eval_samples=30, seed=5))
    saved = {"num_classes": 4, "class_names": trained.class_names, "mean": trained.mean, "std": trained.std}
    evaluated = load_evaluation_data(str(colour_dataset), "test", 30, None, None, saved)
    assert evaluated.evaluation["img"] == trained.evaluation["img"]
    assert evaluated.evaluation["img"] != load_data(TrainConfig(dataset=str(colour_dataset))).evaluation[:30]["img"]


def test_a_run_says_up_front_which_classes_no_example_teaches_or_tests(tmp_path, capsys):
    from cifar_accel import engine

    write_image_folder(tmp_path / "data", {"train": {"blue": 8, "green": 8}, "test": {"blue": 2, "red": 2}})
    argv = ["--dataset", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--model", "simple_cnn"]
    engine.train(parse_train_args([*argv, "--epochs", "1", "--batch_size", "8", "--num_workers", "0",
                                   "--max_eval_samples", "4"]))  # fmt: skip
    output = capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["subset_seed"] == 0
    assert "note: the training examples hold no image of class 'red'; the model cannot learn to predict them" in output
    assert "note: the test examples hold no image of class 'green'; their per-class accuracy is n/a" in output
