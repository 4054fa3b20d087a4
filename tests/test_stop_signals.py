"""Runs stopped the way jobs are stopped: a signal to the whole process group (``timeout``, SLURM,
``docker stop``, a terminal's Ctrl-C) under ``accelerate launch``, with DataLoader workers, while
steps take longer than the launcher's grace (5 s for the single-process launcher). Each stop must
end in a checkpoint, every process gone, the folder's lock free and a resume that ends bit for bit
like an uninterrupted run."""

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO_ROOT, accelerate_launch, run_command
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here launches and signals whole process groups

STEP_SECONDS = 6.0  # longer than accelerate's 5 s between its SIGTERM and SIGKILL
TRAINING = "--model slow_bn_cnn --batch_size 32 --learning_rate 0.05 --num_workers 2 --epochs 1 --checkpointing_steps 1"
SINGLE = "--num_processes 1 --mixed_precision no --dynamo_backend no"
TWO = (
    "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port {port}"
)
COMPARED = ("epoch", "train_loss", "train_acc", "train_examples", "eval_loss", "eval_top1", "eval_n", "lr")


def launch(dataset: Path, output_dir: Path, launcher_flags: str) -> list[str]:
    training = f"--dataset {dataset} --output_dir {output_dir} {TRAINING}"
    return accelerate_launch(*launcher_flags.split(), "tests/slow_train.py", *training.split())


@pytest.fixture(scope="module")
def references(colour_dataset, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs, at full speed, with one process and with two."""
    runs = {}
    for name, flags in (("single", SINGLE), ("two", TWO.format(port=29671))):
        run_dir = tmp_path_factory.mktemp(f"reference-{name}")
        result = run_command(launch(colour_dataset, run_dir, flags))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run_dir
    return runs


def processes_in_group(group: int) -> list[psutil.Process]:
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def as_from_a_terminal() -> None:
    """Ctrl-C's default in the launched command, as a terminal gives it. A shell without job control starts a
    background job (a CI script's `make test &`) with SIGINT ignored, and the launcher would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_mid_step(command: list[str], run_dir: Path, log: Path, stop_signal: signal.Signals) -> tuple[int, float]:
    """Start ``command`` in a process group of its own with slow steps; when step 1's checkpoint is written,
    wait until step 2 is in flight, signal the whole group, and return the exit status and the seconds until
    no process of the group is left."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                   "CIFAR_ACCEL_TEST_STEP_SECONDS": str(STEP_SECONDS)}  # fmt: skip
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
            preexec_fn=as_from_a_terminal,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "step_1" / "manifest.json").exists():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        time.sleep(STEP_SECONDS / 3)
        os.killpg(process.pid, stop_signal)
        signalled = time.monotonic()
        exit_code = process.wait(timeout=60)
        while processes_in_group(process.pid) and time.monotonic() - signalled < 60:
            time.sleep(0.1)
        return exit_code, time.monotonic() - signalled
    finally:
        for leftover in processes_in_group(process.pid):
            leftover.kill()


def compared_metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: record.get(key) for key in COMPARED} for record in records]


def assert_resumes_exactly(log: Path, reference: Path, run_dir: Path) -> None:
    """The printed resume command, run as printed, ends where the uninterrupted run ended."""
    [resume_line] = [line for line in log.read_text().splitlines() if line.startswith("resume with: ")]
    resume = shlex.split(resume_line.removeprefix("resume with: "))
    assert resume[:2] == ["accelerate", "launch"], resume_line
    result = run_command(accelerate_launch(*resume[2:]))  # the lock is free: a live holder would be refused
    assert result.returncode == 0, result.stderr[-3000:]
    assert compared_metrics(run_dir) == compared_metrics(reference)
    expected, actual = load_file(reference / "best/model.safetensors"), load_file(run_dir / "best/model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_ctrl_c_to_one_process_under_accelerate_launch_stops_within_its_grace_and_resumes_exactly(
    references, colour_dataset, tmp_path
):
    """A terminal's Ctrl-C reaches the launcher, the trainer and its workers; SIGTERM: the timeout test below."""
    run_dir, log = tmp_path / "run", tmp_path / "stopped.log"
    exit_code, seconds = stop_mid_step(launch(colour_dataset, run_dir, SINGLE), run_dir, log, signal.SIGINT)
    output = log.read_text()
    assert exit_code == 130, output[-3000:]
    # The step in flight is dropped: the checkpoint holds step 1, written before the launcher's SIGKILL.
    assert "SIGINT: stopped at epoch 1, step 1 (the step in flight was dropped); checkpoint saved" in output
    assert seconds < 5, f"{seconds:.1f} s until every process was gone"
    assert_resumes_exactly(log, references["single"], run_dir)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_two_processes_under_accelerate_launch_stop_together_and_resume_exactly(
    references, colour_dataset, tmp_path, stop_signal
):
    run_dir, log = tmp_path / "run", tmp_path / "stopped.log"
    command = launch(colour_dataset, run_dir, TWO.format(port=29672 + int(stop_signal)))
    exit_code, seconds = stop_mid_step(command, run_dir, log, stop_signal)
    output = log.read_text()
    assert exit_code == 128 + stop_signal, output[-3000:]
    # Both processes finish the step in flight, the only place they can agree to stop: within torchrun's 30 s.
    assert f"{stop_signal.name}: stopped at epoch 1, step 2; checkpoint saved" in output, output[-3000:]
    assert seconds < 30, f"{seconds:.1f} s until every process was gone"
    assert_resumes_exactly(log, references["two"], run_dir)


def test_sigterm_from_timeout_to_one_process_under_accelerate_launch_stops_within_its_grace_and_resumes_exactly(
    references, colour_dataset, tmp_path
):
    """``timeout`` sends SIGTERM to its whole process group when its time is up, as ``timeout 60 make train``
    does (SLURM, ``docker stop`` and Kubernetes alike); 30 s lands in the training of the slow run's eight
    6 s steps, after a start-up of about 10 s here."""
    run_dir, log = tmp_path / "run", tmp_path / "stopped.log"
    command = ["timeout", "30", *launch(colour_dataset, run_dir, SINGLE)]
    environment = {"CIFAR_ACCEL_TEST_STEP_SECONDS": str(STEP_SECONDS)}
    started = time.monotonic()
    result = run_command(command, timeout=120, env=environment)
    assert result.returncode == 124, result.stderr[-3000:]  # timeout's own status: the time was up
    assert time.monotonic() - started < 30 + 5, "the run outlived the launcher's grace"
    assert re.search(r"SIGTERM: stopped at epoch 1, step \d+ \(the step in flight was dropped\); checkpoint saved",
                     result.stdout), result.stdout[-3000:]  # fmt: skip
    log.write_text(result.stdout)
    assert_resumes_exactly(log, references["single"], run_dir)
