"""Speed-run mode: what airbench does is all that runs in the timed region.

No host-device synchronisation inside a training step or a batch fetch, one compilation for a whole
compiled run, the last model kept without per-epoch evaluation, a fractional last epoch.
"""

import json
import time
import traceback

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

from cifar_accel import accel, build, engine, final
from cifar_accel.errors import UserError
from cifar_accel.selection import BestModelSaver
from cifar_accel.settings import parse_train_args
from cifar_accel.stopping import StopRequest

# Calls after which the host holds a value computed on the device, so it waits for the device's queue.
WAITING_CALLS = {
    Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__,
    Tensor.nonzero, torch.nonzero, Tensor.cpu, Tensor.numpy, Tensor.masked_select, torch.masked_select,
    Tensor.unique, torch.unique,
}  # fmt: skip


class HostSyncRecorder(TorchFunctionMode):
    """Records each call that would make the host wait for a GPU, with the line of our code that made it.

    On the CPU nothing waits, but the same calls are made: boolean-mask indexing counts too, since
    the size of its result must be read back.
    """

    def __init__(self, step: callable):
        super().__init__()
        self.step, self.calls = step, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        indexing = func in (Tensor.__getitem__, Tensor.__setitem__) and _has_boolean_mask(args[1])
        if func in WAITING_CALLS or indexing:
            self.calls.append((self.step(), func.__name__, _calling_line()))
        return func(*args, **(kwargs or {}))


def _has_boolean_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, Tensor) and part.dtype == torch.bool for part in parts)


def _calling_line() -> str:
    """The innermost code that made the call, as ``folder/file.py:function``."""
    frame = next(
        frame
        for frame in reversed(traceback.extract_stack())
        if frame.filename != __file__ and not frame.filename.endswith("torch/overrides.py")
    )
    return f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.name}"


def test_the_recorder_sees_a_boolean_mask_and_a_read_back():
    values = torch.arange(4.0)
    with HostSyncRecorder(lambda: 0) as recorder:
        values[values > 1] = 0
        values.sum().item()
    assert [name for _, name, _ in recorder.calls] == ["__setitem__", "item"]


def speed_run_config(dataset, output_dir, *flags: str, recipe: str = "airbench94"):
    return parse_train_args(["--recipe", recipe, "--dataset", str(dataset), "--output_dir", str(output_dir), *flags])


@pytest.mark.parametrize("recipe", ["airbench94", "airbench94_muon"])
def test_an_airbench_epoch_reads_back_from_the_device_only_every_20_steps_and_at_its_end(
    colour_dataset, tmp_path, monkeypatch, recipe
):
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(tmp_path / "cache"))
    config = speed_run_config(colour_dataset, tmp_path / "run", "--batch_size", "8", "--model_args",
                              '{"widths": [16, 32, 32]}', recipe=recipe)  # fmt: skip
    with StopRequest() as stop:
        run = build.build_run(config, time.perf_counter(), stop)
        try:
            steps_per_epoch = len(run.train_loader)
            with engine.progress_bar(run) as bar, HostSyncRecorder(lambda: run.progress.step_in_epoch) as recorder:
                engine.train_epoch(run, BestModelSaver(run), stop, bar)
        finally:
            run.folder.close()
    assert steps_per_epoch == 32 and run.progress.epoch == 2
    by_step = {}
    for step, name, line in recorder.calls:
        # The sampler's permutation and the DataLoader's seed are host tensors (a CPU generator's): no wait.
        if not line.startswith("data/"):
            by_step.setdefault(step, []).append(f"{name} at {line}")
    # Step 20: the progress bar's loss and the non-finite check; the end of the epoch: its sums and what follows.
    assert set(by_step) == {20, steps_per_epoch}, by_step
    assert sorted(by_step[20]) == [
        "__getitem__ at cifar_accel/loop.py:check",
        "item at cifar_accel/engine.py:train_epoch",
    ]


