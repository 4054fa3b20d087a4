"""The files of a sweep: the ``--space`` it reads, checked before any trial, and what it writes in its folder at
the end (``trials.csv``, ``best_recipe.yaml``, ``plots/``), each written whole.

The space maps a ``TrainConfig`` flag to what it may take::

    learning_rate: {type: float, low: 0.01, high: 1.0, log: true}
    batch_size: {type: categorical, choices: [128, 256, 512]}
    epochs: {type: int, low: 4, high: 12, step: 4}

Each refusal is one line naming the file and the parameter, and comes before the study is opened: a bad space
writes nothing.
"""

import csv
import dataclasses
import io
import json
import math
import typing
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from cifar_accel.checkpoint import RESUME_MAY_CHANGE
from cifar_accel.config import TrainConfig
from cifar_accel.errors import UserError, first_line
from cifar_accel.files import write_atomically, write_text
from cifar_accel.recipes import read_yaml
from cifar_accel.run_files import RUN_CONFIG_FILE

# Flags a space may not vary: those that steer a run (where it writes, whether it resumes or pushes) and do not
# change its result (RESUME_MAY_CHANGE), a recipe (its settings are flags), and the seeds (with --seeds' test
# --target_accuracy): a search over seeds would select luck, not a setting.
NOT_SEARCHABLE = frozenset({*RESUME_MAY_CHANGE, "recipe", "seed", "seeds", "target_accuracy"})
# What best_recipe.yaml leaves out: where and how the trial ran, not what it trained (--target_accuracy needs --seeds).
NOT_IN_RECIPE = (
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "seeds", "target_accuracy", "push_to_hub",
)  # fmt: skip
SETTINGS_ATTR = "cifar_accel:settings"  # the study's user attribute holding the settings its trials share
BEST_RECIPE, TRIALS_TABLE, PLOTS_FOLDER = "best_recipe.yaml", "trials.csv", "plots"
# Each type's keys: (required, optional with its default).
SPEC_KEYS = {
    "float": ({"low", "high"}, {"log": False}),
    "int": ({"low", "high"}, {"step": 1, "log": False}),
    "categorical": ({"choices"}, {}),
}


def load_space(path: str, base: TrainConfig) -> dict[str, dict]:
    """The space in ``path``, each parameter's spec complete (defaults filled in), checked against ``base``: every
    bound and choice must be a value the flag takes with the sweep's other settings."""
    source = f"--space {path}"
    content = read_yaml(path, source)
    if not isinstance(content, dict) or not content:
        raise UserError(f"{source} must be a mapping of flags to their ranges, such as 'learning_rate: {{type: "
                        "float, low: 0.01, high: 1, log: true}'")  # fmt: skip
    fields = typing.get_type_hints(TrainConfig)
    space = {}
    for name, spec in content.items():
        where = f"{source}: {name}"
        if not isinstance(name, str) or name.lstrip("-") not in fields:
            raise UserError(f"{where} is not a training flag (see cifar-accel train --help)")
        name = name.lstrip("-")  # "--learning_rate" as on the command line
        if name in NOT_SEARCHABLE:
            raise UserError(f"{where} steers the run rather than its result; set it with a flag, not in the space")
        space[name] = _checked_spec(where, spec)
        for value in _bounds(space[name]):  # the flag's own checks, with the sweep's other settings
            try:
                dataclasses.replace(base, **{name: value}).validate()
            except UserError as error:
                raise UserError(f"{where}: {value!r} is refused: {error}") from None
    return space


def _checked_spec(where: str, spec: Any) -> dict:
    """The spec with its defaults; refused, in one line, if it is not one of the three types' forms."""
    if not isinstance(spec, dict) or spec.get("type") not in SPEC_KEYS:
        raise UserError(f"{where} must be a mapping with type float, int or categorical, got {spec!r}")
    required, optional = SPEC_KEYS[spec["type"]]
    missing, unknown = required - set(spec), set(spec) - required - set(optional) - {"type"}
    if missing or unknown:
        problem = f"lacks {', '.join(sorted(missing))}" if missing else f"has unknown keys {', '.join(sorted(unknown))}"
        raise UserError(f"{where} ({spec['type']}) {problem}; it takes {', '.join(sorted(required | set(optional)))}")
    spec = {**optional, **spec}
    if spec["type"] == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list, got {choices!r}")
        if any(not isinstance(choice, (str, int, float, bool, type(None))) for choice in choices):
            raise UserError(f"{where}: each choice must be a number, text, true/false or null")
        if len({repr(choice) for choice in choices}) != len(choices):
            raise UserError(f"{where}: a choice is given twice")
        return spec
    number = int if spec["type"] == "int" else (int, float)
    for key in ("low", "high"):
        value = spec[key]
        if spec["type"] == "float" and isinstance(value, str):  # YAML reads 1e-5 (no dot) as text, as recipes take it
            value = spec[key] = _float_or_text(value)
        if not isinstance(value, number) or isinstance(value, bool) or not math.isfinite(value):
            kind = "a whole number" if spec["type"] == "int" else "a finite number"
            raise UserError(f"{where}: {key} must be {kind}, got {value!r}")
    if spec["low"] > spec["high"]:
        raise UserError(f"{where}: low {spec['low']!r} is above high {spec['high']!r}")
    if not isinstance(spec["log"], bool):
        raise UserError(f"{where}: log must be true or false, got {spec['log']!r}")
    if spec["log"] and spec["low"] <= 0:
        raise UserError(f"{where}: a log scale needs low above 0, got {spec['low']!r}")
    if spec["type"] == "int":
        step = spec["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise UserError(f"{where}: step must be a whole number of at least 1, got {step!r}")
        if spec["log"] and step != 1:
            raise UserError(f"{where}: a log scale draws every whole number; drop step (or log)")
    return spec


def _float_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _bounds(spec: dict) -> list:
    """The values the flag's checks are run on: a range's ends (the checks are ranges too), or every choice."""
    return spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]


