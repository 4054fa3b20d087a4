"""``train --seeds 0-9``: the same run once per seed, in one process, and what the runs say together.

Each seed is a normal run in ``OUTPUT_DIR/seed_N`` (replayable, resumable, with its reports); the data is loaded
once for all of them (and placed once on the accelerator by the device loader), and a compiled model's graphs
are reused across seeds by torch.compile's own cache (docs/experiments.md: 33.5 s, then 3.9 s a seed).
``seeds.json`` in ``OUTPUT_DIR`` holds every finished seed's accuracies and time and their mean, standard
deviation, standard error and 95% interval (and, with ``--target_accuracy``, the one-sided t-test that the mean
exceeds it), rewritten as each seed ends. Running the same command again continues the experiment: finished
seeds are skipped, a stopped one resumes from its checkpoint.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

from accelerate import PartialState

from cifar_accel.build import inputs_shared
from cifar_accel.checkpoint import RESUME_MAY_CHANGE, checkpoint_folders, rerun_command
from cifar_accel.config import TrainConfig
from cifar_accel.engine import train
from cifar_accel.errors import StoppedBySignal, UserError
from cifar_accel.files import FolderLock, write_json
from cifar_accel.reporting import refuse_existing_run
from cifar_accel.run_files import RESULTS_FILE, SEEDS_SUMMARY_FILE
from cifar_accel.run_records import read_finished_run, read_run_json, selected_metric
from cifar_accel.run_statistics import describe, format_mean
from cifar_accel.values import parse_seeds

# What may differ between the command that started an experiment and the one that continues it: what a resumed
# run may change, and the seeds themselves (more seeds extend the experiment).
MAY_CHANGE = (*RESUME_MAY_CHANGE, "seed", "seeds", "target_accuracy")


def seed_folder(seed: int) -> str:
    return f"seed_{seed}"


def run_seeds(
    config: TrainConfig, on_evaluation: Callable[[dict], None] | None = None, resume_hint: str | None = None
) -> dict:
    """Train once per seed of ``config.seeds``; returns ``seeds.json``'s content. ``on_evaluation`` goes to the
    first seed's run (a sweep's pruner judges a trial by it); ``resume_hint`` is what a stop says to run again
    (default: this command)."""
    config.validate()
    seeds, root = parse_seeds(config.seeds), Path(config.output_dir)
    if config.push_to_hub:
        raise UserError("--push_to_hub with --seeds would push every seed's model to one repo; "
                        "push the seed you choose with `cifar-accel push --run_dir OUTPUT_DIR/seed_N`")  # fmt: skip
    if config.resume_from_checkpoint:
        raise UserError("--seeds continues a stopped experiment when the same command is run again: "
                        "drop --resume_from_checkpoint")  # fmt: skip
    settings = experiment_settings(config)
    check_output_dir(root, settings, config.overwrite_output_dir)
    is_main = PartialState().is_main_process
    lock = FolderLock(root)
    if is_main:
        lock.acquire()  # two experiments in one folder would train the same seeds twice
    try:
        with inputs_shared():
            hint = resume_hint or rerun_command(PartialState().num_processes)
            return _train_seeds(config, seeds, root, settings, is_main, on_evaluation, hint)
    finally:
        lock.release()


def _train_seeds(
    config: TrainConfig, seeds: list[int], root: Path, settings: dict, is_main: bool,
    on_evaluation: Callable[[dict], None] | None, resume_hint: str,
) -> dict:  # fmt: skip
    runs = []
    if is_main:  # at once: a continuing command is checked against these settings even if no seed finished
        write_json(root / SEEDS_SUMMARY_FILE, summarize(settings, seeds, runs, config.target_accuracy))
    for index, seed in enumerate(seeds):
        run_dir = root / seed_folder(seed)
        results = None if config.overwrite_output_dir else finished_results(run_dir)
        if results is None:
            print(f"seed {seed} ({index + 1} of {len(seeds)}): training in {run_dir}", flush=True)
            seed_config = dataclasses.replace(
                config, seed=seed, seeds=None, target_accuracy=None, output_dir=str(run_dir),
                resume_from_checkpoint="latest" if checkpoint_folders(run_dir) and not config.overwrite_output_dir
                else None,
                # A folder left by a run killed before its first checkpoint has nothing to continue: it is replaced.
                overwrite_output_dir=config.overwrite_output_dir or run_dir.exists(),
            )  # fmt: skip
            try:
                results = train(seed_config, on_evaluation if index == 0 else None, resume_hint)
            except StoppedBySignal:
                if is_main:
                    write_json(root / SEEDS_SUMMARY_FILE, summarize(settings, seeds, runs, config.target_accuracy))
                raise
        else:
            print(f"seed {seed} ({index + 1} of {len(seeds)}): finished before, in {run_dir}", flush=True)
        runs.append(seed_result(seed, results))
        summary = summarize(settings, seeds, runs, config.target_accuracy)
        if is_main:
            write_json(root / SEEDS_SUMMARY_FILE, summary)
    if is_main:
        print(format_summary(summary), flush=True)
    return summary


def experiment_settings(config: TrainConfig) -> dict:
    """The settings every seed shares: those a continuing command must repeat."""
    return {name: value for name, value in config.to_dict().items() if name not in MAY_CHANGE}


def check_output_dir(root: Path, settings: dict, overwrite: bool) -> None:
    """Refuse, writing nothing, a folder that holds a single run, or an experiment with other settings."""
    FolderLock(root).refuse_if_held()
    if overwrite:
        return
    refuse_existing_run(root)
    summary_path = root / SEEDS_SUMMARY_FILE
    if not summary_path.exists():
        return
    try:
        recorded = read_run_json(summary_path).get("settings")
    except UserError as error:  # written whole, so damaged by hand or by another program
        raise UserError(f"--output_dir {root}: {str(error).split(': ', 1)[-1]}; pass --overwrite_output_dir to "
                        "start the experiment afresh, or choose another --output_dir") from None  # fmt: skip
    if recorded != settings:
        differing = sorted(name for name in settings if not isinstance(recorded, dict)
                           or recorded.get(name) != settings[name])  # fmt: skip
        raise UserError(
            f"--output_dir {root} holds a --seeds experiment with other settings ({', '.join(differing) or 'unread'}); "
            "run it with the same settings to continue it, pass --overwrite_output_dir to replace it, or choose "
            "another --output_dir"
        )


def finished_results(run_dir: Path) -> dict | None:
    """A seed's ``results.json`` if its run finished; None for a run to train or resume."""
    if not (run_dir / RESULTS_FILE).is_file():
        return None
    return read_finished_run(run_dir).results


