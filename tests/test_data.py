import json
from collections import Counter

import pytest
import torch
from conftest import write_hub_layout

from cifar_accel.augment import DecodedImages
from cifar_accel.config import AUTO_AUGMENT, TrainConfig, parse_train_args
from cifar_accel.data import decode_split, load_data, make_dataloader
from cifar_accel.device_data import DeviceImageDataset
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


# --auto_augment and --random_erasing (torch loader, training images only)


@pytest.fixture(scope="module")
def colour_data(colour_dataset):
    return load_data(TrainConfig(dataset=str(colour_dataset)))


@pytest.fixture
def one_thread():
    """Run as DataLoader workers do. A second intra-op thread only adds hand-offs on 32x32 images, and on a
    busy machine each can wait milliseconds: with two, these tests took 15 s instead of 1 s beside a training job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_split(data, epoch: int = 1, **options) -> DecodedImages:
    """The training dataset a loader with these options fetches from, at ``epoch``."""
    split = make_dataloader(data.train, data, train=True, batch_size=16, num_workers=0, **options).dataset
    split.set_epoch(epoch)
    return split


def fetch(split, indices) -> torch.Tensor:
    return torch.stack([split[index][0] for index in indices])


def mirror_symmetric_copies(count: int) -> torch.Tensor:
    """``count`` identical images that a left-right flip leaves unchanged: without crops, two examples
    then differ only by what the policy drew for them."""
    rows = torch.arange(0, 256, 8, dtype=torch.uint8)[:, None].expand(32, 32)
    image = torch.stack([rows, rows.flip(0), torch.full_like(rows, 90)])
    return image.expand(count, 3, 32, 32).contiguous()


@pytest.mark.usefixtures("one_thread")
def test_a_policys_images_depend_on_seed_epoch_and_index_only(colour_data):
    options = {"seed": 3, "auto_augment": "randaugment", "random_erasing": 0.5}
    indices = list(range(0, 256, 8))
    split = training_split(colour_data, **options)
    torch.manual_seed(0)
    in_order = fetch(split, indices)
    torch.manual_seed(12345)  # another global state, and the examples fetched backwards by a fresh copy
    backwards = fetch(training_split(colour_data, **options), indices[::-1]).flip(0)
    assert torch.equal(in_order, backwards)
    assert torch.equal(fetch(split, indices), in_order)  # a retry by the same worker
    assert in_order.dtype == torch.uint8 and in_order.shape == (len(indices), 3, 32, 32)


@pytest.mark.usefixtures("one_thread")
def test_a_policy_draws_afresh_for_every_seed_epoch_and_index():
    images = mirror_symmetric_copies(16)
    labels = torch.arange(16)

    def policy_images(seed: int, epoch: int) -> torch.Tensor:
        # No crop, and alternating flips repeat every two epochs: only the policy tells epochs 0 and 2 apart.
        split = DecodedImages(
            images, labels, True, crop_padding=0, alternating_flip=True, seed=seed, auto_augment="randaugment"
        )
        split.set_epoch(epoch)
        return fetch(split, range(16))

    first = policy_images(seed=0, epoch=0)
    assert len({image.numpy().tobytes() for image in first}) >= 12  # identical inputs, 16 examples
    assert torch.equal(first, policy_images(seed=0, epoch=0))
    assert not torch.equal(first, policy_images(seed=0, epoch=2))
    assert not torch.equal(first, policy_images(seed=1, epoch=0))


def test_worker_processes_make_the_main_processs_images(colour_data):
    subset = colour_data.train.select(range(64))

    def epoch_batches(num_workers: int) -> list[torch.Tensor]:
        loader = make_dataloader(
            subset, colour_data, True, 16, num_workers, seed=5, auto_augment="cifar10", random_erasing=0.5
        )
        loader.dataset.set_epoch(1)
        return [images for images, _ in loader]

    # Each worker makes every other batch, with one thread; the main process here keeps all of its threads.
    in_workers = epoch_batches(num_workers=2)
    assert len(in_workers) == 4
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(epoch_batches(0), in_workers, strict=True))


@pytest.mark.usefixtures("one_thread")
def test_fetching_leaves_the_global_random_state_as_it_was(colour_data):
    subset = colour_data.train.select(range(32))
    loader = make_dataloader(subset, colour_data, True, 8, num_workers=0, auto_augment="augmix", random_erasing=1.0)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    for _ in loader:
        pass
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("policy", AUTO_AUGMENT)
def test_every_policy_changes_images_and_keeps_them_uint8(colour_data, policy):
    plain = fetch(training_split(colour_data), range(64))
    augmented = fetch(training_split(colour_data, auto_augment=policy), range(64))
    assert augmented.dtype == torch.uint8 and augmented.shape == plain.shape
    changed = sum(not torch.equal(before, after) for before, after in zip(plain, augmented, strict=True))
    assert changed >= 32  # AutoAugment's sub-policies apply each operation with a probability


def test_an_unknown_policy_is_refused(colour_data):
    with pytest.raises(UserError, match="--auto_augment 'imagenet' is not one of cifar10, randaugment"):
        training_split(colour_data, auto_augment="imagenet")


def crop_and_flip_only(data, seed: int, epoch: int) -> torch.Tensor:
    """The training images as the device loader, an independent implementation, crops and flips them."""
    images, labels = decode_split(data.train, data.image_column, data.label_column)
    device = DeviceImageDataset(images, labels, [0.0] * 3, [1.0] * 3, True, seed=seed)
    device.set_epoch(epoch)
    return (device.__getitems__(list(range(len(labels))))[0] * 255).round().to(torch.uint8)


@pytest.mark.usefixtures("one_thread")
def test_random_erasing_fills_one_rectangle_per_image_with_the_mean_colour(colour_data):
    expected = crop_and_flip_only(colour_data, seed=2, epoch=1)
    assert torch.equal(fetch(training_split(colour_data, seed=2, random_erasing=0.0), range(256)), expected)
    split = training_split(colour_data, seed=2, random_erasing=1.0)
    erased = fetch(split, range(256))
    fill = torch.tensor([round(255 * value) for value in colour_data.mean], dtype=torch.uint8)[:, None, None]
    for image, original in zip(erased, expected, strict=True):
        rows, columns = (image != original).any(dim=0).nonzero(as_tuple=True)
        assert len(rows) >= 16  # at least 2% of the area
        box = image[:, rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        assert (box == fill).all()  # one solid rectangle holds every changed pixel
    split.set_epoch(2)  # the next epoch erases afresh: the stored images were left as they were
    assert torch.equal(
        fetch(split, range(256)), fetch(training_split(colour_data, 2, seed=2, random_erasing=1.0), range(256))
    )


@pytest.mark.usefixtures("one_thread")
def test_the_policy_runs_before_cutout(colour_data):
    plain, cut = (fetch(training_split(colour_data, cutout=cutout), range(64)) for cutout in (0, 8))
    square = (cut == 0).all(dim=1) & (plain != 0).any(dim=1)
    assert square.sum(dim=(1, 2)).min() >= 16  # every image has its square, clipped at the border to 4x4 or more
    augmented = fetch(training_split(colour_data, cutout=8, auto_augment="randaugment"), range(64))
    assert (augmented.permute(1, 0, 2, 3)[:, square] == 0).all()  # a geometric or colour op after would move it


@pytest.mark.usefixtures("one_thread")
def test_random_erasing_is_applied_with_its_probability_and_normalises_to_about_zero(colour_data):
    half = fetch(training_split(colour_data, random_erasing=0.5), range(128))
    untouched = crop_and_flip_only(colour_data, seed=0, epoch=1)[:128]
    erased = sum(not torch.equal(image, original) for image, original in zip(half, untouched, strict=True))
    assert 34 <= erased <= 94  # about 64
    loader = make_dataloader(colour_data.train, colour_data, True, 256, num_workers=0, random_erasing=1.0)
    loader.dataset.set_epoch(1)
    batch, _ = next(iter(loader))
    plain_loader = make_dataloader(colour_data.train, colour_data, True, 256, num_workers=0)
    plain_loader.dataset.set_epoch(1)
    plain, _ = next(iter(plain_loader))
    assert batch[batch != plain].abs().max() < 0.05  # the mean colour, normalised


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("policy", AUTO_AUGMENT)
def test_evaluation_images_are_never_augmented(colour_data, policy):
    def evaluation_batches(**options) -> torch.Tensor:
        loader = make_dataloader(colour_data.evaluation, colour_data, False, 32, num_workers=0, **options)
        loader.dataset.set_epoch(3)  # as if a training loop had set it
        return torch.cat([images for images, _ in loader])

    assert torch.equal(evaluation_batches(auto_augment=policy, random_erasing=1.0), evaluation_batches())


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

    from cifar_accel.data import hub_revision

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
    from cifar_accel.data import load_evaluation_data

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


def test_a_cache_write_killed_by_sigkill_leaves_no_temporary_behind_the_next_run(colour_dataset, tmp_path, monkeypatch):
    """The decoded images of a split are written to a temporary, then renamed; a writer killed in between
    cannot remove it, so the next writer on the machine does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    writer = (
        "import time, safetensors.torch as st, cifar_accel.data as data\n"
        "def slow(tensors, path):\n"
        "    open(path, 'wb').write(b'x' * 1000)\n"
        "    time.sleep(60)\n"
        "data.save_file = slow\n"
        f"data.load_data(data.TrainConfig(dataset={str(colour_dataset)!r}))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer], env={**os.environ, "CIFAR_ACCEL_CACHE": str(cache)})
    deadline = time.monotonic() + 120
    while not list(cache.glob(".*.tmp")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    [left] = list(cache.glob(".*.tmp"))
    mine = cache / f".other.safetensors.{left.name.rsplit('.', 3)[1]}.{os.getpid()}.tmp"  # a live writer's
    mine.write_bytes(b"")
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(cache))
    load_data(TrainConfig(dataset=str(colour_dataset)))
    assert sorted(path.name for path in cache.glob(".*.tmp")) == [mine.name]
    assert len(list(cache.glob("*.safetensors"))) == 2  # both splits cached this time
