"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/step_N`` (N: batches trained so far) holding
what ``Accelerator.save_state`` writes (model, optimizer, scheduler, grad scaler, every process's
RNG states) beside the run's own progress: the position inside the epoch, the epoch's running sums,
the metrics so far and the best model's weights. It is written under a temporary name and renamed
once complete, so a run killed while saving leaves the earlier checkpoints as they were.

Nothing here unpickles arbitrary objects: weights are safetensors, progress is JSON, and
Accelerate reads its own files with ``torch.load(weights_only=True)``.
"""

import json
import os
import pickle
import shlex
import shutil
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cifar_accel.errors import UserError
from cifar_accel.saved_model import on_cpu, write_json

CHECKPOINTS_DIRECTORY = "checkpoints"
PROGRESS_FILE = "progress.json"
TENSORS_FILE = "progress.safetensors"
PREFIX = "step_"


@dataclass
class TrainingProgress:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 1  # the epoch being trained, from 1
    step_in_epoch: int = 0  # batches of that epoch already trained (by each process)
    global_step: int = 0  # batches trained since the start of the run
    epoch_learning_rate: float = 0.0  # the learning rate when the epoch began, for its metrics line
    records: list[dict] = field(default_factory=list)  # metrics.jsonl so far, one record per epoch
    best: dict = field(default_factory=lambda: {"eval_top1": -1.0})  # the best epoch's record


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIRECTORY
    folders = [
        folder
        for folder in root.glob(f"{PREFIX}*")
        if folder.name.removeprefix(PREFIX).isdigit() and (folder / PROGRESS_FILE).is_file()
    ]
    return sorted(folders, key=lambda folder: int(folder.name.removeprefix(PREFIX)))


def find_checkpoint(value: str, output_dir: str | Path) -> Path:
    """``--resume_from_checkpoint``: ``latest`` (the newest in ``output_dir``) or a checkpoint folder."""
    if value == "latest":
        folders = checkpoint_folders(output_dir)
        if not folders:
            raise UserError(
                f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINTS_DIRECTORY}; "
                "pass a checkpoint folder, or train with --checkpointing_steps N|epoch to make some"
            )
        return folders[-1]
    path = Path(value)
    if not (path / PROGRESS_FILE).is_file():
        problem = "does not exist" if not path.exists() else f"is not a checkpoint (no {PROGRESS_FILE})"
        raise UserError(
            f"--resume_from_checkpoint {value!r} {problem}; pass 'latest' or a folder such as "
            f"{Path(output_dir) / CHECKPOINTS_DIRECTORY / (PREFIX + '100')}"
        )
    return path


def check_architecture(path: Path, architecture: dict) -> None:
    """Refuse a checkpoint of another network before anything is loaded or written."""
    saved = json.loads((path / PROGRESS_FILE).read_text())["architecture"]
    for key, value in architecture.items():
        if saved.get(key) != value:
            raise UserError(
                f"checkpoint {path} was trained with {key} {saved.get(key)!r}, not {value!r}; "
                f"resume with --model {saved['model']} --model_args '{json.dumps(saved['model_args'])}', "
                "or start a new run"
            )


def _replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is swapped out, then removed."""
    if target.exists():
        retired = target.with_name(f".retired-{target.name}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(source, target)
        shutil.rmtree(retired)
    else:
        os.replace(source, target)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    progress: TrainingProgress,
    tensors: dict[str, torch.Tensor],
    architecture: dict,
    total_limit: int | None = None,
) -> Path:
    """Save the full training state; every process must call this at the same step."""
    root = Path(output_dir) / CHECKPOINTS_DIRECTORY
    final = root / f"{PREFIX}{progress.global_step}"
    temporary = root / f".incomplete-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))  # each process adds its own RNG states
    if accelerator.is_main_process:
        save_file(on_cpu(tensors), temporary / TENSORS_FILE)
        write_json(temporary / PROGRESS_FILE, {"architecture": architecture, "progress": asdict(progress)})
        _replace_directory(temporary, final)
        if total_limit:
            for old in checkpoint_folders(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[TrainingProgress, dict[str, torch.Tensor]]:
    """Restore what ``save_checkpoint`` saved into the prepared objects; returns the run's progress."""
    try:
        accelerator.load_state(str(path))
        tensors = {name: tensor.to(accelerator.device) for name, tensor in load_file(str(path / TENSORS_FILE)).items()}
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError, pickle.UnpicklingError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot resume from {path}: {first_line}") from None
    saved = json.loads((path / PROGRESS_FILE).read_text())
    return TrainingProgress(**saved["progress"]), tensors


def with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def without_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = f"{prefix}."
    return {name.removeprefix(start): tensor for name, tensor in tensors.items() if name.startswith(start)}


def resume_command(checkpoint: Path, num_processes: int, argv: list[str] | None = None) -> str:
    """The command line that continues this run from ``checkpoint``."""
    argv = list(sys.argv if argv is None else argv)
    dropped = ("--resume_from_checkpoint=", "--overwrite_output_dir", "--no-overwrite_output_dir")
    arguments, skip_value = [], False
    for argument in argv[1:]:
        if skip_value:
            skip_value = False
        elif argument == "--resume_from_checkpoint":
            skip_value = True
        elif not argument.startswith(dropped):
            arguments.append(argument)
    if Path(argv[0]).name == "cifar-accel":
        program = ["cifar-accel"]
    elif "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by `accelerate launch` for the processes it starts
        processes = ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else []
        program = ["accelerate", "launch", *processes, argv[0]]
    else:
        program = ["python", argv[0]]
    return shlex.join([*program, *arguments, "--resume_from_checkpoint", str(checkpoint)])


class StopRequest:
    """SIGINT and SIGTERM ask the run to stop after the current step, save and exit 128 + signal.

    Later signals are only noted, so that a second Ctrl-C cannot break the checkpoint being
    written; SIGKILL still stops at once, and then the previous checkpoint is the one to resume.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_number = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {number: signal.signal(number, self._note) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, number: int, frame) -> None:
        self.signal_number = self.signal_number or number

    def requested(self, accelerator: Accelerator) -> int:
        """The signal that asked any process to stop (0 if none): the same answer on every process."""
        if accelerator.num_processes == 1:
            return self.signal_number
        numbers = accelerator.gather(torch.tensor([self.signal_number], device=accelerator.device))
        return int(numbers.max())
