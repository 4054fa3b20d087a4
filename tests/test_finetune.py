"""Starting from published weights: the architecture comes from the saved model, a different number of
classes re-initialises only the classifier layer, a frozen backbone stays exactly as loaded, a fine-tune
beats training from scratch on the same few steps, and a resumed fine-tune ends bit for bit the same."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_hub_layout
from safetensors.torch import load_file

from cifar_accel.engine import train
from cifar_accel.errors import UserError
from cifar_accel.settings import parse_train_args

TEN_COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan", "grey", "white", "black", "orange"]
FEW_STEPS = ["--max_train_samples", "64", "--batch_size", "32", "--epochs", "1", "--learning_rate", "0.05",
             "--num_workers", "0"]  # fmt: skip


def train_run(dataset: Path, output_dir: Path, *flags: str) -> dict:
    return train(parse_train_args(["--dataset", str(dataset), "--output_dir", str(output_dir), *flags]))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A bn_cnn trained on ten colour classes (80% right), the first four of which are the colour dataset's."""
    root = tmp_path_factory.mktemp("base")
    dataset = write_hub_layout(root / "ten_colours", {"train": 320, "test": 40}, TEN_COLOURS, num_colours=10)
    train_run(dataset, root / "run", "--model", "bn_cnn", "--epochs", "2", "--batch_size", "32", "--learning_rate",
              "0.05", "--num_workers", "0")  # fmt: skip
    return root / "run" / "best"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "resnet9"], "--model 'resnet9' \\(asked for, or set by the recipe\\) contradicts --init_from"),
        (["--model_args", '{"dropout": 0.1}'], "--model_args .* contradicts --init_from .*, which holds model_args"),
        (["--init_revision", "v1"], "--init_revision is for Hub repos; --init_from .* is a local folder"),
    ],
)
def test_what_contradicts_the_saved_model_is_refused_in_one_line(base_model, flags, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(["--init_from", str(base_model), *flags])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--freeze_backbone"], "--freeze_backbone needs weights to keep: --init_from, or a Hub model"),
        (["--init_revision", "main"], "--init_revision needs --init_from"),
        (["--init_from", "/no/such/model"], "--init_from /no/such/model: no such folder"),
        (["--init_from", "{empty}"], "config.json not found; a saved model is a folder holding"),
        (["--init_from", "not a repo"], "'not a repo' is neither a folder holding a saved model nor a valid Hub"),
    ],
)
def test_a_missing_or_malformed_base_model_is_refused_in_one_line(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        parse_train_args([flag.format(empty=tmp_path) for flag in flags])


def test_the_architecture_comes_from_the_saved_model_or_its_run_folder(base_model):
    saved = json.loads((base_model / "config.json").read_text())
    for folder in (base_model, base_model.parent):
        config = parse_train_args(["--init_from", str(folder)])
        assert (config.model, config.model_args) == (saved["architecture"], saved["model_args"]) == ("bn_cnn", {})


def test_a_fine_tune_of_ten_classes_on_four_beats_training_from_scratch(base_model, colour_dataset, tmp_path, capsys):
    """Two steps of 32 images: from scratch the network has barely started; from the base model only its
    classifier layer is new, on features that already tell the colours apart."""
    scratch = train_run(colour_dataset, tmp_path / "scratch", "--model", "bn_cnn", *FEW_STEPS)
    tuned = train_run(colour_dataset, tmp_path / "tuned", "--init_from", str(base_model), *FEW_STEPS)
    assert "note: the classifier layer (classifier.7) starts afresh: 10 classes in" in capsys.readouterr().out
    scratch_top1, tuned_top1 = scratch["final_metrics"]["top1"], tuned["final_metrics"]["top1"]
    assert tuned_top1 > scratch_top1 + 0.2, (scratch_top1, tuned_top1)
    saved = json.loads((tmp_path / "tuned" / "train_config.json").read_text())
    assert saved["base_model"] == {"source": str(base_model.resolve()), "revision": None,
                                   "architecture": "bn_cnn", "num_classes": 10}  # fmt: skip
    base_config = json.loads((base_model / "config.json").read_text())
    assert (saved["mean"], saved["std"]) == (base_config["mean"], base_config["std"])
    card = (tmp_path / "tuned" / "best" / "README.md").read_text()
    assert f"It started from the weights in `{base_model.resolve()}`, a 10-class model." in card
    assert "base_model" not in card.split("---")[1]  # a local folder is no Hub repo to link


def test_a_frozen_backbone_keeps_every_loaded_tensor_but_the_classifier(base_model, colour_dataset, tmp_path):
    train_run(colour_dataset, tmp_path / "probe", "--init_from", str(base_model), "--freeze_backbone", *FEW_STEPS)
    base, probed = load_file(base_model / "model.safetensors"), load_file(tmp_path / "probe/best/model.safetensors")
    assert base.keys() == probed.keys()
    changed = {
        name for name in base if base[name].shape != probed[name].shape or not torch.equal(base[name], probed[name])
    }
    assert changed == {"classifier.7.weight", "classifier.7.bias"}


def test_a_fine_tune_resumed_from_its_checkpoint_ends_bit_for_bit_the_same(base_model, colour_dataset, tmp_path):
    """The finished run copied back to its first epoch's checkpoint, as a run killed then would have left it."""
    flags = ["--init_from", str(base_model), *FEW_STEPS, "--epochs", "2", "--checkpointing_steps", "epoch"]
    train_run(colour_dataset, tmp_path / "whole", *flags)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_4")
    (tmp_path / "resumed" / "results.json").unlink()
    train(parse_train_args(["--resume_from_checkpoint", str(tmp_path / "resumed" / "checkpoints" / "step_2")]))
    weights = "checkpoints/step_4/model.safetensors"
    whole, resumed = (load_file(tmp_path / run / weights) for run in ("whole", "resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[name], resumed[name]) for name in whole)
    records = [
        [{key: value for key, value in json.loads(line).items() if "seconds" not in key and "per_second" not in key}
         for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "resumed")
    ]  # fmt: skip
    assert records[0] == records[1] and len(records[0]) == 2


def test_a_fine_tune_resumes_after_its_base_model_folder_is_deleted(base_model, colour_dataset, tmp_path):
    """The checkpoint holds every weight: a resume needs neither the folder the run started from nor a flag
    naming it, and the run still records where its starting weights came from. Killed after its first epoch
    (the finished run copied back to that checkpoint), it ends bit for bit as the uninterrupted run."""
    base = shutil.copytree(base_model, tmp_path / "base")
    flags = ["--init_from", str(base), *FEW_STEPS, "--epochs", "2", "--checkpointing_steps", "epoch"]
    train_run(colour_dataset, tmp_path / "whole", *flags)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_4")
    (tmp_path / "resumed" / "results.json").unlink()
    shutil.rmtree(base)
    train(parse_train_args(["--resume_from_checkpoint", "latest", "--output_dir", str(tmp_path / "resumed")]))
    for weights in ("checkpoints/step_4/model.safetensors", "best/model.safetensors"):
        whole, resumed = (load_file(tmp_path / run / weights) for run in ("whole", "resumed"))
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[name], resumed[name]) for name in whole)
    whole, resumed = (json.loads((tmp_path / run / "train_config.json").read_text()) for run in ("whole", "resumed"))
    assert resumed["base_model"] == whole["base_model"] == {
        "source": str(base.resolve()), "revision": None, "architecture": "bn_cnn", "num_classes": 10
    }  # fmt: skip
    assert (resumed["mean"], resumed["std"]) == (whole["mean"], whole["std"])


def test_a_resume_takes_the_base_model_its_checkpoint_recorded_or_finds_that_of_an_older_one(base_model, tmp_path):
    from cifar_accel.finetune import find_base_model, resumed_base_model

    found = find_base_model(str(base_model))
    recorded, older = tmp_path / "recorded", tmp_path / "older"
    for checkpoint, run in ((recorded, {"base_model": {**found.record(), "mean": [0.5] * 3, "std": [0.25] * 3}}),
                            (older, {})):  # fmt: skip
        checkpoint.mkdir()
        (checkpoint / "progress.json").write_text(json.dumps({"settings": {}, **run}))
    from_record = resumed_base_model(recorded, "/no/such/base")
    assert (from_record.record(), from_record.folder) == (found.record(), None)
    assert (from_record.config["mean"], from_record.config["std"]) == ([0.5] * 3, [0.25] * 3)
    assert resumed_base_model(older, str(base_model)) == found
    with pytest.raises(UserError, match="--init_from /no/such/base: no such folder"):
        resumed_base_model(older, "/no/such/base")
