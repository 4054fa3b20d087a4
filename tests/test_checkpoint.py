"""Saves are atomic: a failure in the middle of one leaves the previous files as they were."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from cifar_accel import files, load_model, saved_model
from cifar_accel.checkpoint import (
    TrainingProgress,
    checkpoint_folders,
    find_checkpoint,
    load_checkpoint,
    resume_command,
    save_checkpoint,
)
from cifar_accel.errors import UserError
from cifar_accel.models import get_model
from cifar_accel.reporting import RunFolder, refuse_existing_run

RUN = {"architecture": {"model": "simple_cnn", "model_args": {}, "num_classes": 3}, "settings": {}}


def _files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def _fail_after_writing_half(real_write):
    def write(contents, path, *args, **kwargs):
        real_write(contents, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError("No space left on device (injected)")

    return write


def test_a_model_save_that_fails_midway_leaves_the_previous_model(tmp_path, monkeypatch):
    config = saved_model.model_config("simple_cnn", {}, ["a", "b", "c"], [0.5] * 3, [0.25] * 3)
    saved_model.save_model(get_model("simple_cnn", num_classes=3), tmp_path, config)
    before = _files(tmp_path)
    monkeypatch.setattr(saved_model, "save_file", _fail_after_writing_half(saved_model.save_file))
    with pytest.raises(OSError, match="injected"):
        saved_model.save_model(get_model("simple_cnn", num_classes=3), tmp_path, config)
    assert _files(tmp_path) == before  # no temporary file left beside it
    load_model(tmp_path)  # still loads


def test_a_json_write_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    files.write_json(results, {"top1": 0.5})
    real_write_text = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("injected")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="injected"):
        files.write_json(results, {"top1": 0.9, "top5": 1.0})
    monkeypatch.undo()
    assert json.loads(results.read_text()) == {"top1": 0.5}
    assert [path.name for path in tmp_path.iterdir()] == ["results.json"]


def test_a_checkpoint_interrupted_while_saving_leaves_the_earlier_ones_usable(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model = get_model("simple_cnn", num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    weights_at_step_1 = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    first = save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=1), {"x": torch.ones(2)}, RUN)
    before = _files(tmp_path)

    real_save_state = accelerator.save_state

    def save_half_then_fail(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)
        raise RuntimeError("killed while saving (injected)")

    monkeypatch.setattr(accelerator, "save_state", save_half_then_fail)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="injected"):
        save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=2), {"x": torch.zeros(2)}, RUN)
    after = _files(tmp_path)
    assert {name: after[name] for name in before} == before
    assert checkpoint_folders(tmp_path) == [first] and find_checkpoint("latest", tmp_path) == (first, [])

    monkeypatch.undo()
    second = save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=2), {"x": torch.zeros(2)}, RUN)
    # The incomplete folder left by the failure is gone.
    assert sorted(folder.name for folder in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2"]
    progress, tensors = load_checkpoint(accelerator, first)
    assert progress.global_step == 1 and torch.equal(tensors["x"], torch.ones(2))
    assert all(torch.equal(model.state_dict()[name], weights_at_step_1[name]) for name in weights_at_step_1)
    assert load_checkpoint(accelerator, second)[0].global_step == 2


def test_latest_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in .*checkpoints; pass a checkpoint folder"):
        find_checkpoint("latest", tmp_path)


def test_the_resume_command_is_the_launch_and_the_checkpoint_alone(monkeypatch):
    """The checkpoint restores every setting, so flags given to the stopped run are not repeated."""
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    argv = ["train.py", "--epochs", "3", "--resume_from_checkpoint", "old", "--overwrite_output_dir", "--seed", "1"]
    checkpoint = Path("out/checkpoints/step_7")
    assert resume_command(checkpoint, 1, argv) == "python train.py --resume_from_checkpoint out/checkpoints/step_7"
    assert resume_command(checkpoint, 1, ["/venv/bin/cifar-accel", "train", "--lr_note=a b"]) == (
        "cifar-accel train --resume_from_checkpoint out/checkpoints/step_7"
    )
    assert resume_command(checkpoint, 2, ["train.py"]) == (
        "accelerate launch --multi_gpu --num_processes 2 train.py --resume_from_checkpoint out/checkpoints/step_7"
    )
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # as set by accelerate launch
    assert resume_command(checkpoint, 1, ["train.py"]).startswith("accelerate launch train.py")
    # Two machines of two processes each: the launch names the rendezvous it had.
    for name, value in {
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
    }.items():
        monkeypatch.setenv(name, value)
    assert resume_command(checkpoint, 4, ["train.py"]) == (
        "accelerate launch --multi_gpu --num_processes 4 --num_machines 2 --machine_rank 0 --main_process_ip "
        "127.0.0.1 --main_process_port 29511 train.py --resume_from_checkpoint out/checkpoints/step_7"
    )


@pytest.fixture
def saved_checkpoints(tmp_path) -> list[Path]:
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(get_model("simple_cnn", num_classes=3), None)
    return [
        save_checkpoint(accelerator, tmp_path, TrainingProgress(global_step=step), {"x": torch.ones(2)}, RUN)
        for step in (1, 2)
    ]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda folder: (folder / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda folder: (folder / "random_states_0.pkl").write_bytes(b"x"), "random_states_0.pkl was changed"),
        (lambda folder: (folder / "extra.bin").write_bytes(b"x"), "extra.bin was added"),
        (lambda folder: (folder / "manifest.json").unlink(), "it has no manifest.json"),
        (lambda folder: (folder / "manifest.json").write_text("{"), "its manifest.json is unreadable"),
    ],
)
def test_an_incomplete_or_altered_checkpoint_is_refused_and_latest_falls_back(saved_checkpoints, damage, problem):
    first, second = saved_checkpoints
    damage(second)
    with pytest.raises(UserError, match=f"cannot resume from {second}: {problem}"):
        find_checkpoint(str(second), second.parent.parent)
    checkpoint, notes = find_checkpoint("latest", second.parent.parent)
    if problem.startswith("it has no manifest"):  # not a finished checkpoint: not even a candidate
        assert (checkpoint, notes) == (first, [])
    else:
        assert checkpoint == first and len(notes) == 1
        assert notes[0].startswith(f"checkpoint {second} is skipped: {problem}")
    damage(first)
    with pytest.raises(UserError, match="no c"):
        find_checkpoint("latest", second.parent.parent)


def test_a_new_run_replaces_only_what_it_was_allowed_to_and_only_after_its_first_epoch(tmp_path):
    for name in ("metrics.jsonl", "results.json", "notes.txt"):
        (tmp_path / name).write_text("old")
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds a run \\(metrics.jsonl, results.json, checkpoints\\)"):
        refuse_existing_run(tmp_path)
    RunFolder(tmp_path, resuming=True).close()
    assert (tmp_path / "results.json").exists()  # a resumed run keeps its files
    folder = RunFolder(tmp_path, overwrite=True)  # what --overwrite_output_dir leads to
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock", ".replaced_run", "notes.txt"]
    (tmp_path / "metrics.jsonl").write_text("new")
    folder.discard_run()  # the new run failed before its first epoch ended
    assert (tmp_path / "metrics.jsonl").read_text() == "old" and (tmp_path / "checkpoints" / "step_3").is_dir()
    folder.close()
    folder = RunFolder(tmp_path, overwrite=True)
    folder.drop_replaced_run()  # the new run finished an epoch
    folder.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock", "notes.txt"]  # the user's own file stays


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    first = RunFolder(tmp_path)
    with pytest.raises(UserError, match=f"--output_dir {tmp_path} is in use by another run \\(pid {os.getpid()} on "):
        RunFolder(tmp_path, overwrite=True)
    first.close()
    RunFolder(tmp_path, overwrite=True).close()  # free again once the first has ended


def test_a_file_in_the_way_of_a_checkpoint_is_skipped_by_latest_and_replaced_by_the_save(saved_checkpoints):
    first, second = saved_checkpoints
    shutil.rmtree(second)
    second.write_text("junk")
    assert find_checkpoint("latest", first.parent.parent) == (first, [])
    accelerator = Accelerator(cpu=True)
    saved = save_checkpoint(
        accelerator, first.parent.parent, TrainingProgress(global_step=2), {"x": torch.ones(2)}, RUN
    )
    assert saved.is_dir() and find_checkpoint("latest", first.parent.parent) == (saved, [])
    assert sorted(path.name for path in first.parent.iterdir()) == ["step_1", "step_2"]
