"""What a run records and says as it starts: ``train_config.json``, the trackers, its first lines.

``train_config.json`` holds every setting as used, what was derived from the data and the launch
(``resolved_settings``), and the software and device that trained the run (``environment``).
"""

import importlib.metadata
import platform
from pathlib import Path

import accelerate
import datasets
import torch
from accelerate import Accelerator

from cifar_accel import __version__
from cifar_accel.config import TrainConfig
from cifar_accel.data import SUBSET_SEED, DataBundle, classes_without_examples
from cifar_accel.reporting import tracker_config
from cifar_accel.run_state import Run
from cifar_accel.zoo import zoo_source


def start_records(run: Run) -> None:
    """``train_config.json``, the metrics so far, the trackers and the run's first line."""
    config, accelerator, data = run.config, run.accelerator, run.data
    resolved = resolved_settings(config, accelerator, data, run.base_model)
    if run.folder:
        run.folder.save_config(resolved)
        run.folder.save_metrics(run.progress.records)  # a resumed run drops epochs logged after its checkpoint
    run_name = Path(config.output_dir).resolve().name
    tracker_options = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}
    if run.resume_from:  # TensorBoard drops what the interrupted run logged after its checkpoint, as metrics.jsonl
        tracker_options["tensorboard"] = {"purge_step": run.progress.epoch}
    accelerator.init_trackers("cifar_accel", tracker_config(resolved), tracker_options)
    accelerator.print(
        f"{config.model_name_or_path or config.model}: {sum(p.numel() for p in run.model.parameters()):,} parameters | "
        f"{len(data.train)} train / {len(data.evaluation)} {data.selection_split} examples, "
        f"{data.num_classes} classes | {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"global batch {resolved['global_batch_size']}, mixed precision {accelerator.mixed_precision}"
    )
    for note in missing_class_notes(data):
        accelerator.print(note)
    if run.resume_from:
        accelerator.print(
            f"resuming from {run.resume_from}: epoch {run.progress.epoch}, step {run.progress.step_in_epoch}"
        )


def resolved_settings(config: TrainConfig, accelerator: Accelerator, data: DataBundle, base_model: dict | None) -> dict:
    """``train_config.json``: every flag as used, plus what was derived from the data and the launch."""
    return {
        **config.to_dict(),
        "base_model": base_model,
        "hub_model": source.record() if (source := zoo_source(config)) else None,
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "global_batch_size": config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
        "num_train_examples": len(data.train),
        "num_eval_examples": len(data.evaluation),
        # --max_train_samples/--max_eval_samples: examples drawn at random with this seed (data.random_subset)
        "subset_seed": SUBSET_SEED if config.max_train_samples or config.max_eval_samples else None,
        "selection_split": data.selection_split,
        # The datasets library's hash of the training examples as used: another revision of the data differs.
        "dataset_fingerprint": data.train._fingerprint,
        "dataset_revision": data.dataset_revision,
        "dataset_pretty_name": data.dataset_pretty_name,
        "image_column": data.image_column,
        "label_column": data.label_column,
        "class_names": data.class_names,
        "mean": data.mean,
        "std": data.std,
        "environment": environment(source.library if source else None),
    }


def environment(hub_library: str | None = None) -> dict:
    """The versions and the device a run was trained with (and the version of a Hub model's library)."""
    return {
        **({hub_library: importlib.metadata.version(hub_library)} if hub_library else {}),
        "cifar_accel": __version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }


def missing_class_notes(data: DataBundle) -> list[str]:
    """Up front, a class no example teaches or tests: a subset, a hold-out or the dataset itself may lack one."""
    notes = []
    for split, role, consequence in (
        (data.train, "training", "the model cannot learn to predict them"),
        (data.evaluation, data.selection_split, "their per-class accuracy is n/a"),
    ):
        if missing := classes_without_examples(split, data.label_column, data.class_names):
            notes.append(f"note: the {role} examples hold no image of class {', '.join(map(repr, missing))}; "
                         f"{consequence}")  # fmt: skip
    return notes
