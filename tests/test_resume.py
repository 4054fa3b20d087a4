"""The resume promise: a run killed at any step and resumed ends bit for bit where an
uninterrupted run ends; signals save and stop; no secret or pickle payload gets through."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_command
from safetensors.torch import load_file

from cifar_accel.checkpoint import write_manifest
from cifar_accel.run_records import selected_metric

FAKE_TOKEN = "hf_cifarAccelFakeToken0123456789"
VARIANTS = {
    # Every per-image and per-batch random draw, and the moving average of the weights, resume exactly.
    "torch loader, 2 workers": "--model bn_cnn --batch_size 32 --learning_rate 0.05 --label_smoothing 0.1 "
    "--num_workers 2 --auto_augment cifar10 --random_erasing 0.25 --mixup 0.4 --cutmix 1.0 --model_ema 0.9 "
    "--max_grad_norm 2",
    # Muon's state, the whitening bias's own decay and the lookahead's average all resume exactly.
    "device loader, airbench94_muon with lookahead": "--recipe airbench94_muon --batch_size 32 --lookahead",
}
COMMON = "--epochs 3 --checkpointing_steps 5"  # 8 steps per epoch: checkpoints at steps 5, 10, 15, 20
COMPARED = (
    "epoch", "train_loss", "train_acc", "train_examples", "eval_loss", "eval_top1", "eval_top5", "eval_n", "lr",
    "ema_eval_loss", "ema_eval_top1", "selected_weights",
)  # fmt: skip


def train_command(dataset: Path, output_dir: Path, variant: str, *extra: str) -> list[str]:
    flags = f"--dataset {dataset} --output_dir {output_dir} {VARIANTS[variant]} {COMMON}"
    return [sys.executable, "train.py", *flags.split(), *extra]


@pytest.fixture(scope="module")
def reference_runs(colour_dataset, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Each variant trained without interruption, with a (fake) Hub token in the environment; the torch
    loader's keeps only its two newest checkpoints."""
    runs = {}
    for variant in VARIANTS:
        run_dir = tmp_path_factory.mktemp("reference")
        limit = ("--checkpoints_total_limit", "2") if variant == "torch loader, 2 workers" else ()
        command = train_command(colour_dataset, run_dir, variant, *limit)
        result = run_command(command, env={"HF_TOKEN": FAKE_TOKEN})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[variant] = run_dir, result
    return runs


def compared_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: record.get(key) for key in COMPARED} for record in records]  # the airbench recipe evaluates once


def assert_same_training(reference: Path, resumed: Path) -> None:
    assert len(compared_metrics(reference)) == 3
    assert compared_metrics(resumed) == compared_metrics(reference)
    for weights in ("best/model.safetensors", "checkpoints/step_20/model.safetensors"):
        expected, actual = load_file(reference / weights), load_file(resumed / weights)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[name], actual[name]) for name in expected), weights


def start_and_wait_for(command: list[str], checkpoint: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (checkpoint / "progress.json").exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    return process


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_run_killed_mid_epoch_and_resumed_ends_bit_for_bit_like_an_uninterrupted_one(
    reference_runs, colour_dataset, tmp_path, variant
):
    run_dir = tmp_path / "run"
    command = train_command(colour_dataset, run_dir, variant, "--report_to", "tensorboard")
    process = start_and_wait_for(command, run_dir / "checkpoints" / "step_10", tmp_path / "killed.log")
    process.kill()  # SIGKILL: no chance to save anything more
    process.wait()
    assert not (run_dir / "results.json").exists(), "the run finished before it was killed"
    result = run_command([*command, "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert_same_training(reference_runs[variant][0], run_dir)
    # The resumed epoch's speed counts only the images trained after the resume (8 steps of 32 per epoch).
    epoch, step = map(int, re.search(r"resuming from .*: epoch (\d+), step (\d+)", result.stdout).groups())
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[epoch - 1])
    assert record["images_per_second"] * record["train_seconds"] == pytest.approx((8 - step) * 32)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["timing"]["resumed"] is True
    # The saved best model is the weights chosen: with --model_ema, the raw ones or their average.
    assert results["final_metrics"]["top1"] == selected_metric(results["best_metrics"], "top1")
    # TensorBoard holds each epoch once: what the killed run logged after its checkpoint is purged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "cifar_accel"))
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2, 3]


def test_a_diverging_run_stops_naming_epoch_and_step_and_keeps_the_checkpoints_before_it(colour_dataset, tmp_path):
    flags = "--model bn_cnn --batch_size 8 --learning_rate 1e12 --warmup_fraction 0 --num_workers 0"
    command = [sys.executable, "train.py", "--dataset", str(colour_dataset), "--output_dir", str(tmp_path)]
    result = run_command([*command, *flags.split(), "--checkpointing_steps", "1"])
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        r"error: training loss became nan or inf at epoch 1, step (\d+); checkpoints saved before it are kept; "
        r"lower --learning_rate",
        last_line,  # already in float32: no advice to change the precision
    )
    assert match, last_line
    bad_step = int(match.group(1))
    saved_steps = sorted(int(folder.name.removeprefix("step_")) for folder in tmp_path.glob("checkpoints/step_*"))
    assert saved_steps == list(range(1, bad_step))  # every step before the first non-finite loss, none after


@pytest.mark.slow
def test_total_limit_keeps_the_newest_checkpoints(reference_runs):
    run_dir = reference_runs["torch loader, 2 workers"][0]
    assert sorted(folder.name for folder in (run_dir / "checkpoints").iterdir()) == ["step_15", "step_20"]


@pytest.mark.slow
def test_no_token_reaches_logs_or_files(reference_runs):
    for run_dir, result in reference_runs.values():
        assert FAKE_TOKEN not in result.stdout + result.stderr
        for path in run_dir.rglob("*"):
            if path.is_file():
                assert FAKE_TOKEN.encode() not in path.read_bytes(), path


class _WritesAFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_a_checkpoint_with_a_pickled_payload_is_refused_without_running_it(reference_runs, colour_dataset, tmp_path):
    variant = "torch loader, 2 workers"
    run_dir, marker = tmp_path / "run", tmp_path / "payload_ran"
    shutil.copytree(reference_runs[variant][0], run_dir)
    checkpoint = run_dir / "checkpoints" / "step_15"
    torch.save({"state": _WritesAFileWhenUnpickled(marker)}, checkpoint / "optimizer.bin")
    write_manifest(checkpoint)  # as a forger would: the manifest guards against accidents, not attackers
    result = run_command(
        [*train_command(colour_dataset, run_dir, variant), "--resume_from_checkpoint", str(checkpoint)]
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot resume from {checkpoint}")
    assert not marker.exists()
