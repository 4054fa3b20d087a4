"""What a run tells its user: the per-epoch log line and the run folder's metric files."""

import json
import shutil
from pathlib import Path

from cifar_accel.errors import UserError
from cifar_accel.hub import default_dataset_id
from cifar_accel.model_card import build_model_card
from cifar_accel.plots import plot_training_curves
from cifar_accel.saved_model import write_json, write_text


def format_epoch_line(record: dict, epochs: int) -> str:
    """One line per epoch, in the style of the seed projects' logs."""
    return (
        f"epoch {record['epoch']:>3}/{epochs} | train loss {record['train_loss']:.4f} acc {record['train_acc']:6.2%}"
        f" | {record['eval_split']} loss {record['eval_loss']:.4f} top1 {record['eval_top1']:6.2%}"
        f" top5 {record['eval_top5']:6.2%} | lr {record['lr']:.4g} | {record['seconds']:.1f}s"
        f" ({record['images_per_second']:.0f} img/s)"
    )


RUN_FILES = ("train_config.json", "metrics.jsonl", "results.json", "plots", "best", "checkpoints")


def refuse_existing_run(output_dir: str | Path) -> None:
    """A run's files are never replaced by accident."""
    found = [name for name in RUN_FILES if (Path(output_dir) / name).exists()]
    if found:
        raise UserError(
            f"--output_dir {output_dir} already holds a run ({', '.join(found)}); pass --overwrite_output_dir "
            "to replace it, --resume_from_checkpoint latest to continue it, or another --output_dir"
        )


class RunFolder:
    """The files of ``--output_dir``; only the main process should create one.

    A new run first removes the files of a run it replaces (``--overwrite_output_dir``);
    a resumed run keeps them. Every file is replaced atomically.
    """

    def __init__(self, output_dir: str | Path, resuming: bool = False):
        self.path = Path(output_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resuming:
            for name in RUN_FILES:
                previous = self.path / name
                if previous.is_dir():
                    shutil.rmtree(previous)
                elif previous.exists():
                    previous.unlink()

    def save_config(self, resolved: dict) -> None:
        write_json(self.path / "train_config.json", resolved)

    def save_metrics(self, records: list[dict]) -> None:
        """All epochs so far: rewriting the whole (small) file keeps it whole after a crash or a resume."""
        write_text(self.path / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in records))

    def save_results(self, results: dict) -> None:
        write_json(self.path / "results.json", results)

    def save_reports(self, records: list[dict], repo_id: str | None = None) -> None:
        """The figures, then the best model's card (it shows them); ``repo_id`` goes in its usage snippet."""
        plot_training_curves(records, self.path / "plots" / "curves.png")
        card = build_model_card(self.path, repo_id, default_dataset_id(self.path), plots_folder="../plots")
        write_text(self.best_model_dir / "README.md", str(card))

    @property
    def best_model_dir(self) -> Path:
        return self.path / "best"
