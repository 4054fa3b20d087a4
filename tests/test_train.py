"""End to end through ``accelerate launch``, as a user runs it: one process, then two (gloo)."""

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import accelerate_launch, cifar_accel_command, run_command, write_hub_layout
from huggingface_hub import ModelCard

TRAIN_FLAGS = "--model bn_cnn --epochs 3 --batch_size 32 --learning_rate 0.05 --label_smoothing 0 --num_workers 1"
TWO_CPU_PROCESSES = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def single_process_run(colour_dataset, tmp_path_factory) -> Path:
    """Three epochs with 40 training images held out (stratified) to choose the best epoch, logged to tensorboard."""
    run_dir = tmp_path_factory.mktemp("run")
    flags = (
        f"--dataset {colour_dataset} --output_dir {run_dir} --validation_size 40 {TRAIN_FLAGS} --report_to tensorboard"
    )
    result = run_command(accelerate_launch("--config_file", "accelerate_config.yaml", "train.py", *flags.split()))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_run_folder_holds_config_metrics_best_model_and_results(single_process_run):
    config = json.loads((single_process_run / "train_config.json").read_text())
    assert config["model"] == "bn_cnn" and config["epochs"] == 3 and config["num_processes"] == 1
    assert config["num_train_examples"] == 216 and config["selection_split"] == "validation"
    assert config["class_names"] == ["red", "green", "blue", "yellow"] and len(config["mean"]) == 3
    metrics = _metrics(single_process_run)
    assert [record["epoch"] for record in metrics] == [1, 2, 3]
    fields = {"train_loss", "train_acc", "eval_loss", "eval_top1", "eval_top3", "eval_top5", "lr", "images_per_second"}
    assert fields <= set(metrics[0])
    assert {(record["eval_split"], record["eval_n"], record["train_examples"]) for record in metrics} == {
        ("validation", 40, 216)
    }
    saved = json.loads((single_process_run / "best" / "config.json").read_text())
    assert saved["architecture"] == "bn_cnn" and saved["class_names"] == config["class_names"]
    assert saved["mean"] == config["mean"] and saved["std"] == config["std"]
    assert (single_process_run / "best" / "model.safetensors").stat().st_size > 1_000_000
    results = _results(single_process_run)
    assert results["selected_by"] == "validation"
    assert results["best_metrics"]["eval_top1"] == max(record["eval_top1"] for record in metrics)
    final = results["final_metrics"]  # the chosen model on the untouched test split
    assert final["split"] == "test" and final["n"] == 101
    assert final["top1"] <= final["top3"] <= final["top5"]
    confusion = final["confusion_matrix"]
    assert sum(map(sum, confusion)) == 101 and [sum(row) for row in confusion] == [26, 25, 25, 25]
    assert final["top1"] == pytest.approx(sum(confusion[i][i] for i in range(4)) / 101)
    assert list(final["per_class_top1"]) == config["class_names"]
    assert final["per_class_top1"]["red"] == pytest.approx(confusion[0][0] / 26)


