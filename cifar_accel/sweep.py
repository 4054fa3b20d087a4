"""``cifar-accel sweep``: a hyperparameter search on Optuna, one training run per trial in ``SWEEP_DIR/trial_K``,
with any number of worker processes sharing one study (a journal file, or a database URL).

A worker trains trials until exactly ``--trials`` are in play (complete, pruned, running or queued) across all
workers, then waits for the others' running trials, and ends with the table of all trials, ``trials.csv``,
``best_recipe.yaml`` (which ``cifar-accel train --config`` replays) and Optuna's plots. A worker that dies is found
by its heartbeats stopping: its trial is failed and queued again, and continues from its folder's last checkpoint
(with ``--checkpointing_steps``; otherwise it starts again).
A worker stopped by SIGINT/SIGTERM/SIGUSR1 queues its trial again itself (training saved a checkpoint) and exits
128 + the signal; running the same command continues the sweep.
"""

import dataclasses
import json
import signal
import time
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from cifar_accel.build import inputs_shared
from cifar_accel.checkpoint import RESUME_MAY_CHANGE, checkpoint_folders, resume_settings
from cifar_accel.config import TrainConfig
from cifar_accel.engine import train
from cifar_accel.errors import StoppedBySignal, UserError, first_line
from cifar_accel.files import check_writable_folder
from cifar_accel.preflight import preflight
from cifar_accel.run_records import selected_metric
from cifar_accel.seeds import run_seeds
from cifar_accel.stopping import StopRequest
from cifar_accel.sweep_files import SETTINGS_ATTR, load_space, report_sweep, suggest, trial_note

# The trials that count towards --trials: all but the failed ones (a failure is replaced by a new trial).
IN_PLAY = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
HEARTBEAT_ATTR = "cifar_accel:heartbeat"  # a trial system attribute: the time its worker last said it was alive
SPACE_ATTR = "cifar_accel:space"  # the study's user attribute holding its space
FAILURES_IN_A_ROW = 3  # refused trials in a row stop a worker: the space or the settings are wrong, not one draw
CREATOR_GRACE_SECONDS = 10  # how long a joining worker waits for the study's creator to record its space
# Settings that do not change a trial's result (those a resume may change): workers of one study may differ in them.
# Not the dataset, compared as given, nor the output folder, compared as an absolute path (fixed_settings).
WORKER_SETTINGS = tuple(name for name in RESUME_MAY_CHANGE if name not in ("dataset", "output_dir"))


class SurplusTrial(Exception):
    """A trial created once ``--trials`` were already in play: another worker took the last one."""


class TrialFailed(Exception):
    """The trial's training refused its settings (a UserError); the sweep goes on."""


