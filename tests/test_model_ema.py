"""``--model_ema``: the moving average is evaluated beside the weights every epoch, the better of the two
is the model saved, and the run folder says which."""

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cifar_accel import engine, final
from cifar_accel.settings import parse_train_args
from cifar_accel.tricks import ModelEma

FLAGS = ["--model", "bn_cnn", "--max_train_samples", "64", "--batch_size", "32", "--epochs", "2",
         "--learning_rate", "0.05", "--num_workers", "0", "--model_ema", "0.9"]  # fmt: skip


def average_of(ema: ModelEma) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in ema.state_dict().items() if name != "updates"}


def train_run(dataset: Path, output_dir: Path, *flags: str) -> dict:
    return engine.train(parse_train_args(["--dataset", str(dataset), "--output_dir", str(output_dir), *flags]))


def test_the_average_when_it_scores_higher_is_the_model_saved(colour_dataset, tmp_path, monkeypatch):
    averages_evaluated, inside_average = [], []
    real_swapped_in, real_evaluate = ModelEma.swapped_in, engine.evaluate

    @contextlib.contextmanager
    def swapped_in(self):  # notes the average each time it is evaluated
        averages_evaluated.append(average_of(self))
        with real_swapped_in(self):
            inside_average.append(True)
            yield
            inside_average.pop()

    def evaluate(model, loader, accelerator, tta_level=0, keep_predictions=False):
        metrics = real_evaluate(model, loader, accelerator, tta_level, keep_predictions)
        # An epoch's evaluation of the raw weights scores 0 here, so the average is the better one.
        return metrics if keep_predictions or inside_average else {**metrics, "top1": 0.0}

    run_dir = tmp_path / "run"
    monkeypatch.setattr(ModelEma, "swapped_in", swapped_in)
    monkeypatch.setattr(engine, "evaluate", evaluate)  # the epochs' evaluations
    monkeypatch.setattr(final, "evaluate", evaluate)  # the final one
    results = train_run(colour_dataset, run_dir, *FLAGS)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["selected_weights"] for record in records] == ["ema", "ema"]
    assert all(record["eval_top1"] == 0.0 < record["ema_eval_top1"] for record in records)
    assert results["selected_weights"] == "ema" and results["best_metrics"]["selected_weights"] == "ema"
    saved = load_file(run_dir / "best" / "model.safetensors")
    chosen = averages_evaluated[results["best_epoch"] - 1]
    assert all(torch.equal(saved[name], chosen[name]) for name in chosen)
    # Evaluated afresh, the saved model scores what its epoch's evaluation of the average did.
    assert results["final_metrics"]["top1"] == results["best_metrics"]["ema_eval_top1"]
    assert "moving average of the trained weights" in (run_dir / "best" / "README.md").read_text()


def test_with_nothing_evaluated_until_the_end_the_average_is_kept(colour_dataset, tmp_path, monkeypatch):
    finished = []
    real_finish = ModelEma.finish

    def finish(self):
        finished.append(average_of(self))
        real_finish(self)

    monkeypatch.setattr(ModelEma, "finish", finish)
    results = train_run(colour_dataset, tmp_path / "run", *FLAGS, "--eval_strategy", "no")
    assert results["selected_weights"] == "ema" and results["selected_by"] == "last"
    saved = load_file(tmp_path / "run" / "best" / "model.safetensors")
    [average] = finished
    assert all(torch.equal(saved[name], average[name]) for name in average)
