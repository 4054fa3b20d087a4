"""``train --seeds``: one run folder per seed, the same runs as separate commands give, an honest summary, and a
stopped experiment continued by the same command."""

import dataclasses
import json
import os
import re
import shlex
import signal
import statistics
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_command
from safetensors.torch import load_file

import cifar_accel.build
import cifar_accel.seeds
from cifar_accel.checkpoint import rerun_command
from cifar_accel.data import load_data
from cifar_accel.engine import train
from cifar_accel.errors import StoppedBySignal, UserError
from cifar_accel.seeds import run_seeds
from cifar_accel.settings import parse_train_args

FLAGS = "--model simple_cnn --epochs 2 --batch_size 64 --learning_rate 0.05 --num_workers 0 --tta_level 1"


def _config(dataset: Path, output_dir: Path, *extra: str):
    return parse_train_args([*f"--dataset {dataset} --output_dir {output_dir} {FLAGS}".split(), *extra])


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "best" / "model.safetensors")


def _assert_same_weights(first: Path, second: Path) -> None:
    one, other = _weights(first), _weights(second)
    assert one.keys() == other.keys()
    assert all(torch.equal(one[name], other[name]) for name in one), f"{first} and {second} differ"


@pytest.fixture(scope="module")
def separate_runs(colour_dataset, tmp_path_factory) -> dict[int, Path]:
    """Seeds 0, 1 and 2, each a run of its own."""
    root = tmp_path_factory.mktemp("separate")
    for seed in range(3):
        train(_config(colour_dataset, root / str(seed), "--seed", str(seed)))
    return {seed: root / str(seed) for seed in range(3)}


def test_seeds_are_the_runs_separate_commands_give_and_the_summary_is_theirs(
    colour_dataset, separate_runs, tmp_path, monkeypatch
):
    loads = []
    monkeypatch.setattr(cifar_accel.build, "load_data", lambda config: loads.append(config.seed) or load_data(config))
    summary = run_seeds(_config(colour_dataset, tmp_path, "--seeds", "0-2", "--target_accuracy", "0.3"))

    assert loads == [0]  # the data is loaded once for the three seeds

    for seed, run_dir in separate_runs.items():
        _assert_same_weights(tmp_path / f"seed_{seed}", run_dir)
        assert json.loads((tmp_path / f"seed_{seed}" / "train_config.json").read_text())["seed"] == seed
    assert summary == json.loads((tmp_path / "seeds.json").read_text())
    assert summary["finished"] and [run["seed"] for run in summary["runs"]] == [0, 1, 2]
    results = [json.loads((tmp_path / f"seed_{seed}" / "results.json").read_text()) for seed in range(3)]
    top1 = [result["final_metrics"]["top1"] for result in results]
    assert summary["top1"]["n"] == 3
    assert summary["top1"]["mean"] == pytest.approx(statistics.mean(top1), abs=1e-12)
    assert summary["top1"]["sd"] == pytest.approx(statistics.stdev(top1), abs=1e-12)
    assert summary["top1"]["se"] == pytest.approx(statistics.stdev(top1) / 3**0.5, abs=1e-12)
    low, high = summary["top1"]["ci95"]
    assert low < statistics.mean(top1) < high or low == high
    assert [run["tta_top1"] for run in summary["runs"]] == [result["tta_metrics"]["top1"] for result in results]
    assert summary["top1"]["target"] == 0.3 and 0 <= summary["top1"]["p_value"] <= 1
    # Settings shared by the seeds, without the seed itself: what a continuing command must repeat.
    assert "seed" not in summary["settings"] and summary["settings"]["model"] == "simple_cnn"


