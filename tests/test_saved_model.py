import json

import pytest
import torch

from cifar_accel.errors import UserError
from cifar_accel.models import get_model
from cifar_accel.saved_model import load_model, model_config, save_model


def _save(directory, architecture="simple_cnn", model_args=None) -> torch.nn.Module:
    model_args = model_args or {}
    model = get_model(architecture, num_classes=3, **model_args).eval()
    config = model_config(architecture, model_args, ["a", "b", "c"], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    save_model(model, directory, config)
    return model


def test_a_saved_model_is_rebuilt_from_its_config_with_the_same_outputs(tmp_path):
    original = _save(tmp_path, model_args={"dropout": 0.3})
    restored, config = load_model(tmp_path)
    images = torch.randn(4, 3, 32, 32)
    assert torch.equal(original(images), restored(images))
    assert not restored.training
    assert config["model_args"] == {"dropout": 0.3} and config["class_names"] == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_weights_of_another_architecture_are_refused(tmp_path):
    _save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architecture": "bn_cnn"}))
    with pytest.raises(UserError, match="do not match architecture 'bn_cnn'"):
        load_model(tmp_path)
