"""Property-based: any combination of flag values, sensible or not, either trains or is refused
in one line naming a flag, and a refusal changes nothing on disk.

Validation is drawn many times (it stops before any work); training only a handful of times.
"""

import contextlib
import io
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifar_accel.cli import train_main
from cifar_accel.errors import UserError
from cifar_accel.settings import parse_train_args

numbers = st.floats(allow_nan=True, allow_infinity=True)
FLAG_VALUES = {
    "--epochs": st.one_of(st.integers(-2, 2), st.sampled_from(["two", "1.5", "0.1", "nan", "inf", ""])),
    "--eval_strategy": st.sampled_from(["epoch", "no", "steps"]),
    "--eval_epochs": st.integers(-1, 3),
    "--warmup_start_fraction": st.floats(-0.5, 1.5),
    "--validation_size": st.integers(0, 8),
    "--compile_mode": st.sampled_from(["default", "max-autotune", "fast"]),
    "--batch_size": st.one_of(st.integers(-1, 96), st.just("lots")),
    "--learning_rate": st.one_of(numbers, st.floats(1e-4, 0.1), st.just("fast")),
    "--momentum": st.one_of(numbers, st.floats(0, 0.99)),
    "--weight_decay": st.one_of(numbers, st.floats(0, 1e-3)),
    "--label_smoothing": st.floats(-0.5, 1.5),
    "--warmup_fraction": st.floats(-0.5, 1.5),
    "--gamma": st.floats(-1, 2),
    "--milestones": st.lists(st.floats(-0.5, 1.5), min_size=1, max_size=3),
    "--seed": st.integers(-3, 2**33),
    "--crop_padding": st.integers(-2, 40),
    "--cutout": st.integers(-2, 40),
    "--num_workers": st.integers(-1, 80),
    "--max_train_samples": st.integers(-1, 64),
    "--tta_level": st.integers(-1, 3),
    "--model": st.sampled_from(["bn_cnn", "simple_cnn", "resnet7"]),
    "--model_args": st.sampled_from(['{"conv_dropout": 0.2}', '{"conv_dropout": 3}', '{"width": 2}', "[1]", "{"]),
    "--optimizer": st.sampled_from(["sgd", "adamw", "muon", "adam"]),
    "--muon_learning_rate": st.one_of(numbers, st.floats(0.01, 0.5)),
    "--muon_momentum": st.floats(-0.5, 1.5),
    "--mixup": st.one_of(numbers, st.floats(0, 1)),
    "--model_ema": st.floats(-0.5, 1.5),
    "--max_grad_norm": st.one_of(numbers, st.floats(0.1, 10)),
    "--scheduler": st.sampled_from(["linear", "onecycle", "cosine", "multistep", "constant", "step"]),
    "--checkpointing_steps": st.sampled_from(["epoch", "0", "3", "often", "-1"]),
    "--output_dir": st.sampled_from(["new", "holds_a_run", "a_file", "a_file/run", ""]),
}


def argv_from(drawn: dict, workspace: Path) -> list[str]:
    argv = []
    for flag, value in drawn.items():
        if flag == "--output_dir":
            value = str(workspace / value) if value else ""
        argv += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return argv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flags")
    (root / "holds_a_run").mkdir()
    (root / "holds_a_run" / "metrics.jsonl").write_text("{}\n")
    (root / "a_file").write_text("not a folder")
    return root


def snapshot(root: Path) -> dict:
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(root.rglob("*"))}


def assert_within_documented_ranges(config) -> None:
    """An accepted configuration holds only values docs/flags.md documents as valid."""
    assert math.isfinite(config.learning_rate) and config.learning_rate > 0
    assert 0 <= config.momentum < 1 and 0 <= config.label_smoothing < 1 and 0 <= config.warmup_fraction <= 1
    assert math.isfinite(config.weight_decay) and config.weight_decay >= 0 and config.gamma > 0
    assert 0 <= config.seed < 2**32 and 0 <= config.crop_padding < 32 and 0 <= config.cutout < 32
    assert 0 < config.epochs <= 10**6 and config.batch_size >= 1 and config.tta_level in (0, 1, 2)
    assert config.eval_epochs >= 1 and 0 <= config.warmup_start_fraction <= 1
    assert not (config.eval_strategy == "no" and config.validation_size)  # nothing would be selected on it
    assert config.compile or config.compile_mode == "default"
    assert 0 < config.muon_learning_rate < math.inf and 0 <= config.muon_momentum < 1
    assert config.optimizer == "muon" or (config.muon_learning_rate, config.muon_momentum) == (0.24, 0.6)
    assert 0 <= config.mixup < math.inf and 0 <= config.model_ema < 1
    assert config.max_grad_norm is None or 0 < config.max_grad_norm < math.inf
    assert all(0 < milestone < 1 for milestone in config.milestones) and config.milestones == sorted(config.milestones)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=st.fixed_dictionaries({}, optional=FLAG_VALUES))
def test_any_flags_are_accepted_within_range_or_refused_in_one_line_without_a_trace(workspace, drawn):
    before = snapshot(workspace)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            config = parse_train_args(argv_from(drawn, workspace))
        except UserError as error:
            message = str(error)
            assert "\n" not in message and ("--" in message or "unknown model" in message), message
        else:
            assert_within_documented_ranges(config)
    assert snapshot(workspace) == before


TRAINED_FLAGS = ("--learning_rate", "--momentum", "--label_smoothing", "--seed", "--crop_padding", "--cutout",
                 "--warmup_fraction", "--optimizer")  # fmt: skip
TRAINABLE = {flag: FLAG_VALUES[flag] for flag in TRAINED_FLAGS}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=st.fixed_dictionaries({}, optional=TRAINABLE))
def test_a_handful_of_drawn_runs_train_or_stop_in_one_line(colour_dataset, tmp_path_factory, drawn):
    """Through the command-line entry point: exit 0 with a results file, or exit 2 with one line."""
    output_dir = tmp_path_factory.mktemp("drawn") / "run"
    tiny = f"--model simple_cnn --epochs 1 --batch_size 64 --num_workers 0 --dataset {colour_dataset}".split()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            train_main([*tiny, "--output_dir", str(output_dir), *argv_from(drawn, output_dir)])
            status = 0
        except SystemExit as stopped:
            status = stopped.code
    error_lines = [line for line in errors.getvalue().splitlines() if line.startswith("error:")]
    if status == 0:
        assert (output_dir / "results.json").is_file() and not error_lines
    else:
        assert status == 2 and len(error_lines) == 1 and "Traceback" not in errors.getvalue(), errors.getvalue()
        assert not (output_dir / "results.json").exists()
