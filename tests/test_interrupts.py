"""Every phase can be interrupted: SIGINT or SIGTERM leaves a state to continue from (or nothing at
all), says what to run next, and a run continued from it ends exactly like an uninterrupted one.

The signal is sent by the process to itself when a phase begins, in-process, so that it lands
in that phase every time rather than by luck of timing."""

import json
import os
import signal
from pathlib import Path

import pytest

from cifar_accel import build, engine, final, publish
from cifar_accel.errors import StoppedBySignal
from cifar_accel.reporting import RunFolder
from cifar_accel.settings import parse_train_args

FLAGS = "--model bn_cnn --epochs 2 --batch_size 64 --num_workers 0 --learning_rate 0.05 --label_smoothing 0"
TIMINGS = ("seconds", "train_seconds", "data_wait_seconds", "compute_seconds", "eval_seconds", "images_per_second")


def train(dataset: Path, output_dir: Path, *extra: str) -> dict:
    argv = ["--dataset", str(dataset), "--output_dir", str(output_dir), *FLAGS.split(), *extra]
    return engine.train(parse_train_args(argv))


def resume(output_dir: Path) -> dict:
    """What the printed resume command does: the checkpoint alone, every setting restored."""
    return engine.train(parse_train_args(["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]))


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key not in TIMINGS} for line in lines]


@pytest.fixture(scope="module")
def reference(colour_dataset, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, train(colour_dataset, run_dir)


def signal_on_call(monkeypatch, owner, name: str, signal_number: int) -> None:
    """The first call of ``owner.name`` first sends ``signal_number`` to this process."""
    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        if not calls:
            calls.append(name)
            os.kill(os.getpid(), signal_number)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


# phase: (what starts it, the signal sent there, how the stop describes where it happened)
RESUMABLE_PHASES = {
    # The evaluation in flight is dropped: the checkpoint holds the epoch trained, and a resume evaluates it.
    "the epoch's evaluation": ((engine, "evaluate"), signal.SIGTERM, "during the evaluation of epoch 1"),
    "the final evaluation": ((final, "score_predictions"), signal.SIGINT, "during the final evaluation"),
    # SLURM's warning before a job's time runs out
    "the reports": ((RunFolder, "save_reports"), signal.SIGUSR1, "while writing the reports"),
}  # the training steps themselves: test_resume.py, by SIGINT and SIGTERM from outside


@pytest.mark.parametrize("phase", RESUMABLE_PHASES)
def test_a_signal_in_any_phase_saves_a_checkpoint_that_resumes_exactly(
    reference, colour_dataset, tmp_path, monkeypatch, capsys, phase
):
    (owner, name), signal_number, where = RESUMABLE_PHASES[phase]
    signal_on_call(monkeypatch, owner, name, signal_number)
    with pytest.raises(StoppedBySignal) as stopped:
        train(colour_dataset, tmp_path)
    assert stopped.value.exit_code == 128 + signal_number
    output = capsys.readouterr().out
    assert f"{signal.Signals(signal_number).name}: stopped {where}; checkpoint saved to {tmp_path}" in output
    resume_line = next(line for line in output.splitlines() if line.startswith("resume with: "))
    assert resume_line.endswith(
        f"--resume_from_checkpoint {tmp_path}/checkpoints/step_{8 if 'epoch' not in phase else 4}"
    )
    monkeypatch.undo()
    results = resume(tmp_path)
    reference_dir, reference_results = reference
    assert records(tmp_path) == records(reference_dir)
    assert results["final_metrics"] == reference_results["final_metrics"]


def test_a_signal_while_loading_the_data_stops_at_once_and_writes_nothing(colour_dataset, tmp_path, monkeypatch):
    signal_on_call(monkeypatch, build, "load_data", signal.SIGTERM)
    with pytest.raises(StoppedBySignal, match="stopped while preparing the run; nothing was trained: run the same"):
        train(colour_dataset, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_signal_while_pushing_keeps_the_run_and_says_how_to_push_it(colour_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)

    def slow_push(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal should have stopped the push")  # reached only if it did not

    monkeypatch.setattr(publish, "push_run", slow_push)
    with pytest.raises(StoppedBySignal) as stopped:
        train(colour_dataset, tmp_path, "--push_to_hub", "--hub_model_id", "someone/colours")
    assert stopped.value.exit_code == 130
    assert stopped.value.message == (
        f"stopped while pushing; the run is saved in {tmp_path}: push it with cifar-accel push "
        f"--run_dir {tmp_path} --repo_id someone/colours"
    )
    assert (tmp_path / "results.json").is_file() and (tmp_path / "best" / "model.safetensors").is_file()


def test_a_signal_during_the_test_time_augmented_evaluation_drops_it_and_resumes_exactly(
    reference, colour_dataset, tmp_path, monkeypatch, capsys
):
    """The evaluation in flight is dropped at its next layer; the checkpoint after training makes a resume run
    it again."""
    signal_on_call(monkeypatch, final, "inference_model", signal.SIGTERM)
    scored = []
    monkeypatch.setattr(final, "score_predictions", lambda *args: scored.append(args))
    with pytest.raises(StoppedBySignal):
        train(colour_dataset, tmp_path, "--tta_level", "1")
    assert not scored  # neither evaluation ran to its end
    assert f"SIGTERM: stopped during the final evaluation; checkpoint saved to {tmp_path}" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists()
    monkeypatch.undo()
    results = resume(tmp_path)
    reference_dir, reference_results = reference
    assert records(tmp_path) == records(reference_dir)
    assert results["final_metrics"] == reference_results["final_metrics"] and results["tta_level"] == 1