def test_a_stop_in_the_second_seed_is_continued_by_the_same_command_bit_for_bit(
    colour_dataset, separate_runs, tmp_path, monkeypatch
):
    config = _config(colour_dataset, tmp_path, "--seeds", "0-2")
    run = cifar_accel.seeds.train

    def sigterm_after_first_epoch_of_seed_1(seed_config, on_evaluation=None, resume_hint=None):
        def stop(record: dict) -> None:
            if record["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        return run(seed_config, stop if seed_config.seed == 1 else on_evaluation, resume_hint)

    monkeypatch.setattr(cifar_accel.seeds, "train", sigterm_after_first_epoch_of_seed_1)
    with pytest.raises(StoppedBySignal):
        run_seeds(config)
    monkeypatch.undo()
    stopped = json.loads((tmp_path / "seeds.json").read_text())
    assert not stopped["finished"] and [run["seed"] for run in stopped["runs"]] == [0]
    assert (tmp_path / "seed_1" / "checkpoints").is_dir() and not (tmp_path / "seed_2").exists()
    first_seed_results = (tmp_path / "seed_0" / "results.json").stat().st_mtime_ns

    summary = run_seeds(config)

    assert (tmp_path / "seed_0" / "results.json").stat().st_mtime_ns == first_seed_results  # skipped, not retrained
    assert summary["finished"] and summary["top1"]["n"] == 3
    for seed, run_dir in separate_runs.items():
        _assert_same_weights(tmp_path / f"seed_{seed}", run_dir)


def test_an_experiment_with_other_settings_in_the_folder_is_refused_before_anything_is_written(
    colour_dataset, tmp_path
):
    run_seeds(_config(colour_dataset, tmp_path, "--seeds", "0", "--epochs", "1"))
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"holds a --seeds experiment with other settings \(epochs\)"):
        run_seeds(_config(colour_dataset, tmp_path, "--seeds", "0-1"))
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--seeds 3-1", r"--seeds '3-1': '3-1': seeds run from low to high"),
        ("--seeds 0,x", r"--seeds '0,x': 'x' is not a seed"),
        ("--seeds 0-2,1", r"a seed is given twice"),
        ("--seeds 0-99999", r"at most 10,000 seeds"),
        ("--target_accuracy 0.9", r"--target_accuracy tests the mean of several runs: give --seeds"),
        ("--seeds 0-2 --target_accuracy 94", r"--target_accuracy must be a fraction in \(0, 1\)"),
    ],
)
def test_bad_seeds_and_targets_are_one_line_errors(flags, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(flags.split())


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"push_to_hub": True, "hub_model_id": "alice/x"}, "would push every seed's model to one repo"),
        ({"resume_from_checkpoint": "latest"}, "drop --resume_from_checkpoint"),
    ],
)
def test_flags_that_mean_one_run_are_refused_with_seeds(colour_dataset, tmp_path, settings, message):
    config = dataclasses.replace(_config(colour_dataset, tmp_path / "run", "--seeds", "0-1"), **settings)
    with pytest.raises(UserError, match=message):
        run_seeds(config)
    assert not (tmp_path / "run").exists()


def test_the_command_that_continues_an_experiment_is_the_one_run_less_overwrite():
    argv = ["train.py", "--seeds", "0-4", "--overwrite_output_dir", "--output_dir", "a b"]
    assert rerun_command(1, argv) == "python train.py --seeds 0-4 --output_dir 'a b'"
    assert rerun_command(1, ["/venv/bin/cifar-accel", "train", "--seeds", "1"]) == "cifar-accel train --seeds 1"


@pytest.mark.slow
def test_sigterm_to_the_process_group_mid_experiment_then_the_printed_command_finishes_it(colour_dataset, tmp_path):
    """As ``timeout`` or SLURM stop it: the whole process group, in the second seed; the printed command continues."""
    output_dir = tmp_path / "seeds"
    command = [sys.executable, "train.py", *f"--dataset {colour_dataset} --output_dir {output_dir} {FLAGS}".split(),
               "--seeds", "0-2", "--epochs", "4"]  # fmt: skip
    stopper = (
        "import os, signal, subprocess, sys, time\n"
        f"process = subprocess.Popen({command!r}, start_new_session=True, stderr=subprocess.PIPE, text=True)\n"
        f"while not os.path.exists({str(output_dir / 'seed_1' / 'metrics.jsonl')!r}): time.sleep(0.1)\n"
        "os.killpg(process.pid, signal.SIGTERM)\n"
        "sys.stderr.write(process.stderr.read()); sys.exit(process.wait())\n"
    )
    stopped = run_command([sys.executable, "-c", stopper])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    resume = re.search(r"resume with: (.+)", stopped.stdout + stopped.stderr)
    assert resume and "--seeds 0-2" in resume.group(1) and "--resume_from_checkpoint" not in resume.group(1)
    assert json.loads((output_dir / "seeds.json").read_text())["runs"][0]["seed"] == 0

    continued = run_command([sys.executable, *shlex.split(resume.group(1))[1:]])
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "seed 0 (1 of 3): finished before" in continued.stdout
    assert json.loads((output_dir / "seeds.json").read_text())["top1"]["n"] == 3


@pytest.mark.parametrize("content, problem", [("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object")])
def test_a_damaged_seeds_json_is_a_one_line_error_and_nothing_is_written(colour_dataset, tmp_path, content, problem):
    (tmp_path / "seeds.json").write_text(content)
    with pytest.raises(UserError, match=f"--output_dir {tmp_path}: seeds.json {problem}.*--overwrite_output_dir"):
        run_seeds(_config(colour_dataset, tmp_path, "--seeds", "0-1"))
    assert [path.name for path in tmp_path.iterdir()] == ["seeds.json"]
