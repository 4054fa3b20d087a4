"""--image_size: datasets of other small sizes train, and the saved model resizes as training did."""

import io
import json

import pytest
import torch
from conftest import write_hub_layout
from datasets import Image as ImageFeature
from PIL import Image

from cifar_accel import load_model
from cifar_accel.cli import evaluate_main
from cifar_accel.config import TrainConfig
from cifar_accel.data import load_data
from cifar_accel.device_data import make_device_dataloader
from cifar_accel.engine import train
from cifar_accel.errors import UserError
from cifar_accel.preflight import preflight
from cifar_accel.settings import parse_train_args

CLASSES = ["red", "green", "blue", "yellow"]


def test_a_dataset_of_another_size_trains_and_its_model_resizes_as_training_did(tmp_path, capsys):
    stored_size, image_size = (36, 40), 24  # (height, width) as stored: not square, resized on load
    dataset = write_hub_layout(tmp_path / "data", {"train": 32, "test": 8}, CLASSES, image_size=stored_size)
    output_dir = tmp_path / "run"
    flags = ["--dataset", str(dataset), "--output_dir", str(output_dir), "--image_size", str(image_size),
             "--model", "resnet9", "--epochs", "1", "--batch_size", "16", "--num_workers", "0",
             "--crop_padding", "2", "--cutout", "8"]  # fmt: skip
    results = train(parse_train_args(flags))
    assert results["final_metrics"]["n"] == 8

    saved = json.loads((output_dir / "best" / "config.json").read_text())
    assert saved["input_size"] == [3, image_size, image_size] and saved["image_size"] == image_size
    model = load_model(str(output_dir))
    data = load_data(parse_train_args(flags))
    images, _ = data.decoded(data.evaluation)
    assert images.shape[-2:] == (image_size, image_size)
    # predict, given the stored file, sees the pixels training saw.
    stored = Image.open(io.BytesIO(data.evaluation.cast_column("img", ImageFeature(decode=False))[0]["img"]["bytes"]))
    assert stored.size == stored_size[::-1]
    with torch.no_grad():
        expected = model(model.preprocess(images[:1])).softmax(dim=1)[0]
    best = model.predict(stored, top_k=1)[0]
    assert best["score"] == pytest.approx(expected.max().item(), abs=1e-6)
    assert best["label"] == CLASSES[int(expected.argmax())]

    fine_tuning = parse_train_args(["--init_from", str(output_dir), "--dataset", str(dataset)])
    assert fine_tuning.image_size == image_size  # the base model's resolution, unless another is asked for
    assert parse_train_args(["--init_from", str(output_dir), "--image_size", "32"]).image_size == 32

    capsys.readouterr()
    evaluate_main(["--model", str(output_dir), "--dataset", str(dataset), "--num_workers", "0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 8


def test_the_device_loader_crops_and_cuts_out_at_the_image_size(tmp_path):
    dataset = write_hub_layout(tmp_path / "data", {"train": 16, "test": 4}, CLASSES, image_size=(28, 28))
    data = load_data(TrainConfig(dataset=str(dataset), image_size=28))
    loader = make_device_dataloader(data.train, data, True, 16, torch.device("cpu"), cutout=27, crop_padding=3)
    images, _ = next(iter(loader))
    assert images.shape == (16, 3, 28, 28)
    erased = images == images.new_tensor(data.mean).neg().div(images.new_tensor(data.std)).view(1, 3, 1, 1)
    assert erased.all(dim=1).flatten(1).any(dim=1).all()  # every image has erased pixels, inside the 28x28


def test_images_of_another_size_are_refused_without_image_size_naming_it(tmp_path):
    dataset = write_hub_layout(tmp_path / "data", {"train": 8, "test": 4}, CLASSES, image_size=(28, 28))
    refusal = r"^images must be 32x32 pixels; .* is 28x28 \(width x height; train with --image_size N"
    with pytest.raises(UserError, match=refusal):
        load_data(TrainConfig(dataset=str(dataset)))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image_size", "4"], "--image_size must be 8 to 256 pixels"),
        (["--image_size", "300"], "--image_size must be 8 to 256 pixels"),
        (["--image_size", "16", "--crop_padding", "16"], r"--crop_padding must be 0 to 15 \(less than the image side"),
        (["--image_size", "64", "--cutout", "64"], r"--cutout must be 0 to 63 \(smaller than the image\), got 64"),
        (["--image_size", "96", "--model", "airbench94"], "--model airbench94 cannot take 96x96 images"),
        (["--image_size", "28", "--model", "bn_cnn"], "--model bn_cnn cannot take 28x28 images"),
    ],
)
def test_image_sizes_a_setting_or_model_cannot_take_are_refused_before_any_work(tmp_path, flags, message):
    with pytest.raises(UserError, match=f"^{message}") as refused:  # the values, then what they need of the model
        preflight(parse_train_args(["--output_dir", str(tmp_path / "run"), *flags]))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_a_dataset_card_with_broken_yaml_is_a_one_line_refusal(tmp_path):
    dataset = write_hub_layout(tmp_path / "data", {"train": 8, "test": 4}, CLASSES)
    (dataset / "README.md").write_text('---\npretty_name: "x: [\n---\n')
    with pytest.raises(UserError, match="README.md metadata is not valid YAML") as refused:
        load_data(TrainConfig(dataset=str(dataset)))
    assert "\n" not in str(refused.value)


def test_a_channel_constant_over_every_image_normalises_without_dividing_by_zero():
    from cifar_accel.data import compute_mean_std

    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    images[:, 0] = 200  # all red: every channel is constant
    mean, std = compute_mean_std(images)
    assert mean == [round(200 / 255, 4), 0.0, 0.0] and min(std) > 0
