"""A run's state as training advances it, and the part of it a checkpoint keeps.

``save_run_checkpoint`` packs the resumable state for ``checkpoint.save_checkpoint`` and
``restore_run_checkpoint`` unpacks it, side by side so that the two cannot drift apart; the resume
checks refuse a checkpoint that would not continue the same run. ``stop_if_requested`` is how a
signal ends a run: with a checkpoint and the command that resumes it.
"""

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from cifar_accel.augment import BatchMixing
from cifar_accel.checkpoint import (
    TrainingProgress,
    check_architecture,
    check_data,
    check_process_count,
    find_checkpoint,
    load_checkpoint,
    resume_command,
    save_checkpoint,
    with_prefix,
    without_prefix,
)
from cifar_accel.config import TrainConfig
from cifar_accel.data import DataBundle, content_digest
from cifar_accel.errors import StoppedBySignal
from cifar_accel.loop import NonFiniteLossWatch, RunLengthForecast
from cifar_accel.reporting import RunFolder
from cifar_accel.stopping import AbandonPoints, SafePoint, StopRequest
from cifar_accel.tricks import Lookahead, ModelEma


@dataclass
class Run:
    """One training run as ``train`` advances it; ``folder`` is set on the main process only."""

    config: TrainConfig
    accelerator: Accelerator
    data: DataBundle
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]  # one; with --optimizer muon, SGD then Muon
    schedulers: list[Any]  # one per optimizer
    criterion: nn.Module
    train_loader: Any
    eval_loader: Any
    lookahead: Lookahead | None
    architecture: dict
    resume_from: Path | None
    folder: RunFolder | None
    start_time: float
    data_ready_time: float
    total_steps: int  # training batches of this process over the run; a fractional --epochs cuts the last epoch
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    examples_before_resume: float = 0.0  # trained in this epoch by the run that saved the checkpoint: not timed
    checkpoint_saved: bool = False
    data_digest: str | None = None  # of the examples, saved with checkpoints; computed at the first one
    base_model: dict | None = None  # with --init_from: where the starting weights came from
    ema: ModelEma | None = None  # with --model_ema
    mixing: BatchMixing | None = None  # with --mixup or --cutmix
    forecast: RunLengthForecast | None = None  # set by build_run, once the run is restored
    abandon_points: AbandonPoints | None = None  # where steps are slow: a stop ends the step in flight
    safe_point: SafePoint | None = None  # ...and what that step changed is put back from here
    # Called with each evaluated epoch's record once it is kept (a sweep's pruner); what it raises ends the run.
    on_evaluation: Callable[[dict], None] | None = None
    resume_hint: str | None = None  # how to continue after a stop, when not this run's own resume command (--seeds)

    @property
    def weight_averages(self) -> list:
        """The averages that step after every update, in that order: lookahead pulls, then the EMA follows."""
        return [average for average in (self.lookahead, self.ema) if average is not None]

    def __post_init__(self):
        self.epoch_totals = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)  # loss, correct, n
        self.watch = NonFiniteLossWatch(self.accelerator.device)


def save_run_checkpoint(run: Run) -> Path:
    """The run's full state, as ``restore_run_checkpoint`` reads it back."""
    run.watch.check(run.accelerator, len(run.train_loader))  # a checkpoint never holds a diverged model
    tensors = {
        "epoch_totals": run.accelerator.reduce(run.epoch_totals, reduction="sum"),
        **with_prefix("best", run.best_state),
    }
    if run.lookahead is not None:
        tensors.update(with_prefix("lookahead", run.lookahead.state_dict()))
    if run.ema is not None:
        tensors.update(with_prefix("ema", run.ema.state_dict()))
    run.data_digest = run.data_digest or content_digest(run.data)
    saved_run = {
        "architecture": run.architecture,
        "settings": run.config.to_dict(),
        "num_processes": run.accelerator.num_processes,
        "data_digest": run.data_digest,
        # With --init_from, the data is normalised as the base model was: a resume needs neither its folder
        # nor its files (finetune.resumed_base_model).
        "base_model": run.base_model and {**run.base_model, "mean": run.data.mean, "std": run.data.std},
    }
    checkpoint = save_checkpoint(
        run.accelerator, run.config.output_dir, run.progress, tensors, saved_run, run.config.checkpoints_total_limit
    )
    run.checkpoint_saved = True
    return checkpoint


def restore_run_checkpoint(run: Run) -> None:
    """What ``save_run_checkpoint`` saved, back into a freshly built run."""
    run.progress, saved = load_checkpoint(run.accelerator, run.resume_from)
    if run.accelerator.is_main_process:  # the saved sums are over all processes: count them once
        run.epoch_totals += saved["epoch_totals"]
    run.examples_before_resume = float(saved["epoch_totals"][2])
    run.best_state = without_prefix("best", saved)
    if run.lookahead is not None:
        run.lookahead.load_state_dict(without_prefix("lookahead", saved))
    if run.ema is not None:
        run.ema.load_state_dict(without_prefix("ema", saved))


def checkpoint_to_resume(config: TrainConfig, architecture: dict) -> tuple[Path, list[str]]:
    """The checkpoint ``--resume_from_checkpoint`` names, and notes on the newer ones it skipped (unfinished or
    damaged); one of another architecture is refused before anything is built."""
    resume_from, skipped = find_checkpoint(config.resume_from_checkpoint, config.output_dir)
    check_architecture(resume_from, architecture)
    return resume_from, skipped


def check_resumed_launch(
    resume_from: Path, skipped: list[str], accelerator: Accelerator, launcher_precision: str | None
) -> None:
    """A checkpoint continues with as many processes as saved it, and in its own mixed precision."""
    check_process_count(resume_from, accelerator.num_processes)
    for note in skipped:
        accelerator.print(f"note: {note}")
    if launcher_precision and launcher_precision != accelerator.mixed_precision:
        accelerator.print(f"note: the run continues in mixed precision {accelerator.mixed_precision}, as it "
                          f"was trained, not the launcher's {launcher_precision}")  # fmt: skip


def check_resumed_data(resume_from: Path, architecture: dict, data: DataBundle, dataset: str) -> str:
    """Once the data is loaded: the checkpoint's number of classes and examples must be this data's.
    Returns the data's digest, which the run's later checkpoints keep."""
    check_architecture(resume_from, architecture)  # again, now that the number of classes is known
    data_digest = content_digest(data)
    check_data(resume_from, data_digest, dataset)
    return data_digest


def stop_if_requested(run: Run, stop: StopRequest, where: str, checkpoint: Path | None = None) -> None:
    """After a signal: save a checkpoint (unless one was just saved), say how to resume, and stop."""
    signal_number = stop.requested(run.accelerator)
    if not signal_number:
        return
    checkpoint = checkpoint or save_run_checkpoint(run)
    run.accelerator.print(
        f"{signal.Signals(signal_number).name}: stopped {where}; checkpoint saved to {checkpoint}\n"
        f"resume with: {run.resume_hint or resume_command(checkpoint, run.accelerator.num_processes)}"
    )
    run.accelerator.end_training()
    raise StoppedBySignal(signal_number)
