"""``cifar-accel compare`` over groups of seeds: runs that differ only in their seed are one group, shown as the mean
± standard error of its accuracies, and two groups' difference is tested against its noise (Welch's t).

One run says little: two seeds of one recipe differ by 0.2-0.3 points on CIFAR-10, so a difference between two
settings means something only next to that spread. The statistics are ``run_statistics``'s.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cifar_accel.checkpoint import RESUME_MAY_CHANGE
from cifar_accel.compare import RunSummary, format_comparison, format_table
from cifar_accel.errors import UserError
from cifar_accel.plots import plot_group_accuracies, plot_run_comparison
from cifar_accel.run_files import RUN_RECORD_ONLY
from cifar_accel.run_statistics import SIGNIFICANCE, describe, format_mean, welch

# train_config.json keys that do not make two runs different experiments, so they are left out of a group's key:
# the seed, what a group is made of (with --seeds and its --target_accuracy, which each seed run records as null);
# what the run derived or recorded rather than was asked for (RUN_RECORD_ONLY, which --config does not replay
# either); and what a resume may change because it does not change what is trained or measured
# (RESUME_MAY_CHANGE: where the run was written, resuming, overwriting, pushing, loader workers, trackers,
# checkpoints), but the dataset, which a resume may only move: runs given other data are other experiments.
NOT_GROUPED = frozenset(
    {"seed", "seeds", "target_accuracy", *RUN_RECORD_ONLY, *(name for name in RESUME_MAY_CHANGE if name != "dataset")}
)
METRICS = {"best_top1": "best top-1", "final_top1": "final top-1"}
GROUP_HEADER = ("group", "model", "recipe", "n", "best top-1", "final top-1", "seconds")
_UNSET = object()  # a setting that an older run's train_config.json does not have


@dataclass
class RunGroup:
    name: str  # the settings in which it differs from the other groups, e.g. "learning_rate=0.2 epochs=4"
    settings: dict  # what its runs share: train_config.json less NOT_GROUPED
    runs: list[RunSummary]

    def values(self, metric: str) -> list[float]:
        """The runs' ``best_top1`` or ``final_top1``, leaving out the runs that lack it."""
        return [value for run in self.runs if (value := getattr(run, metric)) is not None]


def group_key(settings: dict) -> dict:
    """What makes two runs the same experiment: their settings less ``NOT_GROUPED``."""
    return {name: value for name, value in settings.items() if name not in NOT_GROUPED}


def _show(value: object, short: bool = False) -> str:
    """A setting's value in a group's name; ``short``: floats to 4 significant digits (0.04847, not 0.048466412...)."""
    if short and isinstance(value, float):
        return f"{value:.4g}"
    return "(unset)" if value is _UNSET else value if isinstance(value, str) else json.dumps(value)


def group_runs(runs: list[RunSummary]) -> list[RunGroup]:
    """Runs with equal ``group_key``s, in the order their first run was given; each group named by the settings that
    differ between the groups (by the common RUN_DIR, folder, or recipe when there is one group)."""
    keyed: list[tuple[dict, list[RunSummary]]] = []  # equal as Python values: --epochs 3 and a recipe's 3.0 agree
    for run in runs:
        key = group_key(run.settings)
        members = next((members for settings, members in keyed if settings == key), None)
        if members is None:
            keyed.append((key, [run]))
        else:
            members.append(run)
    names = list(dict.fromkeys(name for settings, _ in keyed for name in settings))
    first = keyed[0][0]
    differing = [name for name in names if any(s.get(name, _UNSET) != first.get(name, _UNSET) for s, _ in keyed)]

    def label(settings: dict, short: bool) -> str:
        return " ".join(f"{name}={_show(settings.get(name, _UNSET), short)}" for name in differing)

    short = [label(settings, short=True) for settings, _ in keyed]
    if len(set(short)) < len(short):  # groups that differ beyond the 4th digit keep every digit
        short = [label(settings, short=False) for settings, _ in keyed]
    return [RunGroup(name or _single_group_name(members), settings, members)
            for name, (settings, members) in zip(short, keyed, strict=True)]  # fmt: skip


def _single_group_name(runs: list[RunSummary]) -> str:
    """The RUN_DIR they all came from, else their common folder, else their recipe or model."""
    sources = {run.source for run in runs}
    if len(sources) == 1:
        return sources.pop()
    try:
        common = os.path.commonpath([run.name for run in runs])
    except ValueError:  # absolute and relative paths mixed
        common = ""
    if common not in ("", os.sep, os.curdir):
        return common
    return runs[0].recipe if runs[0].recipe != "-" else runs[0].model


def has_groups(groups: list[RunGroup]) -> bool:
    """Whether any group holds several runs: only then the grouped table replaces the one row per run."""
    return any(len(group.runs) >= 2 for group in groups)


def tested_metric(groups: list[RunGroup]) -> str:
    """The final top-1 (the kept model on the evaluation split, chosen by a validation split where there is one),
    unless a run lacks it (a run from before results.json had final_metrics): then the best epoch's top-1."""
    return "final_top1" if all(run.final_top1 is not None for group in groups for run in group.runs) else "best_top1"


def group_statistics(group: RunGroup) -> dict:
    """``describe`` of each accuracy (None where no run has it) and the mean seconds."""
    statistics = {metric: describe(values) if (values := group.values(metric)) else None for metric in METRICS}
    return {**statistics, "seconds": describe([run.seconds for run in group.runs])["mean"]}