@dataclasses.dataclass
class SweepOptions:
    """The sweep's own flags; ``command`` is the command line that started it (to print how to resume)."""

    space: str
    study: str
    storage: str
    trials: int
    pruner: str = "median"
    heartbeat_seconds: int = 60
    command: str = "cifar-accel sweep"


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file with heartbeats. Optuna's ``JournalStorage`` has none (5.1): the trial of a worker killed
    with SIGKILL (or its machine) would stay RUNNING for ever, counted among the N and never retried. With this
    ``study.optimize`` runs a heartbeat thread beside each trial, which writes the time as a trial system
    attribute every interval, and before each trial fails the RUNNING trials silent for longer than the grace
    period (``fail_stale_trials``), which the Retry callback queues again, as ``RDBStorage`` does."""

    def __init__(self, path: str, interval: int, callback: RetryHeartbeatStaleTrialCallback):
        super().__init__(JournalFileBackend(path))
        self.interval, self.grace_period, self.callback = interval, 2 * interval, callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker found the trial silent and failed it: there is nothing left to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [trial._trial_id for trial in running if now - _last_sign_of_life(trial) > self.grace_period]

    def get_heartbeat_interval(self) -> int:
        return self.interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return self.callback


def _last_sign_of_life(trial: FrozenTrial) -> float:
    # A queued trial carries its predecessor's last heartbeat; its own life starts when a worker takes it.
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0  # naive local time, as replayed
    return max(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0), started)


def open_storage(storage: str, heartbeat_seconds: int) -> optuna.storages.BaseStorage:
    """A database URL (contains ``://``) or a journal file, both with heartbeats and up to 3 retries per trial."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
    if "://" in storage:
        try:
            return RDBStorage(storage, heartbeat_interval=heartbeat_seconds, grace_period=2 * heartbeat_seconds,
                              heartbeat_stale_trial_callback=retry)  # fmt: skip
        except Exception as error:  # a bad URL, a missing driver, a refused connection: each its own class
            raise UserError(f"--storage {storage}: {first_line(error)}") from None
    path = Path(storage)
    if path.is_dir():
        raise UserError(f"--storage {storage} is a folder; give the journal file's path (it is created if absent)")
    check_writable_folder(path.parent, "--storage")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return HeartbeatJournalStorage(str(path), heartbeat_seconds, retry)
    except ValueError as error:  # json.JSONDecodeError: the file holds a line that is not a journal entry
        raise UserError(f"--storage {storage} is not an Optuna journal file, or was cut short ({first_line(error)}); "
                        "give the study's journal, or a new file") from None  # fmt: skip


def fixed_settings(base: TrainConfig, space: dict) -> dict:
    """The settings every trial shares, which every worker of the study must give alike."""
    settings = {**base.to_dict(), "output_dir": str(Path(base.output_dir).resolve())}
    return {name: value for name, value in settings.items() if name not in space and name not in WORKER_SETTINGS}


def open_study(options: SweepOptions, storage: Any, space: dict, fixed: dict, stop: StopRequest) -> optuna.Study:
    """The study, created with the space and the fixed settings as user attributes, or joined: a worker with
    another space or other settings is refused, since its trials would not be comparable."""
    pruner = optuna.pruners.MedianPruner() if options.pruner == "median" else optuna.pruners.NopPruner()
    # create_study(load_if_exists=True) would not say whether this worker created the study: this does.
    try:
        study = optuna.create_study(study_name=options.study, storage=storage, direction="maximize", pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=options.study, storage=storage, pruner=pruner)
    else:
        study.set_user_attr(SPACE_ATTR, space)
        study.set_user_attr(SETTINGS_ATTR, fixed)
        return study
    if study.directions != [optuna.study.StudyDirection.MAXIMIZE]:
        raise UserError(f"--study {options.study} does not maximise one value; give another --study")
    deadline = time.monotonic() + CREATOR_GRACE_SECONDS
    while SETTINGS_ATTR not in study.user_attrs and time.monotonic() < deadline and not stop.signal_number:
        time.sleep(0.2)  # the worker that created the study is writing them
    if SETTINGS_ATTR not in study.user_attrs:  # made by Optuna itself, or its creator died at once
        study.set_user_attr(SPACE_ATTR, space)
        study.set_user_attr(SETTINGS_ATTR, fixed)
    theirs_space, theirs = _as_json(study.user_attrs.get(SPACE_ATTR)), _as_json(study.user_attrs[SETTINGS_ATTR])
    if theirs_space != _as_json(space):
        differing = sorted(name for name in {*space, *theirs_space} if space.get(name) != theirs_space.get(name))
        raise UserError(f"--study {options.study} was started with another --space (differing in "
                        f"{', '.join(differing)}); give the same space, or another --study")  # fmt: skip
    ours = _as_json(fixed)
    differing = [f"--{name} {json.dumps(theirs.get(name))} (this worker: {json.dumps(ours.get(name))})"
                 for name in sorted({*ours, *theirs}) if ours.get(name) != theirs.get(name)]  # fmt: skip
    if differing:
        raise UserError(f"--study {options.study} was started with {'; '.join(differing[:3])}; its trials "
                        "share their fixed settings: give the same flags, or another --study")  # fmt: skip
    return study


def _as_json(value: Any) -> Any:
    """As the storage gives it back: tuples become lists."""
    return json.loads(json.dumps(value))


def trial_config(base: TrainConfig, params: dict, folder: Path, retried: bool) -> TrainConfig:
    """The trial's settings. A retried trial whose folder holds a checkpoint continues it (the checkpoint restores
    its settings, and refuses it if they are not this trial's); otherwise the folder's run is replaced. With
    ``--seeds`` a retried trial's experiment continues (its finished seeds kept, a stopped one resumed)."""
    if base.seeds:
        return dataclasses.replace(base, **params, output_dir=str(folder), overwrite_output_dir=not retried)
    if retried and checkpoint_folders(folder):
        requested = {
            **params, "resume_from_checkpoint": "latest", "output_dir": str(folder),
            **{name: getattr(base, name) for name in ("dataset", "num_workers", "report_to", "checkpointing_steps",
                                                      "checkpoints_total_limit")},
        }  # fmt: skip
        saved = resume_settings(requested, str(folder))
        config = TrainConfig(
            **{name: value for name, value in saved.items() if name in typing.get_type_hints(TrainConfig)}
        )
    else:
        config = dataclasses.replace(
            base, **params, output_dir=str(folder), overwrite_output_dir=True, resume_from_checkpoint=None
        )
    config.validate()
    return config


def run_training(config: TrainConfig, trial: optuna.Trial, command: str) -> float:
    """Train (``--seeds``: once per seed) reporting each evaluated epoch to the pruner; the objective is the
    selection split's top-1 of the epoch kept (with seeds, its mean over them). A stop says to run ``command``."""

    def report(record: dict) -> None:
        trial.report(selected_metric(record, "top1"), record["epoch"])
        # After the last epoch there is no time left to save: the trial completes, and its value counts.
        if record["epoch"] < config.epoch_count and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

    if config.seeds:  # run_seeds reports the first seed's epochs only: the pruner compares one curve per trial
        return run_seeds(config, on_evaluation=report, resume_hint=command)["selection_top1"]["mean"]
    results = train(config, on_evaluation=report, resume_hint=command)
    return selected_metric(results["best_metrics"], "top1")


def _trial(study: optuna.Study, number: int) -> FrozenTrial:
    return next(trial for trial in study.get_trials(deepcopy=False) if trial.number == number)


class TrialRunner:
    """The objective: one training run per trial, in ``SWEEP_DIR/trial_K`` (K: the number of the trial it
    continues, or its own)."""

    def __init__(self, study: optuna.Study, space: dict, base: TrainConfig, options: SweepOptions, stop: StopRequest):
        self.study, self.space, self.base, self.stop = study, space, base, stop
        self.trials, self.command = options.trials, options.command
        self.failures_in_a_row = 0
        self.stopped_trial: int | None = None  # the trial a signal stopped: it is queued again

    def __call__(self, trial: optuna.Trial) -> float:
        # MaxTrialsCallback counts only after a trial ends: two workers that start their trials together would
        # both run one when a single trial was missing. The storage numbers trials in the order they were
        # created, so the first N in play run and any later one is dropped untrained.
        in_play = self.study.get_trials(deepcopy=False, states=IN_PLAY)
        if sum(other.number < trial.number for other in in_play) >= self.trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"{self.trials} trials are in play")
        params = suggest(trial, self.space)
        frozen = _trial(self.study, trial.number)
        original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        folder = Path(self.base.output_dir) / f"trial_{trial.number if original is None else original}"
        if self.stop.signal_number:  # a signal came between two trials
            self.stopped_trial = trial.number
            raise StoppedBySignal(self.stop.signal_number)
        trial.set_user_attr("run_dir", str(folder))
        earlier, start = frozen.user_attrs.get("seconds", 0.0), time.perf_counter()  # a continued trial's first part
        again = "" if original is None else f" (trial {original} again, from its checkpoint if it saved one)"
        print(f"sweep: trial {trial.number}{again}: {json.dumps(params)} -> {folder}", flush=True)
        try:
            config = trial_config(self.base, params, folder, retried=original is not None)
            value = run_training(config, trial, self.command)
        except UserError as error:  # e.g. the loss became non-finite at a high learning rate
            trial.set_user_attr("error", str(error))
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= FAILURES_IN_A_ROW:
                raise UserError(f"{self.failures_in_a_row} trials in a row failed, the last (trial {trial.number}) "
                                f"with: {error}; check --space and the flags") from None  # fmt: skip
            raise TrialFailed(str(error)) from None
        except StoppedBySignal:
            self.stopped_trial = trial.number
            raise
        finally:
            trial.set_user_attr("seconds", round(earlier + time.perf_counter() - start, 1))
        self.failures_in_a_row = 0
        return value

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback after each trial: its line; a signal that came meanwhile stops the worker here."""
        if trial.state == TrialState.PRUNED:
            self.failures_in_a_row = 0
        outcome = trial_note(trial)
        if trial.state == TrialState.COMPLETE:
            value = f"selection top1 {trial.value:.2%} in {trial.user_attrs.get('seconds')} s"
            outcome = f"{value} ({outcome})" if outcome else value
        print(f"sweep: trial {trial.number} {trial.state.name}: {outcome}", flush=True)
        if self.stop.signal_number:
            raise StoppedBySignal(self.stop.signal_number)


def run_until_done(study: optuna.Study, runner: TrialRunner, stop: StopRequest, heartbeat_seconds: int) -> None:
    """Trials until N are in play, then wait for those running elsewhere: each ends, or falls silent and is
    queued again (and then run here). Waiting, not leaving, is what finishes a study whose worker was killed."""
    callbacks = [MaxTrialsCallback(runner.trials, states=IN_PLAY), runner.after_trial]
    waited_for: set[int] = set()
    while True:
        if stop.signal_number:
            raise StoppedBySignal(stop.signal_number)
        optuna.storages.fail_stale_trials(study)
        in_play = study.get_trials(deepcopy=False, states=IN_PLAY)
        if len(in_play) < runner.trials or any(trial.state == TrialState.WAITING for trial in in_play):
            study.optimize(runner, callbacks=callbacks, catch=(SurplusTrial, TrialFailed))
            continue
        running = {trial.number for trial in in_play if trial.state == TrialState.RUNNING}
        if not running:
            return
        if running != waited_for:
            waited_for = running
            print(f"sweep: {runner.trials} trials in play; waiting for trial(s) {', '.join(map(str, sorted(running)))}"
                  f" of other workers (queued again if silent for {2 * heartbeat_seconds} s)", flush=True)  # fmt: skip
        deadline = time.monotonic() + min(heartbeat_seconds, 5)
        while time.monotonic() < deadline and not stop.signal_number:
            time.sleep(0.2)


def run_sweep(options: SweepOptions, base: TrainConfig) -> optuna.Study:
    """The whole of a worker's part: checks, study, trials, then the report. Returns the study."""
    space = load_space(options.space, base)  # before the storage is touched: a bad space writes nothing
    if base.resume_from_checkpoint:
        raise UserError("--resume_from_checkpoint: a sweep continues its own trials; run the same sweep again")
    if base.push_to_hub:
        raise UserError("--push_to_hub: a sweep trains many runs; push the one you keep with cifar-accel push")
    preflight(base)  # an unknown model, an output folder that cannot be written...: refused before the study opens
    sweep_dir = Path(base.output_dir)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial has its line here; Optuna's add tracebacks
    try:
        with warnings.catch_warnings(), StopRequest() as stop:  # between trials a signal is only noted
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, retries, plots
            study = open_study(options, open_storage(options.storage, options.heartbeat_seconds), space,
                               fixed_settings(base, space), stop)  # fmt: skip
            in_play = len(study.get_trials(deepcopy=False, states=IN_PLAY))
            print(f"sweep: study {options.study} ({options.storage}): {in_play} of {options.trials} trials in play; "
                  f"runs in {sweep_dir}/trial_K", flush=True)  # fmt: skip
            if not base.validation_size and "validation_size" not in space:
                print(f"sweep: note: trials are compared on the {base.eval_split} split, which then reports the best "
                      "one's accuracy too; --validation_size N compares them on N held-out training images",
                      flush=True)  # fmt: skip
            runner = TrialRunner(study, space, base, options, stop)
            try:
                with inputs_shared():  # trials that train on the same data load it once
                    run_until_done(study, runner, stop, options.heartbeat_seconds)
            except StoppedBySignal as stopped:
                raise StoppedBySignal(
                    signal.Signals[stopped.signal_name], _stop_message(study, runner.stopped_trial, options.command)
                ) from None
            report_sweep(study, sweep_dir, space)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def _stop_message(study: optuna.Study, stopped_trial: int | None, command: str) -> str:
    """Queue the stopped trial again, as the Retry callback does for a silent one, and say how to go on."""
    queued = ""
    if stopped_trial is not None and (trial := _trial(study, stopped_trial)).state == TrialState.FAIL:
        RetryHeartbeatStaleTrialCallback()(study, trial)  # no limit: each stop saved a checkpoint to continue
        queued = f"trial {stopped_trial} is queued to continue; "
    return f"the sweep stopped; {queued}resume with: {command}"