def seed_result(seed: int, results: dict) -> dict:
    """One seed's line of the summary: the final evaluation's top-1 (on the test split when a validation split
    chose the epoch), with test-time augmentation if asked, the selection split's, and the times."""
    final = results["final_metrics"]
    return {
        "seed": seed,
        "run_dir": seed_folder(seed),
        "split": final["split"],
        "top1": final["top1"],
        "tta_top1": results["tta_metrics"]["top1"] if "tta_metrics" in results else None,
        "selection_top1": selected_metric(results["best_metrics"], "top1"),
        "seconds": results["timing"]["speed_run_seconds"],
        "total_seconds": results["timing"]["total_seconds"],
    }


def summarize(settings: dict, seeds: list[int], runs: list[dict], target: float | None) -> dict:
    """``seeds.json``: the seeds asked for, the finished runs, and the statistics of each measure over them."""
    summary = {"seeds": seeds, "finished": len(runs) == len(seeds), "settings": settings, "runs": runs}
    for measure in ("top1", "tta_top1", "selection_top1", "seconds"):
        values = [run[measure] for run in runs if run[measure] is not None]
        summary[measure] = describe(values, target if measure in ("top1", "tta_top1") else None) if values else None
    return summary


def format_summary(summary: dict) -> str:
    """The terminal's table: a line per seed, then the mean ± standard error of each accuracy, its 95% interval
    and, with a target, the t-test."""
    runs, tta = summary["runs"], summary["tta_top1"] is not None
    split = runs[0]["split"]
    lines = [f"{'seed':>10}  {split + ' top-1':>12}" + ("  with TTA" if tta else "") + "  seconds"]
    for run in runs:
        with_tta = f"  {run['tta_top1']:8.2%}" if tta else ""
        lines.append(f"{run['seed']:>10}  {run['top1']:12.2%}{with_tta}  {run['seconds']:7.1f}")
    for measure, name in (("top1", f"{split} top-1"), ("tta_top1", "with TTA")):
        stats = summary[measure]
        if stats is None:
            continue
        line = f"{name}: {format_mean(stats)} (n={stats['n']})"
        if stats["sd"] is not None:
            low, high = stats["ci95"]
            line += f", sd {stats['sd']:.2%}, 95% interval [{low:.2%}, {high:.2%}]"
        if stats.get("p_value") is not None:
            line += f"; mean > {stats['target']:.2%}: t = {stats['t']:.2f}, p = {stats['p_value']:.3g} (one-sided)"
        lines.append(line)
    return "\n".join(lines)
