"""What a run tells its user: the per-epoch log line and the run folder's metric files."""

import json
from pathlib import Path

from cifar_accel.checkpoint import write_json


def format_epoch_line(record: dict, epochs: int) -> str:
    """One line per epoch, in the style of the seed projects' logs."""
    return (
        f"epoch {record['epoch']:>3}/{epochs} | train loss {record['train_loss']:.4f} acc {record['train_acc']:6.2%}"
        f" | {record['eval_split']} loss {record['eval_loss']:.4f} top1 {record['eval_top1']:6.2%}"
        f" top5 {record['eval_top5']:6.2%} | lr {record['lr']:.4g} | {record['seconds']:.1f}s"
        f" ({record['images_per_second']:.0f} img/s)"
    )


class RunFolder:
    """The files of ``--output_dir``; only the main process should create one."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.write_text("")

    def save_config(self, resolved: dict) -> None:
        write_json(self.path / "train_config.json", resolved)

    def append_metrics(self, record: dict) -> None:
        with self.metrics_path.open("a") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")

    def save_results(self, results: dict) -> None:
        write_json(self.path / "results.json", results)

    @property
    def best_model_dir(self) -> Path:
        return self.path / "best"
