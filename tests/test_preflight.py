"""preflight: what a configuration needs beyond its values (a writable folder, a buildable model, a Hub repo and
token, an installed tracker) is refused in one line naming the flag, before anything is written."""

import huggingface_hub
import pytest

from cifar_accel.errors import UserError
from cifar_accel.preflight import preflight
from cifar_accel.settings import parse_train_args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "bn_cnn", "--model_args", '{"conv_dropout": NaN}'],
            "conv_dropout must be a finite float, got nan",
        ),
        (
            ["--model", "bn_cnn", "--model_args", '{"conv_dropout": true}'],
            "conv_dropout must be a finite float, got True",
        ),
        (["--model_args", '{"widths": 5}'], "model 'resnet9' does not take widths"),
        (["--model", "bn_cnn", "--model_args", '{"conv_dropout": 2}'], "--model_args .*bn_cnn cannot be built"),
        (["--model", "simple_cnn", "--image_size", "200"], "--model simple_cnn cannot take 200x200 images"),
        (["--output_dir", "/proc/version"], "--output_dir /proc/version is a file; give a folder"),
        (["--output_dir", "/proc/version/run"], "--output_dir /proc/version/run cannot be created: /proc/version is a"),
        (["--push_to_hub", "--hub_model_id", "no-owner"], "--hub_model_id must be USER/NAME or ORG/NAME"),
    ],
)
def test_what_cannot_run_is_refused_naming_the_flag(argv, message, tmp_path):
    config = parse_train_args(["--output_dir", str(tmp_path / "run"), *argv])  # the values alone are valid
    with pytest.raises(UserError, match=message):
        preflight(config)
    assert not (tmp_path / "run").exists()


def test_a_push_without_a_token_is_refused_before_training(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_stored_token"))
    config = parse_train_args(["--output_dir", str(tmp_path), "--push_to_hub", "--hub_model_id", "alice/colours"])
    with pytest.raises(UserError, match="^no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`$"):
        preflight(config)


def test_a_config_that_can_run_passes(tmp_path):
    preflight(parse_train_args(["--output_dir", str(tmp_path / "run"), "--model", "bn_cnn", "--report_to", "none"]))