def test_summary_csv_has_one_row_per_epoch_with_the_metrics_jsonl_values(single_process_run):
    with open(single_process_run / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    records = _metrics(single_process_run)
    assert len(rows) == len(records) == 3 and list(rows[0]) == list(records[0])
    for row, record in zip(rows, records, strict=True):
        assert row["eval_split"] == record["eval_split"]
        assert float(row["eval_top1"]) == record["eval_top1"] and float(row["train_loss"]) == record["train_loss"]


def test_results_break_the_time_down_by_phase_and_epoch(single_process_run):
    timing, records = _results(single_process_run)["timing"], _metrics(single_process_run)
    assert timing["epoch_seconds"] == [record["seconds"] for record in records]
    for record in records:
        assert 0 < record["data_wait_seconds"] < record["train_seconds"] < record["seconds"]
        assert record["data_wait_seconds"] + record["compute_seconds"] == pytest.approx(record["train_seconds"])
        assert record["train_seconds"] + record["eval_seconds"] <= record["seconds"]
    assert timing["data_wait_seconds"] == pytest.approx(sum(record["data_wait_seconds"] for record in records))
    assert timing["images_per_second"] == pytest.approx(3 * 216 / sum(record["train_seconds"] for record in records))
    assert timing["data_loading_seconds"] + timing["speed_run_seconds"] < timing["total_seconds"]
    assert 100 < timing["peak_host_memory_mb"] < 20_000 and timing["peak_device_memory_mb"] is None  # CPU only


def test_tensorboard_logs_every_epoch_and_the_final_metrics(single_process_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(single_process_run / "logs" / "cifar_accel"))
    events.Reload()
    records = _metrics(single_process_run)
    for name in ("eval_top1", "train_loss", "lr", "data_wait_seconds"):
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert logged == [(record["epoch"], pytest.approx(record[name], rel=1e-6)) for record in records]
    [(step, top3)] = [(event.step, event.value) for event in events.Scalars("final_top3")]
    assert step == 3 and top3 == pytest.approx(_results(single_process_run)["final_metrics"]["top3"])


def test_run_folder_has_plots_and_a_model_card_matching_the_results(single_process_run):
    for name in ("curves.png", "confusion_matrix.png"):
        assert (single_process_run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard.load(single_process_run / "best" / "README.md")
    final = _results(single_process_run)["final_metrics"]
    assert card.data.eval_results is None and card.data.library_name == "cifar-accel"  # a local copy: no Hub dataset
    # A validation hold-out chose the epoch, so the test figure is not the one that chose: no caveat.
    assert f"{final['top1']:.2%} top-1 on {final['n']} images of its `test` split." in card.text
    assert "![Training curves](../plots/curves.png)" in card.text
    assert "![Confusion matrix](../plots/confusion_matrix.png)" in card.text


def test_short_training_beats_chance_by_a_wide_margin(single_process_run):
    assert _results(single_process_run)["final_metrics"]["top1"] >= 0.8  # chance is 0.25


def _evaluate_command(model_dir: Path, dataset: Path) -> dict:
    flags = ["--dataset", str(dataset), "--batch_size", "16", "--num_workers", "0"]
    result = run_command(cifar_accel_command("evaluate", "--model", str(model_dir), *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_evaluate_library_numbers_equal_the_loops_on_the_chosen_model(single_process_run, colour_dataset):
    """results.json's accuracies come from the `evaluate` metric module; `cifar-accel evaluate` runs the loop's."""
    metrics = _evaluate_command(single_process_run / "best", colour_dataset)
    expected = _results(single_process_run)["final_metrics"]
    assert metrics["n"] == 101
    assert [metrics[name] for name in ("top1", "top3", "top5")] == [expected[name] for name in ("top1", "top3", "top5")]
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_compare_tables_two_runs_and_draws_their_curves(single_process_run, colour_dataset, tmp_path):
    second = tmp_path / "second"
    flags = f"train.py --dataset {colour_dataset} --output_dir {second} --recipe simple_cnn --epochs 1 --num_workers 0"
    assert run_command([sys.executable, *flags.split()]).returncode == 0
    result = run_command(
        cifar_accel_command("compare", str(single_process_run), str(second), "--plot", str(tmp_path / "c.png"))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header, first_row, second_row, drawn = result.stdout.strip().splitlines()
    assert header.split() == [
        "run",
        "model",
        "recipe",
        "chosen",
        "on",
        "epochs",
        "best",
        "top-1",
        "top-5",
        "seconds",
        "images/s",
    ]
    best = _results(single_process_run)["best_metrics"]
    assert first_row.split()[:7] == [str(single_process_run), "bn_cnn", "-", "validation", "3",
                                     f"{best['eval_top1']:.2%}", f"{best['eval_top5']:.2%}"]  # fmt: skip
    assert second_row.split()[:5] == [str(second), "simple_cnn", "simple_cnn", "test", "1"]
    assert drawn == f"curves of 2 runs drawn to {tmp_path / 'c.png'}"
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize(("data_loader", "port"), [("torch", 29611), ("device", 29613)])
def test_two_cpu_processes_split_training_and_evaluate_exactly(colour_dataset, tmp_path, data_loader, port):
    flags = f"--dataset {colour_dataset} --output_dir {tmp_path} {TRAIN_FLAGS} --epochs 1 --batch_size 16"
    launch = f"{TWO_CPU_PROCESSES} --main_process_port {port} train.py {flags} --data_loader {data_loader}"
    result = run_command(accelerate_launch(*launch.split()), env={"CIFAR_ACCEL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert config["num_processes"] == 2 and config["global_batch_size"] == 32
    [record] = _metrics(tmp_path)
    assert record["eval_n"] == 101  # 101 = 2 x 50 + 1: the padded duplicate is not counted
    assert record["train_examples"] == 256  # 256 = 8 steps x 2 processes x 16
    final = _results(tmp_path)["final_metrics"]
    assert final["n"] == 101 and sum(map(sum, final["confusion_matrix"])) == 101
    # The saved model evaluated again on both ranks, scored by the `evaluate` module: equal to the loop's numbers.
    assert [final[name] for name in ("top1", "top3", "top5")] == [record[f"eval_{n}"] for n in ("top1", "top3", "top5")]


@pytest.mark.slow
@pytest.mark.parametrize(("data_loader", "port"), [("torch", 29612), ("device", 29614)])
def test_each_training_example_is_seen_once_per_epoch_across_ranks(tmp_path, data_loader, port):
    names = [f"c{i}" for i in range(64)]
    dataset = write_hub_layout(tmp_path / "unique", {"train": 64, "test": 8}, names, unique_labels=True)
    output = tmp_path / "ranks"
    output.mkdir()
    launch = f"{TWO_CPU_PROCESSES} --main_process_port {port} tests/shard_probe.py {dataset} {output} 8 {data_loader}"
    result = run_command(accelerate_launch(*launch.split()), env={"CIFAR_ACCEL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["num_processes"] for report in ranks] == [2, 2]
    for epoch in range(2):
        seen = [report["epochs"][epoch] for report in ranks]
        assert len(seen[0]) == len(seen[1]) == 32
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(64))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled every epoch


def test_airbench94_recipe_trains_with_the_device_loader_and_every_trick(colour_dataset, tmp_path):
    """Whitening init, BatchNorm-bias lr scale, lookahead, alternating flip, channels_last and TTA together."""
    command = f"train.py --recipe airbench94 --dataset {colour_dataset} --output_dir {tmp_path} --epochs 2"
    result = run_command([sys.executable, *command.split(), "--batch_size", "32", "--channels_last"],
                         env={"CIFAR_ACCEL_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert (config["recipe"], config["model"], config["data_loader"], config["lookahead"]) == (
        "airbench94", "airbench94", "device", True
    )  # fmt: skip
    assert config["epochs"] == 2 and config["bias_lr_scale"] == 64.0  # flag over recipe; recipe over default
    results = _results(tmp_path)
    assert results["tta_level"] == 2 and results["tta_metrics"]["n"] == 101
    assert results["tta_metrics"]["top1"] >= 0.6  # chance is 0.25
    evaluated = _evaluate_command(tmp_path / "best", colour_dataset)  # the card's numbers, from the device loader run
    assert evaluated["top1"] == results["final_metrics"]["top1"]
    assert evaluated["loss"] == pytest.approx(results["final_metrics"]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, r"--batch_size must be 1 to 2\^31, got 0"),
        ({"cutmix": 1e-300}, "--cutmix must be at least"),
        ({"push_to_hub": True}, "--push_to_hub needs --hub_model_id"),
        ({"model_args": {"widths": 5}}, "--model_args .*model 'resnet9' does not take widths"),  # preflight
        ({"push_to_hub": True, "hub_model_id": "no-owner"}, "--hub_model_id must be USER/NAME"),
    ],
)
def test_train_from_python_refuses_what_the_command_line_refuses_before_writing(
    colour_dataset, tmp_path, settings, message
):
    from cifar_accel import engine
    from cifar_accel.config import TrainConfig
    from cifar_accel.errors import UserError

    config = TrainConfig(dataset=str(colour_dataset), output_dir=str(tmp_path / "run"), **settings)
    with pytest.raises(UserError, match=message) as refused:
        engine.train(config)
    assert "\n" not in str(refused.value)  # one line
    assert not (tmp_path / "run").exists()
