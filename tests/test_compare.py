"""``cifar-accel compare`` over groups of seeds, on run folders written here without training: the three records a
finished run leaves (train_config.json, results.json, metrics.jsonl) with accuracies chosen by each test."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest
from conftest import cifar_accel_command, run_command
from PIL import Image

from cifar_accel.cli import compare_main
from cifar_accel.compare import load_runs
from cifar_accel.compare_groups import NOT_GROUPED, group_runs
from cifar_accel.config import TrainConfig
from cifar_accel.run_files import RUN_RECORD_ONLY
from cifar_accel.settings import NOT_REPLAYED

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Two settings 1.5 points apart with seeds 0.1 points apart, and two whose seeds overlap.
APART = {0.2: [0.801, 0.803, 0.802, 0.800], 0.4: [0.816, 0.818, 0.817, 0.815]}
OVERLAPPING = {0.2: [0.801, 0.812, 0.795, 0.808], 0.4: [0.806, 0.799, 0.811, 0.803]}


def write_run(folder: Path, seed: int, top1: float, final_top1: float | None = None, **settings) -> Path:
    """A finished run's records: the settings as ``train`` writes them (every flag, then what the run derived), the
    best epoch's and the final evaluation's top-1, and two epochs of curves. What only records where and how the run
    went (seed, folder, device, workers, checkpoints, trackers) differs from seed to seed, as it may in real runs."""
    folder.mkdir(parents=True)
    config = {
        **TrainConfig(
            model="bn_cnn", epochs=2, seed=seed, output_dir=str(folder), num_workers=seed % 2, report_to="none"
        ).to_dict(),
        "checkpointing_steps": "epoch" if seed % 2 else None,
        "num_processes": 1,
        "global_batch_size": 512,
        "num_train_examples": 50000,
        "num_eval_examples": 10000,
        "dataset_fingerprint": "0123abcd",
        "environment": {"torch": "2.9.0", "device": f"GPU {seed}"},
        **settings,
    }
    final = top1 if final_top1 is None else final_top1
    results = {
        "selected_by": "test",
        "best_epoch": 2,
        "best_metrics": {"epoch": 2, "eval_top1": top1, "eval_top5": 0.99},
        "final_metrics": {"split": "test", "n": 10000, "loss": 0.6, "top1": final, "top3": 0.97, "top5": 0.99},
        "timing": {"total_seconds": 20.0 + seed, "speed_run_seconds": 10.0 + seed, "images_per_second": 5000.0},
    }
    records = [
        {"epoch": epoch, "train_loss": 1 / epoch, "eval_split": "test", "eval_loss": 1.2 / epoch, "eval_top1": top1}
        for epoch in (1, 2)
    ]
    (folder / "train_config.json").write_text(json.dumps(config))
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def write_groups(root: Path, accuracies: dict[float, list[float]]) -> list[Path]:
    """One run per learning rate and seed, in root/lr_X/seed_N, as `train --output_dir` would leave them."""
    return [
        write_run(root / f"lr_{rate}" / f"seed_{seed}", seed, top1, learning_rate=rate)
        for rate, values in accuracies.items()
        for seed, top1 in enumerate(values)
    ]


def compare(capsys, *argv: str | Path) -> list[str]:
    """``cifar-accel compare`` in this process (the console script's entry point): its stdout lines."""
    compare_main([str(arg) for arg in argv])
    return capsys.readouterr().out.splitlines()


def cells(row: str) -> list[str]:
    """A text table's row, split where columns are (two spaces or more; a cell holds single spaces)."""
    return re.split(r" {2,}", row.strip())


def mean_and_se(values: list[float]) -> str:
    """The table's cell, computed here with the standard library rather than run_statistics."""
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{100 * statistics.mean(values):.2f}% ± {100 * se:.2f}"


def test_grouped_table_shows_each_groups_mean_and_standard_error(tmp_path, capsys):
    final = {0.2: [0.790, 0.794, 0.793, 0.789], 0.4: [0.811, 0.812, 0.806, 0.809]}
    for rate, values in APART.items():
        for seed, top1 in enumerate(values):
            write_run(tmp_path / f"lr_{rate}_seed_{seed}", seed, top1, final[rate][seed], learning_rate=rate)
    header, *rows, blank, test = compare(capsys, *sorted(tmp_path.iterdir()))
    assert cells(header) == ["group", "model", "recipe", "n", "best top-1", "final top-1", "seconds"]
    assert blank == ""
    assert len(rows) == 2
    seconds = statistics.mean(10.0 + seed for seed in range(4))
    for row, rate in zip(rows, APART, strict=True):
        assert cells(row) == [f"learning_rate={rate}", "bn_cnn", "-", "4", mean_and_se(APART[rate]),
                              mean_and_se(final[rate]), f"{seconds:,.0f}"]  # fmt: skip
    difference = 100 * (statistics.mean(final[0.4]) - statistics.mean(final[0.2]))
    assert test.startswith(f"learning_rate=0.4 vs learning_rate=0.2: final top-1 {difference:+.2f} points (Welch t=")
    assert test.endswith("): exceeds its noise")


def test_runs_group_by_their_settings_but_not_by_seed_or_where_they_ran(tmp_path):
    run_dirs = write_groups(tmp_path, APART)
    run_dirs += [
        write_run(tmp_path / "adamw", 0, 0.7, optimizer="adamw"),
        write_run(tmp_path / "float_epochs", 9, 0.8, learning_rate=0.2, epochs=2.0),  # a recipe's "epochs: 2.0"
    ]
    groups = group_runs(load_runs(run_dirs))
    assert [group.name for group in groups] == [
        "learning_rate=0.2 optimizer=sgd",
        "learning_rate=0.4 optimizer=sgd",
        "learning_rate=0.4 optimizer=adamw",
    ]
    assert [len(group.runs) for group in groups] == [5, 4, 1]
    assert [run.settings["seed"] for run in groups[1].runs] == [0, 1, 2, 3]
    assert "seed" not in groups[0].settings and "environment" not in groups[0].settings


def test_the_excluded_settings_cover_what_a_replay_drops():
    assert set(RUN_RECORD_ONLY) | set(NOT_REPLAYED) <= set(NOT_GROUPED)
    assert {"seed", "seeds", "output_dir", "num_workers", "report_to", "checkpointing_steps"} <= set(NOT_GROUPED)


@pytest.mark.parametrize(
    ("accuracies", "verdict"), [(APART, "exceeds its noise"), (OVERLAPPING, "within its noise (p >= 0.05)")]
)
def test_welch_tells_a_difference_from_the_noise_of_the_seeds(tmp_path, capsys, accuracies, verdict):
    *_, test = compare(capsys, *write_groups(tmp_path, accuracies))
    difference = 100 * (statistics.mean(accuracies[0.4]) - statistics.mean(accuracies[0.2]))
    assert test.startswith(f"learning_rate=0.4 vs learning_rate=0.2: final top-1 {difference:+.2f} points (Welch t=")
    assert test.endswith(f"): {verdict}")


def test_a_group_of_one_run_cannot_be_tested(tmp_path, capsys):
    *_, test = compare(capsys, *write_groups(tmp_path, {0.2: APART[0.2], 0.4: APART[0.4][:1]}))
    assert test.endswith("; no test possible: learning_rate=0.4 has fewer than 2 runs")


def test_plot_draws_the_curves_and_a_strip_plot_of_the_groups(tmp_path, capsys):
    plot = tmp_path / "figures" / "compare.png"
    *_, curves, strips = compare(capsys, *write_groups(tmp_path / "runs", APART), "--plot", plot)
    assert curves == f"curves of 8 runs drawn to {plot}"
    assert strips == f"accuracies of 2 groups (8 runs) drawn to {plot.with_name('compare_groups.png')}"
    for path in (plot, plot.with_name("compare_groups.png")):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()


def test_a_seeds_folder_expands_to_its_seed_runs(tmp_path, capsys):
    root = tmp_path / "seeds"
    values = APART[0.2][:3]
    runs = [{"seed": seed, "run_dir": f"seed_{seed}", "top1": top1} for seed, top1 in enumerate(values)]
    for run in runs:
        write_run(root / run["run_dir"], run["seed"], run["top1"])
    (root / "seeds.json").write_text(json.dumps({"seeds": [0, 1, 2], "finished": True, "runs": runs}))
    header, row = compare(capsys, root)
    assert cells(row) == [str(root), "bn_cnn", "-", "3", mean_and_se(values), mean_and_se(values), "11"]


def test_a_folder_of_runs_expands_to_the_finished_ones(tmp_path, capsys):
    root = tmp_path / "sweep"
    write_run(root / "trial_10", 10, 0.81, learning_rate=0.3)
    write_run(root / "trial_2", 2, 0.80, learning_rate=0.2)
    write_run(root / "trial_3", 3, 0.805, learning_rate=0.2)
    (root / "trial_4" / "checkpoints").mkdir(parents=True)  # a trial that never finished: not a run
    (root / "journal.log").write_text("{}\n")
    header, first, second, blank, test = compare(capsys, root)
    assert cells(first) == ["learning_rate=0.2", "bn_cnn", "-", "2", *[mean_and_se([0.80, 0.805])] * 2, "12"]
    assert cells(second) == ["learning_rate=0.3", "bn_cnn", "-", "1", "81.00%", "81.00%", "20"]
    assert test.endswith("no test possible: learning_rate=0.3 has fewer than 2 runs")


def test_one_run_per_setting_keeps_the_table_of_runs(tmp_path, capsys):
    first = write_run(tmp_path / "first", 0, 0.8123)
    second = write_run(tmp_path / "second", 0, 0.7, recipe="simple_cnn", model="simple_cnn", epochs=1)
    lines = compare(capsys, first, second)
    assert [line.split() for line in lines] == [
        ["run", "model", "recipe", "chosen", "on", "epochs", "best", "top-1", "top-5", "seconds", "images/s"],
        [str(first), "bn_cnn", "-", "test", "2", "81.23%", "99.00%", "10", "5,000"],
        [str(second), "simple_cnn", "simple_cnn", "test", "1", "70.00%", "99.00%", "10", "5,000"],
    ]


def test_per_run_and_markdown_tables_with_groups(tmp_path, capsys):
    run_dirs = write_groups(tmp_path, {0.2: APART[0.2][:2], 0.4: APART[0.4][:2]})
    per_run = compare(capsys, *run_dirs, "--per_run")
    assert per_run[0].split()[:2] == ["run", "model"] and len(per_run) == 1 + 4 + 2
    header, rule, *rows, blank, test = compare(capsys, *run_dirs, "--markdown")
    assert header == "| group | model | recipe | n | best top-1 | final top-1 | seconds |"
    assert rule == "|---|---|---|---|---|---|---|" and len(rows) == 2 and blank == ""
    assert rows[0].startswith(f"| learning_rate=0.2 | bn_cnn | - | 2 | {mean_and_se(APART[0.2][:2])} |")
    assert test.startswith("- learning_rate=0.4 vs learning_rate=0.2: final top-1 ")


def test_json_holds_the_groups_their_statistics_and_the_test(tmp_path, capsys):
    run_dirs = write_groups(tmp_path, APART)
    compare_main([*map(str, run_dirs), "--json"])
    data = json.loads(capsys.readouterr().out)  # all of stdout is the one object
    assert [(group["name"], group["n"]) for group in data["groups"]] == [
        ("learning_rate=0.2", 4),
        ("learning_rate=0.4", 4),
    ]
    for group, values in zip(data["groups"], APART.values(), strict=True):
        assert group["final_top1"]["mean"] == pytest.approx(statistics.mean(values))
        assert group["final_top1"]["se"] == pytest.approx(statistics.stdev(values) / 2)
        assert [run["seed"] for run in group["runs"]] == [0, 1, 2, 3]
    [test] = data["tests"]
    assert test["exceeds_noise"] is True and test["p_value"] < 0.05
    assert test["difference"] == pytest.approx(statistics.mean(APART[0.4]) - statistics.mean(APART[0.2]))


def test_a_folder_that_is_not_a_run_gets_one_line_through_the_command_line(tmp_path):
    run = write_run(tmp_path / "run", 0, 0.8)
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    result = run_command(cifar_accel_command("compare", str(run), str(tmp_path / "empty")))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'empty'} is not a finished run folder (missing train_config.json, results.json, "
        "metrics.jsonl)"
    ]
