"""benchmarks/time_to_accuracy.py: its statistics, and CPU patches for airbench that leave torch as found."""

import importlib.util
import math
from types import ModuleType

import pytest
import torch
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def benchmark() -> ModuleType:
    """The script loaded as a module (benchmarks/ is not a package)."""
    path = REPO_ROOT / "benchmarks" / "time_to_accuracy.py"
    spec = importlib.util.spec_from_file_location("time_to_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standard_error_of_the_mean_and_none_for_one_run(benchmark: ModuleType) -> None:
    assert benchmark.mean_and_standard_error([2.0, 4.0]) == pytest.approx((3.0, 1.0))  # stdev sqrt(2), n 2
    assert benchmark.mean_and_standard_error([5.0]) == (5.0, None)
    assert benchmark.formatted([5.0], 2) == "5.00 (n=1)"
    assert benchmark.formatted([2.0, 4.0], 1) == "3.0 ± 1.0"


def test_time_ratio_is_the_ratio_of_means_with_delta_method_error(benchmark: ModuleType) -> None:
    ratio = benchmark.time_ratio([8.0, 12.0], [10.0, 30.0])
    assert ratio["ratio"] == pytest.approx(0.5)
    assert ratio["standard_error"] == pytest.approx(0.5 * math.hypot(2.0 / 10.0, 10.0 / 20.0))
    assert (ratio["min"], ratio["max"]) == pytest.approx((0.4, 0.8))
    assert benchmark.time_ratio([3.0], [4.0])["standard_error"] is None


def patched_names() -> tuple:
    return torch.load, torch.cuda.Event, torch.cuda.synchronize, torch.nn.Module.cuda, torch.nn.Module.half


def test_cpu_patches_apply_only_inside_and_are_undone(benchmark: ModuleType) -> None:
    originals = patched_names()
    layer = torch.nn.Linear(2, 2)
    with benchmark.airbench_runs_on_cpu():
        assert torch.zeros(2, dtype=torch.uint8).half().dtype == torch.uint8
        assert layer.half().cuda().weight.dtype == torch.float32
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        end.record()
        torch.cuda.synchronize()
        assert start.elapsed_time(end) >= 0
    assert patched_names() == originals
    assert "half" not in vars(torch.Tensor) and torch.zeros(2).half().dtype == torch.float16
