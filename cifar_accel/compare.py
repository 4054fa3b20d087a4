"""``cifar-accel compare``: finished runs side by side, as one table and one plot of their curves."""

from dataclasses import dataclass
from pathlib import Path

from cifar_accel.errors import UserError
from cifar_accel.reporting import selected_metric
from cifar_accel.run_records import read_finished_run

HEADER = ("run", "model", "recipe", "chosen on", "epochs", "best top-1", "top-5", "seconds", "images/s")


@dataclass
class RunSummary:
    name: str
    model: str
    recipe: str
    epochs: int
    selected_by: str
    best_top1: float
    best_top5: float
    seconds: float  # from data loaded to the last evaluation
    images_per_second: float  # training images over the training phases of all epochs
    records: list[dict]  # metrics.jsonl


def load_run_summary(run_dir: str | Path) -> RunSummary:
    """What the table shows of one run folder; a one-line error if it is not a finished run."""
    run_dir = Path(run_dir)
    run = read_finished_run(run_dir)
    settings, results, records = run.settings, run.results, run.records
    try:
        best = results["best_metrics"]
        if "timing" in results:
            seconds, images_per_second = results["timing"]["speed_run_seconds"], results["timing"]["images_per_second"]
        else:  # a run from before results.json had a "timing" block
            train_seconds = sum(record["train_examples"] / record["images_per_second"] for record in records)
            seconds = results["train_seconds"]
            images_per_second = sum(record["train_examples"] for record in records) / train_seconds
        return RunSummary(
            name=str(run_dir),
            model=settings.get("model_name_or_path") or settings["model"],
            recipe=settings.get("recipe") or "-",
            epochs=settings["epochs"],
            selected_by=results["selected_by"],
            best_top1=selected_metric(best, "top1"),
            best_top5=selected_metric(best, "top5"),
            seconds=seconds,
            images_per_second=images_per_second,
            records=records,
        )
    except (KeyError, TypeError, ZeroDivisionError) as error:  # a field missing, or an older run's of another kind
        raise UserError(f"cannot read the run in {run_dir} ({error.__class__.__name__}: {error})") from None


def format_comparison(runs: list[RunSummary], markdown: bool = False) -> str:
    """An aligned text table, or a Markdown one to paste into a document."""
    rows = [HEADER] + [
        (
            run.name,
            run.model,
            run.recipe,
            run.selected_by,
            str(run.epochs),
            f"{run.best_top1:.2%}",
            f"{run.best_top5:.2%}",
            f"{run.seconds:,.0f}",
            f"{run.images_per_second:,.0f}",
        )  # fmt: skip
        for run in runs
    ]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join([lines[0], "|" + "---|" * len(HEADER), *lines[1:]])
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    text_columns = 4  # run, model, recipe, split: left-aligned; the numbers right-aligned
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column < text_columns else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()  # fmt: skip
        for row in rows
    )