def suggest(trial: Any, space: dict[str, dict]) -> dict[str, Any]:
    """A trial's settings, drawn by Optuna's sampler (a re-queued trial gets its fixed values back)."""
    params = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec["step"], log=spec["log"])
        else:
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])
    return params


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_note(trial: FrozenTrial) -> str:
    """Why a trial has no value, or which trial it continues."""
    if trial.user_attrs.get("surplus"):
        return "not run: the trials were all in play"
    if "error" in trial.user_attrs and trial.state == TrialState.FAIL:
        return f"refused: {trial.user_attrs['error']}"
    if trial.state == TrialState.PRUNED:
        return f"pruned after epoch {trial.last_step}"
    if trial.state == TrialState.FAIL:
        return "stopped or lost, queued again"
    original = trial.system_attrs.get("failed_trial")
    return "" if original is None else f"continues trial {original}"


def report_sweep(study: optuna.Study, sweep_dir: Path, space: dict) -> None:
    """The table of all trials on the terminal and in trials.csv, best_recipe.yaml and Optuna's plots."""
    trials = study.get_trials(deepcopy=False)
    print(format_trials(trials))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text(sweep_dir / TRIALS_TABLE, trials_csv(trials))
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    if not complete:
        print("sweep: no trial completed: no best_recipe.yaml and no plots")
        return
    write_best_recipe(study, study.best_trial, sweep_dir / BEST_RECIPE)
    draw_plots(study, complete, sweep_dir / PLOTS_FOLDER, space)


def format_trials(trials: list[FrozenTrial]) -> str:
    """One line per trial: number, state, value, seconds, settings, folder and a note."""
    rows = [("trial", "state", "value", "seconds", "params", "folder", "note")]
    for trial in trials:
        value = "-" if trial.value is None else f"{trial.value:.2%}"
        params = " ".join(f"{name}={_shown(value)}" for name, value in trial.params.items())
        folder = Path(trial.user_attrs.get("run_dir", "-")).name
        seconds = _shown(trial.user_attrs.get("seconds", "-"))
        rows.append((str(trial.number), trial.state.name, value, seconds, params, folder, trial_note(trial)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


def trials_csv(trials: list[FrozenTrial]) -> str:
    """trials.csv: a row per trial, a column per parameter."""
    names = list(dict.fromkeys(name for trial in trials for name in trial.params))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["trial", "state", "value", "seconds", "run_dir", "note", *names])
    for trial in trials:
        attrs = trial.user_attrs
        writer.writerow([trial.number, trial.state.name, "" if trial.value is None else trial.value,
                         attrs.get("seconds", ""), attrs.get("run_dir", ""), trial_note(trial),
                         *(trial.params.get(name, "") for name in names)])  # fmt: skip
    return table.getvalue()


def write_best_recipe(study: optuna.Study, best: FrozenTrial, path: Path) -> None:
    """The best trial's settings as its train_config.json recorded them, less where and how it ran: ``cifar-accel
    train --config best_recipe.yaml --output_dir DIR`` trains that trial again."""
    run_dir = Path(best.user_attrs.get("run_dir", ""))
    try:
        recorded = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError):  # --seeds keeps one run per seed_N/ folder: the study's settings, then
        recorded = {**study.user_attrs[SETTINGS_ATTR], **best.params}
    fields = typing.get_type_hints(TrainConfig)
    settings = {name: value for name, value in recorded.items() if name in fields and name not in NOT_IN_RECIPE}
    split = recorded.get("selection_split", "selection")
    header = (
        f"# The best trial of cifar-accel sweep study {study.study_name!r}: trial {best.number} ({run_dir}),\n"
        f"# {split} top1 {best.value:.4%}. Replay it: cifar-accel train --config {path.name} --output_dir DIR\n"
    )
    description = f"best trial {best.number} of sweep study {study.study_name}"
    write_text(path, header + yaml.safe_dump({"description": description, **settings}, sort_keys=False))
    print(f"sweep: best trial {best.number}: {split} top1 {best.value:.2%}; its settings: {path}")


def draw_plots(study: optuna.Study, complete: list[FrozenTrial], folder: Path, space: dict) -> None:
    """Optuna's optimization history and, given two complete trials that differ, its parameter importances."""
    import matplotlib

    matplotlib.use("Agg")  # Optuna draws with pyplot: no display needed
    from matplotlib import pyplot
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    plots = {"optimization_history.png": plot_optimization_history}
    if len(complete) >= 2 and any(len({repr(trial.params.get(name)) for trial in complete}) > 1 for name in space):
        plots["param_importances.png"] = plot_param_importances
    else:
        print("sweep: note: no param_importances.png: it needs two complete trials with different settings")
    folder.mkdir(parents=True, exist_ok=True)
    for name, plot in plots.items():
        # Optuna sets its own style, process-wide: the run plots' comes back after. Its warnings (few trials for
        # importances) become a note.
        with matplotlib.rc_context(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                figure = plot(study).figure
            except (ValueError, RuntimeError) as error:
                print(f"sweep: note: no {name}: {first_line(error)}")
                continue
        for warning in caught:
            print(f"sweep: note: {name}: {first_line(warning.message)}")
        try:
            write_atomically(folder / name, lambda temporary, figure=figure: figure.savefig(
                temporary, format="png", dpi=120, bbox_inches="tight"))  # fmt: skip
        finally:
            pyplot.close(figure)
    print(f"sweep: plots in {folder}")
