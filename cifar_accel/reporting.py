"""What a run tells its user: the per-epoch log line, the run folder's files, and the trackers."""

import csv
import io
import json
import os
from pathlib import Path

from cifar_accel.checkpoint import checkpoint_folders
from cifar_accel.errors import UserError
from cifar_accel.files import FolderLock, remove_tree, write_json, write_text
from cifar_accel.hub import default_dataset_id
from cifar_accel.model_card import build_model_card
from cifar_accel.plots import plot_confusion_matrix, plot_training_curves
from cifar_accel.run_files import (
    BEST_MODEL_FOLDER,
    CONFUSION_PLOT,
    CURVES_PLOT,
    METRICS_FILE,
    PLOTS_FOLDER,
    REPLACED_RUN,
    RESULTS_FILE,
    RUN_CONFIG_FILE,
    RUN_FILES,
    SUMMARY_FILE,
    TRACKER_FOLDER,
)  # fmt: skip


def format_epoch_line(record: dict, epochs: float) -> str:
    """One line per epoch, in the style of the seed projects' logs; an epoch not evaluated has no eval part."""
    evaluation = (
        f" | {record['eval_split']} loss {record['eval_loss']:.4f} top1 {record['eval_top1']:6.2%}"
        f" top5 {record['eval_top5']:6.2%}"
        if "eval_top1" in record
        else ""
    )
    if "ema_eval_top1" in record:
        evaluation += f" (EMA top1 {record['ema_eval_top1']:6.2%})"
    return (
        f"epoch {record['epoch']:>3}/{epochs} | train loss {record['train_loss']:.4f} acc {record['train_acc']:6.2%}"
        f"{evaluation} | lr {record['lr']:.4g} | {record['seconds']:.1f}s ({record['images_per_second']:.0f} img/s)"
    )


TRACKERS = ("tensorboard", "wandb", "mlflow")


def tracker_names(report_to: str) -> list[str]:
    """The Accelerate trackers for ``--report_to``: one of TRACKERS, ``all`` (those installed) or ``none``."""
    if report_to == "none":
        return []
    from accelerate.tracking import get_available_trackers

    installed = [name for name in TRACKERS if name in {str(tracker) for tracker in get_available_trackers()}]
    if report_to == "all":
        if not installed:
            raise UserError(f"--report_to all found none of {', '.join(TRACKERS)} installed; pip install tensorboard")
        return installed
    if report_to not in installed:
        raise UserError(f"--report_to {report_to} needs the {report_to} package: pip install {report_to}")
    return [report_to]


def tracker_folder(output_dir: str | Path) -> Path:
    """Where trackers that write files keep them: tensorboard writes to ``logs/cifar_accel``."""
    return Path(output_dir) / TRACKER_FOLDER


def tracker_config(resolved: dict) -> dict:
    """``train_config.json`` flattened to the scalars every tracker accepts (lists, dicts and None as JSON)."""
    return {
        name: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for name, value in resolved.items()
    }


def numeric_values(record: dict) -> dict:
    """An epoch record without its text fields, for ``accelerator.log``."""
    return {name: value for name, value in record.items() if isinstance(value, (int, float)) and name != "epoch"}


def refuse_existing_run(output_dir: str | Path) -> None:
    """A run's files are never replaced by accident."""
    found = [name for name in RUN_FILES if (Path(output_dir) / name).exists()]
    if found:
        # A run stopped before its first checkpoint was complete has nothing to continue from.
        resumable = bool(checkpoint_folders(output_dir))
        raise UserError(
            f"--output_dir {output_dir} already holds a run ({', '.join(found)}); pass --overwrite_output_dir "
            + ("to replace it, --resume_from_checkpoint latest to continue it, " if resumable else
               "to replace it (it has no complete checkpoint to continue from) ")
            + "or another --output_dir"
        )  # fmt: skip


class RunFolder:
    """The files of ``--output_dir``; only the main process creates one, and holds the folder's lock.

    A new run that replaces another (``--overwrite_output_dir``) first moves the old run's files
    aside to ``.replaced_run``; they are removed only once the new run has finished an epoch
    (``drop_replaced_run``), and put back if it fails before that (``discard_run``).
    A resumed run keeps the files. Every file is replaced atomically.
    """

    def __init__(self, output_dir: str | Path, resuming: bool = False, overwrite: bool = False):
        self.path = Path(output_dir)
        self.lock = FolderLock(self.path)
        self.lock.acquire()
        try:
            if not resuming:
                if not overwrite:
                    refuse_existing_run(self.path)  # again, now under the lock: a run may have finished meanwhile
                self._move_aside_previous_run()
        except BaseException:
            self.lock.release()
            raise

    def _move_aside_previous_run(self) -> None:
        replaced = self.path / REPLACED_RUN
        if replaced.exists():
            # Left by a run stopped before its first epoch ended: what lies here is that run's start,
            # and the run it replaced is still aside; keep that one.
            for name in RUN_FILES:
                remove_tree(self.path / name)
            return
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if present:
            replaced.mkdir()
            for name in present:
                os.replace(self.path / name, replaced / name)

    def drop_replaced_run(self) -> None:
        remove_tree(self.path / REPLACED_RUN)

    def discard_run(self) -> None:
        """For a run that failed before it had anything to keep: its own files go, and the run it
        replaced, if any, comes back, so the folder is as it was before the run started."""
        for name in RUN_FILES:
            remove_tree(self.path / name)
        replaced = self.path / REPLACED_RUN
        if not replaced.is_dir():
            return
        for moved in replaced.iterdir():
            os.replace(moved, self.path / moved.name)
        replaced.rmdir()

    def close(self) -> None:
        self.lock.release()

    def save_config(self, resolved: dict) -> None:
        write_json(self.path / RUN_CONFIG_FILE, resolved)

    def save_metrics(self, records: list[dict]) -> None:
        """All epochs so far, as JSON lines and as a spreadsheet-friendly CSV. Rewriting the whole (small)
        files keeps them whole after a crash or a resume."""
        write_text(self.path / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in records))
        table = io.StringIO()
        if records:  # every field of every record: a resumed run may continue one written by an older version
            fields = list(dict.fromkeys(name for record in records for name in record))
            writer = csv.DictWriter(table, fieldnames=fields, restval="", lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
        write_text(self.path / SUMMARY_FILE, table.getvalue())

    def save_results(self, results: dict) -> None:
        write_json(self.path / RESULTS_FILE, results)

    def save_reports(self, records: list[dict], results: dict, repo_id: str | None = None) -> None:
        """The figures, then the best model's card (it shows them); ``repo_id`` goes in its usage snippet."""
        plot_training_curves(records, self.path / PLOTS_FOLDER / CURVES_PLOT)
        final = results["final_metrics"]
        plot_confusion_matrix(
            final["confusion_matrix"], list(final["per_class_top1"]), final["split"],
            self.path / PLOTS_FOLDER / CONFUSION_PLOT,
        )  # fmt: skip
        card = build_model_card(self.path, repo_id, default_dataset_id(self.path), plots_folder="../plots")
        write_text(self.best_model_dir / "README.md", str(card))

    @property
    def best_model_dir(self) -> Path:
        return self.path / BEST_MODEL_FOLDER
