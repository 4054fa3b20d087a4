"""Every bad input the README lists: one line on stderr naming the value and what is valid,
exit status 2, no traceback, and nothing written or changed on disk."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
from conftest import cifar_accel_command, replace_column_values, run_command, write_hub_layout

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
    return root


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
    "output folder holds a run": ("--output_dir {root}/run", "--output_dir {root}/run already holds a run"),
    "fp16 on the CPU": ("--mixed_precision fp16", "--mixed_precision fp16 needs a GPU"),
    "Muon under fp16": (
        "--optimizer muon --mixed_precision fp16",
        "--optimizer muon does not run under --mixed_precision fp16; use bf16 or no",
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
    ("folder", "message"),
    [
        ("truncated", "{root}/truncated/model.safetensors is truncated or corrupt"),
        ("mismatched", "weights in {root}/mismatched/model.safetensors do not match architecture 'simple_cnn'"),
    ],
)
def test_bad_saved_model(workspace, colour_dataset, folder, message):
    command = cifar_accel_command("evaluate", "--model", str(workspace / folder), "--dataset", str(colour_dataset))
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
