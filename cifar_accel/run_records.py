"""Reading a finished run folder's records: ``train_config.json``, ``results.json`` and ``metrics.jsonl``.

``cifar-accel compare``, the model card and ``cifar-accel push`` all read a run here, so a missing, truncated
or hand-edited record is refused by each of them in the same one line, before any number is formatted.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_accel.errors import UserError
from cifar_accel.run_files import RUN_RECORDS
from cifar_accel.values import is_finite_number, is_whole_number


def _is_fraction(value: Any) -> bool:
    return is_finite_number(value) and 0 <= value <= 1


def _is_non_negative(value: Any) -> bool:
    return is_finite_number(value) and value >= 0


def _is_count(value: Any) -> bool:
    return is_whole_number(value) and value >= 0


FRACTION = (_is_fraction, "a fraction from 0 to 1")
NON_NEGATIVE = (_is_non_negative, "a finite number of at least 0")
COUNT = (_is_count, "a whole number of at least 0")
TEXT = (lambda value: isinstance(value, str), "a string")
# What the readers show of results.json, and what each must be. A field that an older cifar_accel did not write
# is checked only when present: compare reads those runs too (push refuses them, naming the reason).
RESULT_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "selected_by": TEXT,
    "best_epoch": COUNT,
    "tta_level": COUNT,
    "final_metrics.split": TEXT,
    "final_metrics.n": COUNT,
    "final_metrics.loss": NON_NEGATIVE,
    **{f"final_metrics.{name}": FRACTION for name in ("top1", "top3", "top5")},
    "tta_metrics.top1": FRACTION,
    **{f"best_metrics.{prefix}{name}": FRACTION for prefix in ("eval_", "ema_eval_") for name in ("top1", "top5")},
    **{f"timing.{name}": NON_NEGATIVE for name in ("total_seconds", "speed_run_seconds", "images_per_second")},
}

# What the readers show of train_config.json, likewise.
SETTING_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": TEXT,
    "recipe": (lambda value: value is None or isinstance(value, str), "null or a string"),
    "dataset": TEXT,
    "epochs": (lambda value: is_finite_number(value) and value > 0, "a number greater than 0"),
    "num_processes": (lambda value: _is_count(value) and value >= 1, "a whole number of at least 1"),
    "max_eval_samples": (lambda value: value is None or _is_count(value), "null or a whole number"),
    "subset_seed": (lambda value: value is None or _is_count(value), "null or a whole number"),
    "environment.device": TEXT,
}
EPOCH_FIELDS = {"epoch": COUNT, "eval_top1": FRACTION, "ema_eval_top1": FRACTION, "train_loss": NON_NEGATIVE}


@dataclass
class FinishedRun:
    settings: dict  # train_config.json
    results: dict  # results.json
    records: list[dict]  # metrics.jsonl: one evaluated or trained epoch a line


def read_run_json(path: Path) -> dict:
    """One JSON-object record of a run folder, or a one-line refusal naming the folder and the file."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent} is not a finished run folder (missing {path.name})") from None
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bytes that are not UTF-8
        raise UserError(f"cannot read the run in {path.parent}: {path.name} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"cannot read the run in {path.parent}: {path.name} is not a JSON object")
    return value


def read_finished_run(run_dir: str | Path) -> FinishedRun:
    """The three records of a run folder, each checked as far as its readers use it."""
    run_dir = Path(run_dir)
    paths = [run_dir / name for name in RUN_RECORDS]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run folder (missing {', '.join(missing)})")
    settings, results = read_run_json(paths[0]), read_run_json(paths[1])
    try:
        records = [json.loads(line) for line in paths[2].read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the run in {run_dir}: metrics.jsonl is not valid JSON lines ({error})") from None
    if not all(isinstance(record, dict) for record in records):
        raise UserError(f"cannot read the run in {run_dir}: a line of metrics.jsonl is not a JSON object")
    if not records:  # a finished run logged at least one epoch
        raise UserError(f"cannot read the run in {run_dir}: metrics.jsonl holds no epoch")
    check_fields(settings, paths[0], SETTING_FIELDS)
    check_results(results, paths[1])
    for line, record in enumerate(records, start=1):
        check_fields(record, paths[2], EPOCH_FIELDS, where=f"line {line}: ")
    return FinishedRun(settings, results, records)


def check_fields(record: dict, path: Path, fields: dict, where: str = "") -> None:
    """Each (dotted) field of ``fields`` present in ``record`` is of its kind."""
    for field, (is_valid, expected) in fields.items():
        *sections, name = field.split(".")
        container = record
        for section in sections:
            container = container.get(section, {})
            if not isinstance(container, dict):
                raise UserError(f"{path}: {where}{section} must be a JSON object, got {container!r:.60}")
        if name in container and not is_valid(container[name]):
            raise UserError(f"{path}: {where}{field} must be {expected}, got {container[name]!r:.60}")


def check_results(results: dict, path: Path) -> None:
    """Each field of ``RESULT_FIELDS`` present in ``results`` is of its kind, and so is each class's accuracy."""
    check_fields(results, path, RESULT_FIELDS)
    per_class = results.get("final_metrics", {}).get("per_class_top1", {})
    if not isinstance(per_class, dict):
        raise UserError(f"{path}: final_metrics.per_class_top1 must be a JSON object, got {per_class!r:.60}")
    for name, value in per_class.items():
        if value is not None and not _is_fraction(value):  # None: a class with no examples in the split
            raise UserError(
                f"{path}: final_metrics.per_class_top1.{name} must be null or {FRACTION[1]}, got {value!r:.60}"
            )


def require_fields(results: dict, path: Path, fields: tuple[str, ...]) -> None:
    """Refuse a results.json without one of ``fields`` (dotted), which a reader cannot do without."""
    for field in fields:
        container = results
        for name in field.split("."):
            if not isinstance(container, dict) or name not in container:
                raise UserError(f"{path} has no {field}; it was not written by a finished cifar_accel run")
            container = container[name]


def selected_metric(record: dict, name: str) -> float:
    """An evaluated epoch's metric for the weights it would keep: with ``--model_ema``, the better of the
    raw weights (``eval_*``) and their moving average (``ema_eval_*``), as ``selected_weights`` says."""
    prefix = "ema_eval_" if record.get("selected_weights") == "ema" else "eval_"
    return record[prefix + name]