def welch_tests(groups: list[RunGroup], metric: str) -> list[dict]:
    """Welch's test of each group against the first: with two groups, the one difference; with more, one test per
    group rather than per pair, since pairs grow as the square of the groups and so do the chance findings among
    them. The first group is the first RUN_DIR's, the baseline."""
    first = groups[0]
    tests = []
    for second in groups[1:]:
        a, b = first.values(metric), second.values(metric)
        test = {"first": first.name, "second": second.name, "metric": metric,
                "difference": describe(b)["mean"] - describe(a)["mean"]}  # fmt: skip
        result = welch(a, b)
        if result is not None:
            test.update(result)
        else:
            small = [group.name for group, values in ((first, a), (second, b)) if len(values) < 2]
            test["no_test"] = (
                f"{' and '.join(small)} {'has' if len(small) == 1 else 'have'} fewer than 2 runs"
                if small
                else "every run of both groups has the same accuracy"
            )
        tests.append(test)
    return tests


def format_test(test: dict) -> str:
    """``B vs A: final top-1 +0.35 points (Welch t=2.10, p=0.043): exceeds its noise``."""
    head = f"{test['second']} vs {test['first']}: {METRICS[test['metric']]} {100 * test['difference']:+.2f} points"
    if "no_test" in test:
        return f"{head}; no test possible: {test['no_test']}"
    verdict = "exceeds its noise" if test["exceeds_noise"] else f"within its noise (p >= {SIGNIFICANCE:g})"
    return f"{head} (Welch t={test['t']:.2f}, p={test['p_value']:.2g}): {verdict}"


def format_groups(groups: list[RunGroup], markdown: bool = False) -> str:
    """One row per group: mean ± standard error of its best and final top-1 (with the runs each counts), and its
    mean seconds."""
    rows = [GROUP_HEADER]
    for group in groups:
        statistics = group_statistics(group)
        accuracies = [format_mean(statistics[metric]) if statistics[metric] else "-" for metric in METRICS]
        run = group.runs[0]
        rows.append((group.name, run.model, run.recipe, str(len(group.runs)), *accuracies,
                     f"{statistics['seconds']:,.0f}"))  # fmt: skip
    return format_table(rows, text_columns=3, markdown=markdown)


def format_report(runs: list[RunSummary], groups: list[RunGroup], markdown: bool = False, per_run: bool = False) -> str:
    """The per-run table when every group has one run (or with ``per_run``), else the grouped one; then, with groups
    of several runs, the test of each group against the first."""
    grouped = has_groups(groups)
    table = format_groups(groups, markdown) if grouped and not per_run else format_comparison(runs, markdown)
    if not grouped or len(groups) < 2:
        return table
    lines = [format_test(test) for test in welch_tests(groups, tested_metric(groups))]
    return "\n".join([table, "", *(f"- {line}" if markdown else line for line in lines)])


def comparison_json(groups: list[RunGroup], plots: dict[str, str] | None = None) -> dict:
    """The groups, their statistics and the tests as one object, for scripts (``--json``); accuracies are
    fractions, as in results.json."""
    metric = tested_metric(groups)
    return {
        "groups": [
            {
                "name": group.name,
                "settings": group.settings,
                "model": group.runs[0].model,
                "recipe": group.runs[0].recipe,
                "n": len(group.runs),
                **group_statistics(group),
                "runs": [_run_json(run) for run in group.runs],
            }
            for group in groups
        ],
        "tested_metric": metric,
        "significance": SIGNIFICANCE,
        "tests": welch_tests(groups, metric) if len(groups) >= 2 else [],
        "plots": plots or {},
    }


def _run_json(run: RunSummary) -> dict:
    return {"run_dir": run.name, "seed": run.settings.get("seed"), "best_top1": run.best_top1,
            "final_top1": run.final_top1, "seconds": run.seconds}  # fmt: skip


def group_plot_path(plot: str | Path) -> Path:
    """``curves.png`` -> ``curves_groups.png``, beside it."""
    plot = Path(plot)
    return plot.with_name(f"{plot.stem}_groups{plot.suffix}")


def group_accuracies(groups: list[RunGroup]) -> dict[str, dict[str, list[float]]]:
    """What the strip plot draws: per accuracy that every run has, each group's values in percent."""
    return {
        label: {group.name: [100 * value for value in group.values(metric)] for group in groups}
        for metric, label in METRICS.items()
        if all(len(group.values(metric)) == len(group.runs) for group in groups)
    }


def draw_comparison(runs: list[RunSummary], groups: list[RunGroup], plot: str | Path) -> dict[str, str]:
    """``--plot``: the runs' curves, and where runs form groups the strip plot of their accuracies beside it, so
    that each difference is seen against the spread of the seeds; returns what was drawn where."""
    drawn = {"curves": str(plot)}
    try:
        plot_run_comparison({run.name: run.records for run in runs}, plot)
        if has_groups(groups):
            drawn["groups"] = str(group_plot_path(plot))
            plot_group_accuracies(group_accuracies(groups), drawn["groups"])
    except OSError as error:
        raise UserError(f"cannot write --plot {plot} ({error.strerror or error})") from None
    return drawn
