"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``OUTPUT_DIR/checkpoints/step_N`` (N: batches trained so far) holding
what ``Accelerator.save_state`` writes (model, optimizer, scheduler, grad scaler, every process's
RNG states) beside the run's own progress: the position inside the epoch, the epoch's running sums,
the metrics so far and the best model's weights, and the run's settings: a resume continues the
same run, whatever flags it is given. It is written under a temporary name, finished with a
manifest (every file's size and SHA-256) and renamed, so a run killed while saving leaves the
earlier checkpoints as they were, and a checkpoint that lost or changed a file afterwards is
refused instead of resuming inexactly.

Nothing here unpickles arbitrary objects: weights are safetensors, progress is JSON, and
Accelerate reads its own files with ``torch.load(weights_only=True)``.
"""

import hashlib
import json
import os
import pickle
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cifar_accel.config import SCHEDULER_ALIASES
from cifar_accel.errors import UserError
from cifar_accel.files import as_os_error, write_json
from cifar_accel.run_files import CHECKPOINTS_FOLDER
from cifar_accel.saved_model import on_cpu

PROGRESS_FILE = "progress.json"
TENSORS_FILE = "progress.safetensors"
MANIFEST_FILE = "manifest.json"
PREFIX = "step_"
# Settings a resumed run may change, because they do not change what is trained or measured.
RESUME_MAY_CHANGE = (
    "dataset",  # the same data moved or copied: its content is checked against the checkpoint's digest
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "num_workers", "report_to",
    "checkpointing_steps", "checkpoints_total_limit", "push_to_hub", "hub_model_id", "hub_private_repo",
)  # fmt: skip


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
    """The run's finished checkpoints (those with a manifest), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_FOLDER
    folders = [
        folder
        for folder in root.glob(f"{PREFIX}*")
        if (number := folder.name.removeprefix(PREFIX)).isascii()
        and number.isdigit()
        and (folder / MANIFEST_FILE).is_file()
    ]
    return sorted(folders, key=lambda folder: int(folder.name.removeprefix(PREFIX)))


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """Written last: the name, size and SHA-256 of every file the checkpoint holds."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST_FILE)
    entries = {str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _sha256(path)} for path in files}
    write_json(folder / MANIFEST_FILE, {"files": entries})


def manifest_problem(folder: Path) -> str | None:
    """What makes a checkpoint unusable (a file missing, added, truncated or altered), or None."""
    try:
        expected = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (written incompletely, or by an older cifar_accel)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST_FILE} is unreadable ({error})"
    well_formed = isinstance(expected, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        for entry in expected.values()
    )
    if not well_formed:
        return f"its {MANIFEST_FILE} does not list files with their size and sha256"
    present = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} - {MANIFEST_FILE}
    for name in sorted(set(expected) - present):
        return f"{name} is missing"
    for name in sorted(present - set(expected)):
        return f"{name} was added after it was saved"
    for name, entry in sorted(expected.items()):
        path = folder / name
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            return f"{name} was changed after it was saved (its size or SHA-256 differs from {MANIFEST_FILE})"
    return None


def find_checkpoint(value: str, output_dir: str | Path, verify: bool = True) -> tuple[Path, list[str]]:
    """``--resume_from_checkpoint``: ``latest`` (the newest complete one in ``output_dir``) or a folder.

    With ``verify``, each candidate is checked against its manifest: ``latest`` falls back to an
    older complete checkpoint (the notes say which were skipped and why), a named folder is refused.
    """
    if value == "latest":
        folders = checkpoint_folders(output_dir)
        if not folders:
            raise UserError(
                f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINTS_FOLDER}; "
                "pass a checkpoint folder, or train with --checkpointing_steps N|epoch to make some"
            )
        notes = []
        for folder in reversed(folders if verify else folders[-1:]):
            problem = manifest_problem(folder) if verify else None
            if problem is None:
                return folder, notes
            notes.append(f"checkpoint {folder} is skipped: {problem}")
        raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint left; {notes[0]}")
    path = Path(value)
    if not (path / PROGRESS_FILE).is_file():
        problem = "does not exist" if not path.exists() else f"is not a checkpoint (no {PROGRESS_FILE})"
        raise UserError(
            f"--resume_from_checkpoint {value!r} {problem}; pass 'latest' or a folder such as "
            f"{Path(output_dir) / CHECKPOINTS_FOLDER / (PREFIX + '100')}"
        )
    problem = manifest_problem(path) if verify else None
    if problem:
        raise UserError(f"cannot resume from {path}: {problem}")
    return path, []


def _saved_run(path: Path) -> dict:
    try:
        return json.loads((path / PROGRESS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot resume from {path}: {PROGRESS_FILE} is unreadable ({error})") from None


def _current_name(setting: str, value: object) -> object:
    """A checkpoint written before ``--scheduler onecycle`` was renamed ``linear`` holds the old name."""
    return SCHEDULER_ALIASES.get(value, value) if setting == "scheduler" else value


def resume_settings(requested: dict, default_output_dir: str) -> dict:
    """The settings of the run a checkpoint belongs to, for ``--resume_from_checkpoint``.

    ``requested`` holds the settings asked for (recipe and flags). Those that would change the
    result must equal the saved ones: each difference is listed in one refusal.
    """
    output_dir = requested.get("output_dir")
    checkpoint, _ = find_checkpoint(requested["resume_from_checkpoint"], output_dir or default_output_dir, verify=False)
    saved = _saved_run(checkpoint).get("settings")
    if saved is None:
        raise UserError(f"cannot resume from {checkpoint}: it records no settings (written by an older cifar_accel)")
    differences = [
        f"--{name} {json.dumps(saved[name])} (asked: {json.dumps(value)})"
        for name, value in requested.items()
        if name not in RESUME_MAY_CHANGE
        and name in saved
        and _current_name(name, saved[name]) != _current_name(name, value)
    ]
    if differences:
        raise UserError(
            f"checkpoint {checkpoint} continues a run trained with {'; '.join(differences)}; a resume restores "
            "every setting, so drop these flags, or start a new run in another --output_dir"
        )
    if not output_dir and checkpoint.resolve().parent.name != CHECKPOINTS_FOLDER:
        raise UserError(
            f"checkpoint {checkpoint} is not in a run's {CHECKPOINTS_FOLDER}/ folder; name the folder the run "
            "continues in with --output_dir"
        )
    changes = {name: value for name, value in requested.items() if name in RESUME_MAY_CHANGE}
    return {
        **saved,
        **changes,
        "output_dir": output_dir or str(checkpoint.parent.parent),
        "overwrite_output_dir": False,
    }


def check_architecture(path: Path, architecture: dict) -> None:
    """Refuse a checkpoint of another network before anything is loaded or written."""
    saved = _saved_run(path)["architecture"]
    for key, value in architecture.items():
        if saved.get(key) != value:
            raise UserError(
                f"checkpoint {path} was trained with {key} {saved.get(key)!r}, not {value!r}; "
                f"resume with --model {saved['model']} --model_args '{json.dumps(saved['model_args'])}', "
                "or start a new run"
            )


def check_data(path: Path, digest: str, dataset: str) -> None:
    """The data a run continues on must be the data it was trained on, wherever it now lies."""
    saved = _saved_run(path).get("data_digest")
    if saved is not None and saved != digest:
        raise UserError(
            f"--dataset {dataset} does not hold the examples checkpoint {path} was trained on (their SHA-256 "
            "differs); resume with the same data"
        )


def check_process_count(path: Path, num_processes: int) -> None:
    """A checkpoint's batches and RNG states belong to its number of processes."""
    saved = _saved_run(path).get("num_processes", num_processes)
    if saved != num_processes:
        raise UserError(
            f"checkpoint {path} was trained by {saved} process(es), not {num_processes}; "
            f"resume with: {resume_command(path, saved)}"
        )


def saved_base_model(path: Path) -> dict | None:
    """What a fine-tune's checkpoint records of the model it started from (``finetune.resumed_base_model``);
    None for a run from scratch, and for a checkpoint written before it was recorded."""
    return _saved_run(path).get("base_model")


def _replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is swapped out, then removed."""
    if target.exists() and not target.is_dir():  # not a checkpoint: a file in the way
        target.unlink()
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
    run: dict,
    total_limit: int | None = None,
) -> Path:
    """Save the full training state; every process must call this at the same step.

    ``run`` (architecture, settings, number of processes) is what a resume restores and checks.
    If saving fails (a full disk), the incomplete folder is removed and the earlier checkpoints stay.
    """
    root = Path(output_dir) / CHECKPOINTS_FOLDER
    final = root / f"{PREFIX}{progress.global_step}"
    temporary = root / f".incomplete-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))  # each process adds its own RNG states
        accelerator.wait_for_everyone()  # ...before the manifest lists them
        if accelerator.is_main_process:
            save_file(on_cpu(tensors), temporary / TENSORS_FILE)
            write_json(temporary / PROGRESS_FILE, {**run, "progress": asdict(progress)})
            write_manifest(temporary)
            _replace_directory(temporary, final)
            if total_limit:
                for old in checkpoint_folders(output_dir)[:-total_limit]:
                    shutil.rmtree(old)
    except BaseException as error:  # a full disk, or interrupted: no half-written checkpoint stays behind
        # Translated before the removal frees the space that ran out.
        problem = as_os_error(error, temporary) if isinstance(error, Exception) else error
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        if problem is error:
            raise
        raise problem from error
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
    return _progress(path), tensors


def _progress(path: Path) -> TrainingProgress:
    """The saved position, each field of its kind: the manifest guards against accidents, not a hand edit."""
    saved = _saved_run(path).get("progress")
    kinds = {"epoch": int, "step_in_epoch": int, "global_step": int, "epoch_learning_rate": (int, float),
             "records": list, "best": dict}  # fmt: skip
    well_formed = (
        isinstance(saved, dict)
        and set(saved) == set(kinds)
        and all(isinstance(saved[name], kind) and not isinstance(saved[name], bool) for name, kind in kinds.items())
        and saved["epoch"] >= 1
        and min(saved["step_in_epoch"], saved["global_step"]) >= 0
        and all(isinstance(record, dict) for record in saved["records"])
    )
    if not well_formed:
        raise UserError(f"cannot resume from {path}: its {PROGRESS_FILE} does not hold a run's position")
    return TrainingProgress(**saved)


def with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def without_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = f"{prefix}."
    return {name.removeprefix(start): tensor for name, tensor in tensors.items() if name.startswith(start)}


def resume_command(checkpoint: Path, num_processes: int, argv: list[str] | None = None) -> str:
    """The command line that continues this run: the checkpoint restores every setting, so only the
    launch is repeated (``accelerate launch`` with the number of processes the run had)."""
    argv = list(sys.argv if argv is None else argv)
    return shlex.join([*_program(argv[0], num_processes), "--resume_from_checkpoint", str(checkpoint)])


def rerun_command(num_processes: int, argv: list[str] | None = None) -> str:
    """The command line that was run, launched as it was, less ``--overwrite_output_dir``: what continues a command
    of several runs (``--seeds``), which skips the runs it finished and resumes the one it stopped."""
    argv = list(sys.argv if argv is None else argv)
    flags = argv[2:] if Path(argv[0]).name == "cifar-accel" else argv[1:]  # (after `cifar-accel train`)
    flags = [flag for flag in flags if flag != "--overwrite_output_dir"]
    return shlex.join([*_program(argv[0], num_processes), *flags])


def _program(script: str, num_processes: int) -> list[str]:
    """How the script was launched: ``cifar-accel train``, ``accelerate launch`` with its processes, or python."""
    if Path(script).name == "cifar-accel":
        return ["cifar-accel", "train"]
    if num_processes > 1 or "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by `accelerate launch`
        return ["accelerate", "launch", *_launch_flags(num_processes), script]
    return ["python", script]


def _launch_flags(num_processes: int) -> list[str]:
    """``accelerate launch`` flags for this many processes; across machines, this machine's share."""
    if num_processes == 1:
        return []
    flags = ["--multi_gpu", "--num_processes", str(num_processes)]
    machines = num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    if machines > 1:
        flags += [
            "--num_machines", str(machines), "--machine_rank", os.environ.get("GROUP_RANK", "0"),
            "--main_process_ip", os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "--main_process_port", os.environ.get("MASTER_PORT", "29500"),
        ]  # fmt: skip
    return flags
