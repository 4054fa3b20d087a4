import json
import re

import pytest
import torch

from cifar_accel import load_model
from cifar_accel.errors import UserError
from cifar_accel.models import get_model
from cifar_accel.saved_model import model_config, save_model


def _save(directory, architecture="simple_cnn", model_args=None) -> torch.nn.Module:
    model_args = model_args or {}
    model = get_model(architecture, num_classes=3, **model_args).eval()
    config = model_config(architecture, model_args, ["a", "b", "c"], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    save_model(model, directory, config)
    return model


def test_a_saved_network_is_rebuilt_from_its_config_with_the_same_outputs(tmp_path):
    original = _save(tmp_path, model_args={"dropout": 0.3})
    restored = load_model(tmp_path)
    images = torch.randn(4, 3, 32, 32)
    assert torch.equal(original(images), restored(images))
    assert not restored.training
    assert restored.config["model_args"] == {"dropout": 0.3} and restored.config["class_names"] == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_run_folder_stands_for_its_best_model(tmp_path):
    original = _save(tmp_path / "run" / "best")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_model(tmp_path / "run")(images), original(images))
    with pytest.raises(UserError, match="a saved model is a folder holding model.safetensors and config.json"):
        load_model(tmp_path)  # a folder that holds neither, nor a best/ that does


def test_weights_of_another_architecture_are_refused(tmp_path):
    _save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "bn_cnn"}))
    with pytest.raises(UserError, match="do not match architecture 'bn_cnn'"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_args": {"width": 3}}, "model 'simple_cnn' does not take width; its arguments are: dropout"),
        ({"class_names": ["a", "b"]}, "lists 2 class names for 3 classes"),
        ({"mean": None, "std": None}, None),
    ],
)
def test_a_config_that_cannot_describe_the_weights_is_refused(tmp_path, change, message):
    _save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    if message is None:  # keys removed rather than changed
        config = {key: value for key, value in config.items() if value is not None}
        message = "is not a cifar_accel model config \\(missing mean, std\\)"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        load_model(tmp_path)


IMAGE_SIZES = re.escape("null (32x32 images) or a whole number of 8 to 256 pixels (small images)")


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"std": [0, 0, 0]}, "std", "a list of 3 positive finite numbers"),
        ({"std": [0.2, -0.2, 0.2]}, "std", "a list of 3 positive finite numbers"),
        ({"mean": [0.5, 0.5]}, "mean", "a list of 3 finite numbers"),
        ({"mean": [0.5, "grey", 0.5]}, "mean", "a list of 3 finite numbers"),
        ({"mean": 0.5}, "mean", "a list of 3 finite numbers"),
        ({"image_size": "big"}, "image_size", IMAGE_SIZES),
        ({"image_size": 4}, "image_size", IMAGE_SIZES),
        ({"image_size": True}, "image_size", IMAGE_SIZES),
        ({"input_size": [3, 64, 64]}, "input_size", "\\[3, 32, 32\\]"),
        ({"model_args": [1, 2]}, "model_args", "a JSON object of the architecture's arguments"),
        ({"architecture": 7}, "architecture", "the name of a model"),
        ({"architecture": "resnet7"}, "architecture", "a model of this cifar_accel, one of: airbench94, "),
        ({"class_names": "abc"}, "class_names", "a list of 3 distinct strings"),
        ({"class_names": ["a", "b", 3]}, "class_names", "a list of 3 distinct strings"),
        ({"class_names": ["a", "b", "a"]}, "class_names", "a list of 3 distinct strings"),
        ({"num_classes": "3"}, "num_classes", "a whole number of at least 1"),
        ({"num_classes": 0, "class_names": []}, "num_classes", "a whole number of at least 1"),
    ],
)
def test_every_field_of_the_config_is_checked_when_a_model_is_loaded(tmp_path, change, field, expected):
    _save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=f"^{tmp_path}/config.json: {field} must be {expected}") as raised:
        load_model(tmp_path)
    assert "\n" not in str(raised.value)


def test_an_image_size_the_architecture_cannot_take_is_refused(tmp_path):
    """simple_cnn's classifier expects the feature map of 32x32 images: its config cannot say 64."""
    _save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "image_size": 64, "input_size": [3, 64, 64]}))
    with pytest.raises(UserError, match=f"^{tmp_path}/config.json: architecture 'simple_cnn' cannot take 64x64"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "folder", "not an object"])
def test_a_config_that_cannot_be_read_is_refused_in_one_line(tmp_path, damage):
    _save(tmp_path)
    path = tmp_path / "config.json"
    if damage == "truncated":
        path.write_text(path.read_text()[:40])
        message = "is not a cifar_accel model config \\(Unterminated string"
    elif damage == "folder":  # cannot be read, as one without read permission
        path.unlink()
        path.mkdir()
        message = "cannot be read \\(Is a directory\\)"
    else:
        path.write_text("[1, 2]")
        message = "is not a cifar_accel model config \\(a JSON object is expected, got \\[1, 2\\]\\)"
    with pytest.raises(UserError, match=f"^{path} {message}"):
        load_model(tmp_path)
