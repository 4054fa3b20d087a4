"""``cifar-accel sweep``: a bad space is one line and writes nothing; trials are pruned, refused, dropped as surplus
or found dead as promised; the best recipe replays its trial; and, with whole processes (slow), two workers on one
journal file train exactly N trials once each, and a killed or stopped worker's trial is run again."""

import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import REPO_ROOT, cifar_accel_command, run_command
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from cifar_accel import sweep
from cifar_accel.cli import main
from cifar_accel.config import TrainConfig
from cifar_accel.engine import train
from cifar_accel.errors import UserError
from cifar_accel.settings import parse_train_args
from cifar_accel.stopping import StopRequest
from cifar_accel.sweep_files import load_space

# Optuna's heartbeat, retry and plot functions are experimental: the sweep silences the warning, and so do these;
# and they ask for trials outside Study.optimize, which Optuna warns heartbeats are meant for.
pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize"),
]
# 96 training images (32 more held out to compare trials), 2 steps an epoch.
TRAINING = (
    "--model bn_cnn --epochs 2 --batch_size 48 --num_workers 0 --learning_rate 0.05 --label_smoothing 0 "
    "--max_train_samples 128 --validation_size 32"
)
SPACE = """\
learning_rate: {type: float, low: 1.0e-5, high: 0.1, log: true}
label_smoothing: {type: float, low: 0, high: 0.2}
"""


def write_space(folder: Path, text: str = SPACE) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


def sweep_flags(dataset: Path, folder: Path, trials: int, *extra: str, space: str = SPACE) -> list[str]:
    """The flags of a sweep of ``trials`` tiny trials in ``folder``, on the journal file ``folder/journal.log``."""
    return [
        "--space", str(write_space(folder, space)), "--study", "tiny", "--storage", str(folder / "journal.log"),
        "--trials", str(trials), "--dataset", str(dataset), "--output_dir", str(folder / "sweep"),
        *TRAINING.split(), *extra,
    ]  # fmt: skip


