"""``cifar-accel compare``: finished runs side by side, as one table and one plot of their curves.

A RUN_DIR is a run folder, a ``train --seeds`` folder (its ``seeds.json`` lists the seed runs) or a folder of run
folders (a sweep's output); ``compare_groups`` turns runs that differ only in their seed into groups.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cifar_accel.errors import UserError
from cifar_accel.run_files import RUN_RECORDS, SEEDS_SUMMARY_FILE
from cifar_accel.run_records import read_finished_run, read_run_json, selected_metric

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
    settings: dict  # train_config.json: what groups runs that differ only in their seed
    final_top1: float | None  # results.json's final_metrics (None: a run from before it had them)
    source: str  # the RUN_DIR it was found under: it names a single group


def load_run_summary(run_dir: str | Path, source: str | None = None) -> RunSummary:
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
            settings=settings,
            final_top1=results.get("final_metrics", {}).get("top1"),
            source=str(run_dir) if source is None else source,
        )
    except (KeyError, TypeError, ZeroDivisionError, AttributeError) as error:  # a field missing, or of another kind
        raise UserError(f"cannot read the run in {run_dir} ({error.__class__.__name__}: {error})") from None


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds the records of a run (read_finished_run says whether they are whole)."""
    return all((path / name).is_file() for name in RUN_RECORDS)


def _natural_key(path: Path) -> list:
    """seed_2 before seed_10: digits compare as numbers (re.split puts them at the odd places)."""
    return [int(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+)", path.name))]


def seed_run_dirs(folder: Path) -> list[Path]:
    """The run folders that a ``train --seeds`` folder's seeds.json lists, in its order."""
    path = folder / SEEDS_SUMMARY_FILE
    runs = read_run_json(path).get("runs")
    if (
        not isinstance(runs, list)
        or not runs
        or not all(isinstance(entry, dict) and isinstance(entry.get("run_dir"), str) for entry in runs)
    ):
        raise UserError(f"{path}: runs must be a non-empty list of objects with a run_dir, as train --seeds writes")
    return [folder / entry["run_dir"] for entry in runs]


def expand_run_dir(run_dir: str | Path) -> list[Path]:
    """The run folders a RUN_DIR stands for: itself if it holds a run's records; the seed runs of its seeds.json;
    else its immediate subfolders that hold a run (a sweep's output). A folder that is none of these is returned
    as it is, so that reading it gives the one-line error a folder that is not a run always gave."""
    folder = Path(run_dir)
    if is_run_folder(folder) or not folder.is_dir():
        return [folder]
    if (folder / SEEDS_SUMMARY_FILE).is_file():
        return seed_run_dirs(folder)
    subfolders = sorted((path for path in folder.iterdir() if path.is_dir() and is_run_folder(path)), key=_natural_key)
    return subfolders or [folder]


def load_runs(run_dirs: Sequence[str | Path]) -> list[RunSummary]:
    """Every run that the RUN_DIRs stand for, in the order given; a run reached twice is counted once, since a
    second copy would shrink its group's standard error for nothing."""
    runs, seen = [], set()
    for run_dir in run_dirs:
        for path in expand_run_dir(run_dir):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                runs.append(load_run_summary(path, source=str(run_dir)))
    return runs


def format_table(rows: list[tuple[str, ...]], text_columns: int, markdown: bool = False) -> str:
    """An aligned text table (the first ``text_columns`` left-aligned, the numbers right-aligned), or a Markdown one
    to paste into a document. ``rows[0]`` is the header."""
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column < text_columns else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()  # fmt: skip
        for row in rows
    )


def format_comparison(runs: list[RunSummary], markdown: bool = False) -> str:
    """One row per run: run, model, recipe and the split that chose the best epoch left-aligned, the numbers
    right-aligned."""
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
    return format_table(rows, text_columns=4, markdown=markdown)