@pytest.fixture
def compile_counted(monkeypatch):
    """Compilation with the cheap aot_eager backend, counting the graphs dynamo makes."""
    monkeypatch.setattr(accel, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


def test_a_compiled_speed_run_compiles_its_graphs_once(colour_dataset, tmp_path, monkeypatch, compile_counted):
    """Static shapes (dropped last batch, evaluation batches of one size, contiguous TTA views): after the
    first epoch, only the whitening bias's freeze and the first evaluation compile a graph, once each."""
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(tmp_path / "cache"))
    graphs_after_epoch = []
    keep_record = engine.keep_record
    monkeypatch.setattr(
        engine, "keep_record", lambda *args: (graphs_after_epoch.append(compile_counted()), keep_record(*args))
    )
    config = speed_run_config(
        colour_dataset, tmp_path / "run", "--compile", "--epochs", "3", "--batch_size", "48", "--max_eval_samples",
        "64", "--eval_batch_size", "32", "--whiten_bias_epochs", "1", "--model_args", '{"widths": [16, 32, 32]}',
    )  # fmt: skip
    engine.train(config)
    trained, after_evaluation = graphs_after_epoch, compile_counted()
    # 256 // 48 = 5 steps of 48 per epoch: one shape; from epoch 2 the whitening bias needs no gradient.
    assert trained[0] >= 1 and trained == [trained[0], trained[0] + 1, trained[0] + 1], trained
    # The final evaluation (TTA, then the per-image loader) adds the model's evaluation graph once.
    assert after_evaluation == trained[-1] + 1, (trained, after_evaluation)


def test_eval_strategy_no_evaluates_once_at_the_end_and_keeps_the_last_model(colour_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(tmp_path / "cache"))
    config = speed_run_config(colour_dataset, tmp_path, "--epochs", "2.5", "--batch_size", "32")
    evaluations = []
    evaluate = engine.evaluate

    def counted(*args, **kwargs):
        evaluations.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", counted)  # the epochs' evaluations
    monkeypatch.setattr(final, "evaluate", counted)  # the final ones
    results = engine.train(config)
    assert len(evaluations) == 2  # the timed TTA evaluation, then the per-image one that results.json reports
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # 8 steps per epoch, 2.5 epochs: 20 steps, the third epoch cut after 4 of them.
    assert [record["train_examples"] for record in records] == [256, 256, 128]
    assert ["eval_top1" in record for record in records] == [False, False, True]
    assert results["selected_by"] == "last" and results["best_epoch"] == 3
    assert results["best_metrics"]["eval_top1"] == results["final_metrics"]["top1"]
    # The recipe trains in bf16 (this CPU's bf16 instructions, or their emulation) and still learns.
    assert json.loads((tmp_path / "train_config.json").read_text())["mixed_precision"] == "bf16"
    assert results["final_metrics"]["top1"] >= 0.9, results["final_metrics"]
    assert "no epoch was selected" in (tmp_path / "best" / "README.md").read_text()
    assert not (tmp_path / "checkpoints").exists()


def test_eval_epochs_evaluates_every_nth_epoch_and_the_last_and_selects_among_them(colour_dataset, tmp_path):
    config = parse_train_args(
        ["--model", "bn_cnn", "--dataset", str(colour_dataset), "--output_dir", str(tmp_path), "--epochs", "3",
         "--eval_epochs", "2", "--batch_size", "64", "--learning_rate", "0.05", "--num_workers", "0"]
    )  # fmt: skip
    results = engine.train(config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["eval_top1" in record for record in records] == [False, True, True]
    assert results["selected_by"] == "test" and results["best_epoch"] in (2, 3)


def test_drop_last_that_leaves_no_batch_is_refused_before_anything_is_written(colour_dataset, tmp_path):
    config = parse_train_args(
        ["--model", "bn_cnn", "--dataset", str(colour_dataset), "--output_dir", str(tmp_path / "run"),
         "--batch_size", "512", "--drop_last", "--num_workers", "0"]
    )  # fmt: skip
    with pytest.raises(UserError, match="--drop_last leaves no full batch: 256 training examples, batch 512 x 1"):
        engine.train(config)
    assert not (tmp_path / "run").exists()


def test_a_fractional_last_epoch_applies_its_partial_gradient_accumulation(colour_dataset, tmp_path):
    """4 batches per epoch, updates of 3 batches, 1.5 epochs: the 2 batches of the cut epoch still make an update."""
    from safetensors.torch import load_file

    config = parse_train_args(
        ["--model", "bn_cnn", "--dataset", str(colour_dataset), "--output_dir", str(tmp_path), "--epochs", "1.5",
         "--batch_size", "64", "--gradient_accumulation_steps", "3", "--eval_strategy", "no",
         "--checkpointing_steps", "4", "--learning_rate", "0.05", "--num_workers", "0"]
    )  # fmt: skip
    engine.train(config)
    after_epoch_1 = load_file(tmp_path / "checkpoints" / "step_4" / "model.safetensors")
    final = load_file(tmp_path / "best" / "model.safetensors")
    weights = [name for name in final if name.endswith("weight") and "norm" not in name]
    assert weights and not any(torch.equal(after_epoch_1[name], final[name]) for name in weights)