def load(journal: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(journal))))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("learning_rat: {type: float, low: 0.01, high: 1}", "learning_rat is not a training flag"),
        ("learning_rate: {type: float, low: 1, high: 0.1}", "learning_rate: low 1 is above high 0.1"),
        ("learning_rate: {type: float, low: 0, high: 0.1}", "learning_rate: 0 is refused: --learning_rate must be a "
         "positive finite number"),
        ("label_smoothing: {type: float, low: 0, high: 1}", r"label_smoothing: 1 is refused: --label_smoothing must "
         r"be in \[0, 1\)"),
        ("batch_size: {type: categorical, choices: [32, big]}", "batch_size: 'big' is refused: --batch_size must be a "
         "whole number"),
        ("batch_size: {type: float, low: 16, high: 64.5}", "batch_size: 64.5 is refused: --batch_size must be a whole"),
        ("seed: {type: int, low: 0, high: 9}", "seed steers the run rather than its result"),
        ("output_dir: {type: categorical, choices: [a, b]}", "output_dir steers the run"),
        ("learning_rate: {type: float, low: 0.01, high: 1, step: 2}", "has unknown keys step"),
        ("learning_rate: {type: float, low: -1, high: 1, log: true}", "a log scale needs low above 0"),
        ("momentum: {type: uniform, low: 0, high: 1}", "momentum must be a mapping with type float, int or categor"),
        ("- learning_rate", "must be a mapping of flags to their ranges"),
    ],
)  # fmt: skip
def test_a_bad_space_is_one_line_naming_file_and_parameter_and_writes_nothing(tmp_path, capsys, space, message):
    with pytest.raises(SystemExit) as exited:
        main(["sweep", *sweep_flags(tmp_path / "no_data", tmp_path, 2, space=space)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"error: --space {tmp_path / 'space.yaml'}")
    assert re.search(message, error), error
    assert not (tmp_path / "journal.log").exists() and not (tmp_path / "sweep").exists()


def test_a_worker_joining_with_other_settings_is_refused_in_one_line(tmp_path):
    base = parse_train_args(["--output_dir", str(tmp_path / "sweep"), *TRAINING.split()])
    space = load_space(str(write_space(tmp_path)), base)
    options = sweep.SweepOptions("space.yaml", "tiny", str(tmp_path / "journal.log"), trials=2)
    storage = sweep.open_storage(options.storage, 60)
    sweep.open_study(options, storage, space, sweep.fixed_settings(base, space), StopRequest())
    other = parse_train_args(["--output_dir", str(tmp_path / "sweep"), *TRAINING.split(), "--epochs", "3"])
    with pytest.raises(UserError, match=r"^--study tiny was started with --epochs 2 \(this worker: 3\);"):
        sweep.open_study(options, storage, space, sweep.fixed_settings(other, space), StopRequest())
    with pytest.raises(UserError, match="was started with another --space .differing in label_smoothing"):
        sweep.open_study(options, storage, {}, sweep.fixed_settings(base, {}), StopRequest())


def test_median_pruning_stops_a_bad_trial_and_best_recipe_replays_the_best(colour_dataset, tmp_path, monkeypatch):
    # Optuna's median pruner waits for 5 complete trials; 2 make the test cheap and compare the same way.
    monkeypatch.setattr(
        optuna.pruners, "MedianPruner", functools.partial(optuna.pruners.MedianPruner, n_startup_trials=2)
    )
    flags = sweep_flags(colour_dataset, tmp_path, 3)
    base = parse_train_args(flags[8:])  # after the sweep's own four flags
    options = sweep.SweepOptions(flags[1], "tiny", flags[5], trials=3)
    space = load_space(options.space, base)
    study = sweep.open_study(options, sweep.open_storage(options.storage, 60), space, sweep.fixed_settings(base, space),
                             StopRequest())  # fmt: skip
    for learning_rate, label_smoothing in ((0.05, 0.0), (0.03, 0.1), (1e-5, 0.0)):  # the last learns nothing
        study.enqueue_trial({"learning_rate": learning_rate, "label_smoothing": label_smoothing})
    study = sweep.run_sweep(options, base)
    trials = study.get_trials()
    assert [trial.state for trial in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[2].last_step == 1  # of 2 epochs
    sweep_dir = tmp_path / "sweep"
    rows = (sweep_dir / "trials.csv").read_text().splitlines()
    assert rows[0] == "trial,state,value,seconds,run_dir,note,learning_rate,label_smoothing"
    assert rows[3].startswith("2,PRUNED,") and "pruned after epoch 1" in rows[3]
    assert (sweep_dir / "plots" / "optimization_history.png").stat().st_size > 10_000
    assert (sweep_dir / "plots" / "param_importances.png").stat().st_size > 10_000

    best = study.best_trial
    recipe = (sweep_dir / "best_recipe.yaml").read_text()
    assert recipe.startswith(f"# The best trial of cifar-accel sweep study 'tiny': trial {best.number} ")
    replayed = train(parse_train_args(["--config", str(sweep_dir / "best_recipe.yaml"), "--output_dir",
                                       str(tmp_path / "replay")]))  # fmt: skip
    trained = json.loads((Path(best.user_attrs["run_dir"]) / "results.json").read_text())
    assert replayed["best_metrics"]["eval_top1"] == best.value == trained["best_metrics"]["eval_top1"]
    assert replayed["final_metrics"] == trained["final_metrics"]


def test_refused_trials_fail_with_their_message_and_three_in_a_row_stop_the_worker(tmp_path, monkeypatch, capsys):
    def diverging(config: TrainConfig, on_evaluation=None, resume_hint=None) -> dict:
        raise UserError(f"the training loss became non-finite at learning rate {config.learning_rate:.3g}")

    monkeypatch.setattr(sweep, "train", diverging)
    with pytest.raises(SystemExit) as exited:
        main(["sweep", *sweep_flags(tmp_path / "no_data", tmp_path, 5)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("error: 3 trials in a row failed, the last (trial 2) with: the training loss became")
    trials = load(tmp_path / "journal.log").get_trials()
    assert [trial.state for trial in trials] == [TrialState.FAIL] * 3
    assert all(trial.user_attrs["error"].startswith("the training loss became non-finite") for trial in trials)


def test_with_seeds_a_trial_is_worth_their_mean_and_the_pruner_sees_the_first_seed(tmp_path, monkeypatch):
    from cifar_accel import seeds

    trained = []

    def fake_train(config: TrainConfig, on_evaluation=None, resume_hint=None) -> dict:
        top1 = 0.5 + config.seed / 10
        trained.append((config.seed, on_evaluation is not None))
        if on_evaluation:
            on_evaluation({"epoch": 1, "eval_top1": top1})
        return {"final_metrics": {"split": "test", "top1": top1}, "best_metrics": {"eval_top1": top1},
                "timing": {"speed_run_seconds": 1.0, "total_seconds": 1.0}}  # fmt: skip

    monkeypatch.setattr(seeds, "train", fake_train)
    flags = sweep_flags(tmp_path / "no_data", tmp_path, 1, "--seeds", "0-1", space="momentum: {type: float, "
                        "low: 0.8, high: 0.95}")  # fmt: skip
    study = sweep.run_sweep(sweep.SweepOptions(flags[1], "tiny", flags[5], trials=1), parse_train_args(flags[8:]))
    (trial,) = study.get_trials()
    assert trained == [(0, True), (1, False)]
    assert trial.value == pytest.approx(0.55) and trial.intermediate_values == {1: 0.5}
    recipe = parse_train_args(["--config", str(tmp_path / "sweep" / "best_recipe.yaml")])  # one run, seed 0
    assert (recipe.seeds, recipe.seed, recipe.momentum) == (None, 0, trial.params["momentum"])


def test_a_trial_begun_once_n_are_in_play_is_dropped_untrained(tmp_path):
    storage = sweep.open_storage(str(tmp_path / "journal.log"), 60)
    study = optuna.create_study(storage=storage, direction="maximize")
    study.ask()  # another worker's, running: the only one of --trials 1
    mine = study.ask()
    options = sweep.SweepOptions("space.yaml", "tiny", "journal.log", trials=1)
    runner = sweep.TrialRunner(study, {}, TrainConfig(output_dir=str(tmp_path / "sweep")), options, StopRequest())
    with pytest.raises(sweep.SurplusTrial):
        runner(mine)
    assert study.get_trials()[1].user_attrs == {"surplus": True}
    assert not (tmp_path / "sweep").exists()


def test_a_journal_trial_whose_worker_fell_silent_is_failed_and_queued_again(tmp_path):
    storage = sweep.open_storage(str(tmp_path / "journal.log"), heartbeat_seconds=1)  # silent for 2 s: dead
    study = optuna.create_study(storage=storage, direction="maximize")
    trial = study.ask({"learning_rate": FloatDistribution(0.01, 1.0)})
    storage.record_heartbeat(trial._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert [other.state for other in study.get_trials()] == [TrialState.RUNNING]
    time.sleep(2.2)
    optuna.storages.fail_stale_trials(study)
    failed, queued = study.get_trials()
    assert (failed.state, queued.state) == (TrialState.FAIL, TrialState.WAITING)
    assert queued.params == failed.params and RetryHeartbeatStaleTrialCallback.retry_history(queued) == [0]


# Whole processes. slow_bn_cnn (tests/slow_train.py) makes each step 0.3 s longer: a trial is caught mid-way.
SLOW_SWEEP = (
    "import sys; sys.path.insert(0, 'tests'); import slow_train; from cifar_accel.cli import main; "
    "main(['sweep', *sys.argv[1:]])"
)


def slow_sweep_command(dataset: Path, folder: Path, trials: int, *extra: str) -> list[str]:
    flags = sweep_flags(dataset, folder, trials, "--model", "slow_bn_cnn", *extra)
    return [sys.executable, "-c", SLOW_SWEEP, *flags]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """A worker in a process group of its own, as a job scheduler starts it."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CIFAR_ACCEL_TEST_STEP_SECONDS": "0.3"}
    with log.open("w") as output:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                start_new_session=True)  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_workers_on_one_journal_file_train_exactly_n_trials_each_once(colour_dataset, tmp_path):
    command = cifar_accel_command("sweep", *sweep_flags(colour_dataset, tmp_path, 4))
    logs = [tmp_path / f"worker_{index}.log" for index in range(2)]
    workers = [start(command, log) for log in logs]
    for worker, log in zip(workers, logs, strict=True):
        assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
    outputs = [log.read_text() for log in logs]
    trials = load(tmp_path / "journal.log").get_trials()
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert all(trial in complete or trial.user_attrs.get("surplus") for trial in trials)  # surplus: never trained
    trained = re.findall(r"^sweep: trial \d+: .* -> (\S+)$", "\n".join(outputs), re.MULTILINE)
    assert sorted(trained) == sorted({trial.user_attrs["run_dir"] for trial in complete})  # each folder once
    assert all(output.count("\nsweep: best trial ") == 1 for output in outputs)  # each worker's report


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_retried_by_another_worker(colour_dataset, tmp_path):
    command = slow_sweep_command(colour_dataset, tmp_path, 3, "--heartbeat_seconds", "1")
    first = start(command, tmp_path / "killed.log")
    wait_for(tmp_path / "sweep" / "trial_0" / "train_config.json", first, tmp_path / "killed.log")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    second = run_command(command, env={"CIFAR_ACCEL_TEST_STEP_SECONDS": "0.3"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    trials = load(tmp_path / "journal.log").get_trials()
    assert trials[0].state == TrialState.FAIL and "error" not in trials[0].user_attrs
    retried = [trial for trial in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(trial) == 0]
    assert [trial.state for trial in retried] == [TrialState.COMPLETE]
    assert RetryHeartbeatStaleTrialCallback.retry_history(retried[0]) == [0]
    assert retried[0].user_attrs["run_dir"] == str(tmp_path / "sweep" / "trial_0")
    assert sum(trial.state == TrialState.COMPLETE for trial in trials) == 3


@pytest.mark.slow
def test_a_stopped_worker_queues_its_trial_and_the_same_command_resumes_it(colour_dataset, tmp_path):
    command = slow_sweep_command(colour_dataset, tmp_path, 2)
    log = tmp_path / "stopped.log"
    first = start(command, log)
    wait_for(tmp_path / "sweep" / "trial_0" / "train_config.json", first, log)
    time.sleep(0.5)  # a step or two in
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    last_line = log.read_text().strip().splitlines()[-1]
    assert last_line.startswith("SIGTERM: the sweep stopped; trial 0 is queued to continue; resume with: ")
    assert "cifar-accel sweep --space" in last_line
    assert list((tmp_path / "sweep" / "trial_0" / "checkpoints").glob("step_*"))
    again = run_command(command, env={"CIFAR_ACCEL_TEST_STEP_SECONDS": "0.3"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from {tmp_path / 'sweep' / 'trial_0' / 'checkpoints'}" in again.stdout
    trials = load(tmp_path / "journal.log").get_trials()
    assert [trial.state for trial in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert trials[1].user_attrs["run_dir"] == str(tmp_path / "sweep" / "trial_0")


def test_the_documented_slurm_sweep_and_its_space_are_accepted():
    """docs/slurm_sweep.sbatch's command, with docs/sweep_space.yaml, passes the checks made before any trial."""
    script = (REPO_ROOT / "docs" / "slurm_sweep.sbatch").read_text().replace("\\\n", " ")
    command = shlex.split(next(line for line in script.splitlines() if line.startswith("srun cifar-accel sweep")))
    flags = [flag.replace('"$SWEEP_DIR"', "sweeps/x").replace("$SWEEP_DIR", "sweeps/x") for flag in command[3:]]
    sweep_flags = {"--space", "--study", "--storage", "--trials", "--heartbeat_seconds"}
    training = [flag for index, flag in enumerate(flags)
                if flag not in sweep_flags and (index == 0 or flags[index - 1] not in sweep_flags)]  # fmt: skip
    space = load_space(str(REPO_ROOT / flags[flags.index("--space") + 1]), parse_train_args(training))
    assert set(space) == {"learning_rate", "weight_decay", "label_smoothing", "batch_size"}


STUDY_CREATED = '{"op_code": 0, "worker_id": "a", "study_name": "s", "directions": [2]}\n'


# Optuna skips an incomplete last line (a write in flight); damage with lines after it cannot be read past.
@pytest.mark.parametrize(
    "content", ["garbage\n" + STUDY_CREATED, '{"op_code": 0, "worker_id": "a", "study_na' + 2 * STUDY_CREATED],
    ids=["not a journal", "a line cut short"],
)  # fmt: skip
def test_a_damaged_journal_file_is_one_line_and_left_as_it_was(tmp_path, content):
    journal = tmp_path / "journal.log"
    journal.write_text(content)
    with pytest.raises(UserError, match=rf"--storage {journal} is not an Optuna journal file, or was cut short \("):
        sweep.open_storage(str(journal), 60)
    assert journal.read_text() == content
