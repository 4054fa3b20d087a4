"""The run folder from outside: an overwrite never loses the previous run too early, a resume is the
same run whatever flags it is given, one run per folder, and the operating system's refusals
(a full disk, a read-only folder) are one line that leaves nothing half-written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, accelerate_launch, replace_column_values, run_command

from cifar_accel import engine
from cifar_accel.errors import StoppedBySignal, UserError
from cifar_accel.settings import parse_train_args

FLAGS = "--model bn_cnn --epochs 1 --batch_size 64 --num_workers 0 --learning_rate 0.05 --label_smoothing 0"


def train_flags(dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--dataset", str(dataset), "--output_dir", str(output_dir), *FLAGS.split(), *extra]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, except the lock (it names its latest holder)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


@pytest.fixture(scope="module")
def finished_run(colour_dataset, tmp_path_factory) -> Path:
    """One epoch, with a checkpoint at its end; copied by the tests that change it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    engine.train(parse_train_args(train_flags(colour_dataset, run_dir, "--checkpointing_steps", "epoch")))
    return run_dir


def test_an_overwrite_that_fails_at_its_first_step_gives_the_previous_run_back(finished_run, colour_dataset, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = files_of(run_dir)
    diverging = ("--overwrite_output_dir", "--learning_rate", "1e30", "--warmup_fraction", "0")
    with pytest.raises(UserError, match="training loss became nan or inf at epoch 1, step "):
        engine.train(parse_train_args(train_flags(colour_dataset, run_dir, *diverging)))
    assert files_of(run_dir) == before and not (run_dir / ".replaced_run").exists()


def test_an_overwrite_stopped_in_its_first_epoch_keeps_the_previous_run_until_it_finishes_one(
    finished_run, colour_dataset, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = files_of(run_dir)
    real_train_steps = engine.train_steps

    def stopped_at_first_step(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # noted; the loop stops after the first step
        return real_train_steps(*args, **kwargs)

    monkeypatch.setattr(engine, "train_steps", stopped_at_first_step)
    with pytest.raises(StoppedBySignal):
        engine.train(parse_train_args(train_flags(colour_dataset, run_dir, "--overwrite_output_dir", "--seed", "1")))
    assert f"the run this one replaces is kept in {run_dir / '.replaced_run'}" in capsys.readouterr().err
    assert files_of(run_dir / ".replaced_run") == before
    monkeypatch.undo()
    engine.train(parse_train_args(["--output_dir", str(run_dir), "--resume_from_checkpoint", "latest"]))
    assert not (run_dir / ".replaced_run").exists()
    assert json.loads((run_dir / "train_config.json").read_text())["seed"] == 1


@pytest.mark.parametrize(
    ("flags", "differences"),
    [
        ("--batch_size 32", "--batch_size 64 (asked: 32)"),
        ("--epochs 3 --learning_rate 0.1", "--epochs 1 (asked: 3); --learning_rate 0.05 (asked: 0.1)"),
        ("--max_train_samples 128", "--max_train_samples null (asked: 128)"),
        ("--mixed_precision bf16", '--mixed_precision "no" (asked: "bf16")'),
        ("--recipe bn_cnn", '--recipe null (asked: "bn_cnn")'),  # and every setting the recipe changes
    ],
)
def test_a_resume_refuses_each_setting_that_would_change_the_run(finished_run, flags, differences):
    argv = ["--output_dir", str(finished_run), "--resume_from_checkpoint", "latest", *flags.split()]
    with pytest.raises(UserError) as refused:
        parse_train_args(argv)
    assert str(refused.value).startswith(f"checkpoint {finished_run}/checkpoints/step_4 continues a run trained with")
    assert differences in str(refused.value)
    assert str(refused.value).endswith("a resume restores every setting, so drop these flags, or start a new run "
                                       "in another --output_dir")  # fmt: skip


def test_a_resume_restores_every_setting_and_allows_what_does_not_change_the_result(finished_run, colour_dataset):
    saved = json.loads((finished_run / "train_config.json").read_text())
    saved.update(image_column=None, label_column=None)  # recorded there as detected; detected again on resume
    checkpoint = finished_run / "checkpoints" / "step_4"
    restored = parse_train_args(["--resume_from_checkpoint", str(checkpoint)]).to_dict()  # no --output_dir either
    assert restored == {**{name: saved[name] for name in restored}, "resume_from_checkpoint": str(checkpoint)}
    allowed = "--num_workers 1 --report_to tensorboard --checkpointing_steps 2 --checkpoints_total_limit 1"
    changed = parse_train_args(["--resume_from_checkpoint", str(checkpoint), *FLAGS.split(), *allowed.split()])
    assert (changed.num_workers, changed.report_to, changed.checkpointing_steps) == (1, "tensorboard", "2")
    assert changed.output_dir == str(finished_run) and changed.dataset == str(colour_dataset)


def test_a_checkpoint_of_one_process_is_refused_under_two_with_the_command_that_resumes_it(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = files_of(run_dir)
    launch = ("--multi_gpu", "--num_processes", "2", "--main_process_port", "29671", "--mixed_precision", "no")
    result = run_command(accelerate_launch(*launch, "train.py", "--output_dir", str(run_dir),
                                           "--resume_from_checkpoint", "latest"))  # fmt: skip
    checkpoint = run_dir / "checkpoints" / "step_4"
    expected = (
        f"error: checkpoint {checkpoint} was trained by 1 process(es), not 2; "
        f"resume with: accelerate launch train.py --resume_from_checkpoint {checkpoint}"
    )
    # Both processes refuse; their lines can interleave on the shared stderr, so look for the message itself.
    assert expected in result.stderr, result.stderr[-3000:]
    assert files_of(run_dir) == before


@pytest.mark.slow  # two trainings at once, one paused while the other is refused
def test_two_runs_on_one_folder_the_second_is_refused_naming_the_first(colour_dataset, tmp_path):
    run_dir = tmp_path / "run"
    first_command = [sys.executable, "train.py", *train_flags(colour_dataset, run_dir, "--epochs", "2")]
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(first_command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (run_dir / "train_config.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused, holding the folder, while the others try
    for extra in ((), ("--overwrite_output_dir",)):
        second = run_command([sys.executable, "train.py", *train_flags(colour_dataset, run_dir, *extra)])
        assert second.returncode == 2, second.stderr[-3000:]
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: --output_dir {run_dir} is in use by another run (pid {first.pid} on ")
        ), second.stderr[-3000:]
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # the first run, untouched


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs: room for the run's records, not for its 23 MB model; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip() or 'not permitted'})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(colour_dataset, small_disk):
    run_dir = small_disk / "run"
    command = [sys.executable, "train.py", *train_flags(colour_dataset, run_dir, "--checkpointing_steps", "1")]
    result = run_command(command)
    assert result.returncode == 74, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run_dir}/") and last.endswith(": No space left on device"), last
    assert "Traceback" not in result.stderr
    leftovers = [path.name for path in small_disk.rglob("*") if ".tmp" in path.name or "incomplete" in path.name]
    assert leftovers == []


def test_a_read_only_or_file_output_folder_is_refused_before_anything_runs(colour_dataset, small_disk, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run_command([sys.executable, "train.py", *train_flags(colour_dataset, small_disk / "run")])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --output_dir {small_disk}/run cannot be created: {small_disk} is not writable (read-only file system)"
    )


def test_a_new_run_that_fails_in_its_first_epoch_leaves_no_run_behind(colour_dataset, tmp_path):
    diverging = ("--learning_rate", "1e30", "--warmup_fraction", "0")
    with pytest.raises(UserError, match="training loss became nan or inf"):
        engine.train(parse_train_args(train_flags(colour_dataset, tmp_path / "run", *diverging)))
    assert [path.name for path in (tmp_path / "run").iterdir()] == [".lock"]  # the same command can run again


def test_a_checkpoint_copied_out_of_its_run_needs_the_folder_to_continue_in(finished_run, tmp_path):
    copy = tmp_path / "elsewhere" / "step_4"
    shutil.copytree(finished_run / "checkpoints" / "step_4", copy)
    with pytest.raises(UserError, match="is not in a run's checkpoints/ folder; name the folder the run continues in"):
        parse_train_args(["--resume_from_checkpoint", str(copy)])
    continued = tmp_path / "continued"
    config = parse_train_args(["--resume_from_checkpoint", str(copy), "--output_dir", str(continued)])
    assert config.output_dir == str(continued)
    # Its best epoch came before the checkpoint, in the first folder: the new one gets the model all the same.
    results = engine.train(config)
    assert results["final_metrics"] == json.loads((finished_run / "results.json").read_text())["final_metrics"]
    assert (continued / "best" / "model.safetensors").read_bytes() == (
        finished_run / "best" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("manifest lists no files", "its manifest.json does not list files with their size and sha256"),
        ("position edited, manifest forged", "its progress.json does not hold a run's position"),
    ],
)
def test_a_hand_edited_checkpoint_is_refused_in_one_line(finished_run, colour_dataset, tmp_path, damage, problem):
    from cifar_accel.checkpoint import write_manifest

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_4"
    if damage == "manifest lists no files":
        (checkpoint / "manifest.json").write_text('{"files": 5}')
    else:
        saved = json.loads((checkpoint / "progress.json").read_text())
        saved["progress"]["step_in_epoch"] = "abc"
        (checkpoint / "progress.json").write_text(json.dumps(saved))
        write_manifest(checkpoint)
    with pytest.raises(UserError, match=f"cannot resume from {checkpoint}: {problem}"):
        engine.train(parse_train_args(["--output_dir", str(run_dir), "--resume_from_checkpoint", str(checkpoint)]))


def test_an_empty_checkpoint_name_is_refused_not_taken_for_a_fresh_run(colour_dataset, tmp_path):
    with pytest.raises(
        UserError, match="--resume_from_checkpoint must be 'latest' or a checkpoint folder, got an empty"
    ):
        parse_train_args(train_flags(colour_dataset, tmp_path / "run", "--resume_from_checkpoint", ""))


def test_a_resume_follows_its_data_to_another_path_and_refuses_other_data(finished_run, colour_dataset, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    moved = tmp_path / "moved"
    shutil.copytree(colour_dataset, moved)
    resume = ["--output_dir", str(run_dir), "--resume_from_checkpoint", "latest", "--dataset"]
    results = engine.train(parse_train_args([*resume, str(moved)]))  # the finished run's last step, evaluated again
    assert results["final_metrics"] == json.loads((finished_run / "results.json").read_text())["final_metrics"]
    replace_column_values(moved, "train", "label", {0: 1})  # the same path, other examples
    with pytest.raises(UserError, match=f"--dataset {moved} does not hold the examples checkpoint .* was trained on"):
        engine.train(parse_train_args([*resume, str(moved)]))


def test_a_finished_run_is_replayed_exactly_from_its_folder(finished_run, tmp_path):
    replayed = tmp_path / "replayed"
    config = parse_train_args(["--config", str(finished_run), "--output_dir", str(replayed)])
    engine.train(config)
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (replayed / "metrics.jsonl").read_text().splitlines()]
    timings = ("seconds", "train_seconds", "data_wait_seconds", "compute_seconds", "eval_seconds", "images_per_second")
    assert [{k: v for k, v in r.items() if k not in timings} for r in again] == [
        {k: v for k, v in r.items() if k not in timings} for r in metrics
    ]
    assert (replayed / "best" / "model.safetensors").read_bytes() == (
        finished_run / "best" / "model.safetensors"
    ).read_bytes()
    # Flags still override what the file holds; the recorded run's folder is refused, not overwritten.
    assert parse_train_args(["--config", str(finished_run / "train_config.json"), "--epochs", "2"]).epochs == 2
    with pytest.raises(UserError, match="already holds a run"):
        engine.train(parse_train_args(["--config", str(finished_run)]))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "/no/such/run"], "--config /no/such/run: no such file; give a run folder"),
        (["--config", "airbench94"], "--config airbench94: no such file"),
        (["--config", "{run}", "--recipe", "airbench94"], "--config and --recipe both set the starting settings"),
        (["--config", "{run}/metrics.jsonl"], "--config .*/metrics.jsonl sets unknown settings: compute_seconds"),
        (["--config", "{run}/best/model.safetensors"], "--config '.*model.safetensors' is not valid YAML"),
    ],
)
def test_a_config_that_cannot_be_replayed_is_refused_in_one_line(finished_run, argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args([arg.format(run=finished_run) for arg in argv])


def test_max_train_steps_trains_that_many_updates_and_records_the_epochs_they_make(colour_dataset, tmp_path):
    # 256 images in batches of 64: 4 updates an epoch, so 6 updates are an epoch and a half.
    results = engine.train(parse_train_args(train_flags(colour_dataset, tmp_path / "run", "--max_train_steps", "6")))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["train_examples"] for record in records] == [256, 128]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["epochs"] == 1.5
    assert results["best_metrics"]["epoch"] == results["best_epoch"]


def test_a_run_stopped_before_its_first_checkpoint_is_refused_without_advice_to_resume_it(colour_dataset, tmp_path):
    """A launcher's SIGKILL can end a run before its first checkpoint is complete: only replacing it is possible."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".incomplete-step_1").mkdir(parents=True)
    (run_dir / "train_config.json").write_text("{}")
    with pytest.raises(UserError) as refused:
        engine.train(parse_train_args(train_flags(colour_dataset, run_dir)))
    assert "pass --overwrite_output_dir to replace it (it has no complete checkpoint to continue from)" in str(
        refused.value
    )
    assert "--resume_from_checkpoint" not in str(refused.value)
