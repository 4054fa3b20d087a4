import json

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
