"""Every bad input docs/resuming.md lists (Bad input): one line on stderr naming the value and what is valid,
exit status 2, no traceback, and nothing written or changed on disk."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
from conftest import (
    accelerate_launch,
    cifar_accel_command,
    colour_images,
    replace_column_values,
    run_command,
    write_hub_layout,
)
from datasets import Dataset, Features, Image, Value

from cifar_accel.cli import train_main

TINY_RUN = "--model bn_cnn --epochs 1 --batch_size 32 --num_workers 0 --checkpointing_steps epoch"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, colour_dataset) -> Path:
    """A finished run with a checkpoint, a saved model, broken copies, and broken datasets."""
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    result = run_command(
        [sys.executable, "train.py", "--dataset", str(colour_dataset), "--output_dir", str(run), *TINY_RUN.split()],
        env={"CIFAR_ACCEL_CACHE": str(root / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    truncated = root / "truncated"
    shutil.copytree(run / "best", truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    mismatched = root / "mismatched"
    shutil.copytree(run / "best", mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "architecture": "simple_cnn"}))
    for name, change in BROKEN_CONFIGS.items():
        shutil.copytree(run / "best", root / name)
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
    (root / "truncated_config" / "config.json").write_text((run / "best" / "config.json").read_text()[:50])
    (root / "broken.yaml").write_text("epochs: [3\n")
    classes = ["red", "green", "blue", "yellow"]
    replace_column_values(
        write_hub_layout(root / "bad_labels", {"train": 32, "test": 8}, classes), "train", "label", {5: 7}
    )
    broken_image = {"bytes": b"these bytes are not a PNG", "path": None}
    replace_column_values(
        write_hub_layout(root / "bad_image", {"train": 32, "test": 8}, classes), "train", "img", {9: broken_image}
    )
    replace_column_values(  # found after the train split decoded fine: its cache must not be written either
        write_hub_layout(root / "bad_test_image", {"train": 32, "test": 8}, classes), "test", "img", {3: broken_image}
    )
    # Test splits whose classes are not the model's (red, green, blue, yellow) in its order.
    write_hub_layout(root / "renamed_class", {"test": 8}, ["red", "green", "navy", "yellow"])
    write_hub_layout(root / "reordered_classes", {"test": 8}, ["green", "red", "blue", "yellow"])
    text_labels = Features({"img": Image(), "label": Value("string")})  # names, not a ClassLabel
    (root / "text_labels" / "data").mkdir(parents=True)
    Dataset.from_dict(
        {"img": colour_images([0, 1], seed=0), "label": ["red", "green"]}, features=text_labels
    ).to_parquet(str(root / "text_labels" / "data" / "test-00000-of-00001.parquet"))
    (root / "red.png").write_bytes(colour_images([0], seed=0)[0]["bytes"])
    return root


# Saved models whose config.json was edited by hand: each field the loaders read, wrong.
BROKEN_CONFIGS = {
    "zero_std": {"std": [0, 0, 0]},
    "short_mean": {"mean": [0.5, 0.5]},
    "big_image_size": {"image_size": "big"},
    "list_model_args": {"model_args": [1, 2]},
    "string_class_names": {"class_names": "abcd"},
    "truncated_config": {},  # cut short after copying
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*")}


CASES = {
    "unknown model": (
        "--model resnet7",
        "unknown model 'resnet7'; choose one of: airbench94, airbench94_muon, airbench96",
    ),
    "unknown recipe": ("--recipe fastest", "unknown recipe 'fastest'; choose one of: airbench94"),
    "unknown optimizer": (
        "--optimizer adam",
        "argument --optimizer: invalid choice: 'adam' (choose from 'sgd', 'adamw', 'muon')",
    ),
    "non-numeric learning rate": ("--learning_rate fast", "argument --learning_rate: 'fast' is not a number"),
    "non-positive learning rate": ("--learning_rate -0.1", "--learning_rate must be a positive finite number"),
    "non-positive batch size": ("--batch_size 0", "--batch_size must be 1 to 2^31, got 0"),
    "non-numeric epochs": ("--epochs two", "argument --epochs/--num_train_epochs: 'two' is not a number"),
    "too many training samples": ("--max_train_samples 1000", "--max_train_samples 1000 is larger than the split (256"),
    "missing local dataset": ("--dataset /no/such/cifar", "dataset path '/no/such/cifar' does not exist"),
    "dataset neither cached nor reachable": (
        "--dataset someone/cifar",
        "'someone/cifar' is not in the Hugging Face cache",
    ),
    "missing image column": ("--image_column pixels", "image column 'pixels' not found; columns present: img, label"),
    "missing label column": ("--label_column target", "label column 'target' not found; columns present: img, label"),
    "labels outside the classes": (
        "--dataset {root}/bad_labels",
        "label 7 in row 5 of split 'train' is outside [0, 4)",
    ),
    "undecodable image": ("--dataset {root}/bad_image", "the image in row 9 of split 'train' cannot be decoded"),
    "undecodable test image": ("--dataset {root}/bad_test_image", "the image in row 3 of split 'test' cannot be"),
    "config file not valid YAML": ("--recipe {root}/broken.yaml", "recipe '{root}/broken.yaml' is not valid YAML"),
    "resume path missing": (
        "--resume_from_checkpoint /no/such/step_5",
        "--resume_from_checkpoint '/no/such/step_5' does",
    ),
    "resume from another architecture": (
        "--model simple_cnn --resume_from_checkpoint {root}/run/checkpoints/step_8",
        'checkpoint {root}/run/checkpoints/step_8 continues a run trained with --model "bn_cnn" (asked: "simple_cnn")',
    ),
    "checkpointing steps not a number": (
        "--checkpointing_steps often",
        "--checkpointing_steps must be a positive number",
    ),
    "checkpointing steps a superscript digit": (
        "--checkpointing_steps \u00b2",
        "--checkpointing_steps must be a positive number of steps or 'epoch', got '\u00b2'",
    ),
    "a CutMix alpha that is 0 in float32": ("--cutmix 1e-300", "--cutmix must be at least 1.1755e-38 (the smallest"),
    "output folder holds a run": ("--output_dir {root}/run", "--output_dir {root}/run already holds a run"),
    "fp16 on the CPU": ("--mixed_precision fp16", "--mixed_precision fp16 needs a GPU"),
    "Muon under fp16": (
        "--optimizer muon --mixed_precision fp16",
        "--optimizer muon does not run under --mixed_precision fp16; use bf16 or no",
    ),
    "base model whose image_size is not a number": (
        "--init_from {root}/big_image_size",
        "{root}/big_image_size/config.json: image_size must be null (32x32 images) or a whole number of 8 to 256 "
        "pixels (small images), got 'big'",
    ),
    "base model whose model_args are a list": (
        "--init_from {root}/list_model_args",
        "{root}/list_model_args/config.json: model_args must be a JSON object of the architecture's arguments, "
        "got [1, 2]",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_training_input(workspace, colour_dataset, case, monkeypatch, capsys):
    """In this process, through the entry point ``train.py`` calls (a subprocess each would cost ~7 s);
    the tests below run the real commands."""
    flags, message = (text.format(root=workspace) for text in CASES[case])
    argv = ["--dataset", str(colour_dataset), "--output_dir", str(workspace / "new"), *TINY_RUN.split()]
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(workspace / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as run_command's environment has it
    before = snapshot(workspace)
    with pytest.raises(SystemExit) as exited:
        train_main([*argv, *flags.split()])
    _check_refusal(exited.value.code, capsys.readouterr().err, message)
    assert snapshot(workspace) == before  # no output folder, no cache file, nothing touched


def test_a_bad_flag_through_train_py(workspace, colour_dataset):
    command = [sys.executable, "train.py", "--dataset", str(colour_dataset), "--output_dir", str(workspace / "new")]
    _check_refused(workspace, [*command, "--model", "resnet7"], "unknown model 'resnet7'; choose one of: airbench94")


@pytest.mark.parametrize("output", ["new", "run --overwrite_output_dir"])
def test_a_warm_up_longer_than_the_run_is_refused_before_the_output_folder_is_touched(
    workspace, colour_dataset, output
):
    """Known only once the data is loaded (8 updates: 256 examples, batches of 32); refused before the folder
    is created, or the run it would replace is moved aside."""
    folder, *overwrite = output.split()
    command = [sys.executable, "train.py", "--dataset", str(colour_dataset), *TINY_RUN.split(),
               "--num_warmup_steps", "100", "--output_dir", str(workspace / folder), *overwrite]  # fmt: skip
    message = "--num_warmup_steps 100 must be fewer than the 8 optimizer updates this run makes (1 epoch of 8)"
    _check_refused(workspace, command, message)


def test_unreachable_hub(workspace):
    closed_port = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    command = [sys.executable, "train.py", "--dataset", "someone/cifar", "--output_dir", str(workspace / "new")]
    _check_refused(workspace, command, "cannot reach the Hugging Face Hub to load 'someone/cifar'", closed_port)


def test_tracker_that_is_not_installed(workspace, colour_dataset):
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    command = [sys.executable, "train.py", "--dataset", str(colour_dataset), "--output_dir", str(workspace / "new")]
    _check_refused(workspace, [*command, "--report_to", "wandb"], "--report_to wandb needs the wandb package")


def test_compare_something_that_is_not_a_run(workspace):
    command = cifar_accel_command("compare", str(workspace / "run"), str(workspace / "truncated"))
    _check_refused(workspace, command, f"{workspace}/truncated is not a finished run folder (missing train_config")


@pytest.mark.parametrize(
    ("command", "folder", "message"),
    [
        ("evaluate", "truncated", "{root}/truncated/model.safetensors is truncated or corrupt"),
        (
            "evaluate",
            "mismatched",
            "weights in {root}/mismatched/model.safetensors do not match architecture 'simple_cnn'",
        ),
        # This one printed a DataLoader worker's traceback, then evaluate waited for that worker for ever.
        ("evaluate", "zero_std", "{root}/zero_std/config.json: std must be a list of 3 positive finite numbers"),
        ("evaluate", "short_mean", "{root}/short_mean/config.json: mean must be a list of 3 finite numbers"),
        ("evaluate", "truncated_config", "{root}/truncated_config/config.json is not a cifar_accel model config"),
        ("predict", "big_image_size", "{root}/big_image_size/config.json: image_size must be null (32x32 images) or a"),
        ("predict", "string_class_names", "{root}/string_class_names/config.json: class_names must be a list of 4"),
    ],
)
def test_bad_saved_model(workspace, colour_dataset, command, folder, message):
    data = ["--dataset", str(colour_dataset)] if command == "evaluate" else [str(workspace / "red.png")]
    command_line = cifar_accel_command(command, "--model", str(workspace / folder), *data)
    _check_refused(workspace, command_line, message.format(root=workspace))


def test_a_bad_base_model_is_refused_in_one_line_under_two_processes(workspace, colour_dataset):
    launch = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --main_process_port 29677"
    flags = f"--init_from {workspace}/list_model_args --dataset {colour_dataset} --output_dir {workspace}/new"
    before = snapshot(workspace)
    result = run_command(accelerate_launch(*launch.split(), "train.py", *flags.split()))
    expected = f"error: {workspace}/list_model_args/config.json: model_args must be a JSON object"
    # Both processes refuse; their lines can interleave on the shared stderr, so look for the message itself.
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-3000:]
    assert "cifar_accel/" not in result.stderr.replace(str(workspace), ""), result.stderr[-3000:]  # no traceback
    assert snapshot(workspace) == before


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (
            "renamed_class",
            "the model's classes are not those of {root}/renamed_class (split 'test', column 'label'): class 2 is "
            "'blue' in the model but 'navy' in the dataset",
        ),
        (
            "reordered_classes",
            "the model's classes are not those of {root}/reordered_classes (split 'test', column 'label'): class 0 "
            "is 'red' in the model but 'green' in the dataset, class 1 is 'green' in the model but 'red'",
        ),
        (
            "text_labels",
            "label column 'label' is Value('string'), not a ClassLabel; class names are unknown",
        ),
    ],
)
def test_evaluate_refuses_a_dataset_whose_classes_are_not_the_models(workspace, dataset, message):
    command = cifar_accel_command("evaluate", "--model", str(workspace / "run"), "--dataset", str(workspace / dataset))
    _check_refused(workspace, command, message.format(root=workspace))


def _check_refused(workspace: Path, command: list[str], message: str, env: dict | None = None) -> None:
    before = snapshot(workspace)
    result = run_command(command, env={"CIFAR_ACCEL_CACHE": str(workspace / "cache"), **(env or {})})
    _check_refusal(result.returncode, result.stderr, message)
    assert snapshot(workspace) == before  # no output folder, no cache file, nothing touched


def _check_refusal(exit_code: int, stderr: str, message: str) -> None:
    """Exit status 2 and one line on stderr, the last, starting with the message; no traceback."""
    assert exit_code == 2, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), stderr[-2000:]
    assert stderr.rstrip().endswith(errors[0]) and "Traceback" not in stderr
