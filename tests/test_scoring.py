"""The `evaluate` metric module shipped in the package: loads offline and agrees exactly with the loop."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import cifar_accel_command, run_command, write_hub_layout
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cifar_accel.loop import evaluate
from cifar_accel.scoring import load_top_k_accuracy, score_predictions


def test_metric_module_loads_from_the_package_without_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_top_k_accuracy()
    scores = metric.compute(predictions=[[2, 0, 1], [1, 2, 0], [0, 1, 2]], references=[2, 2, 0], num_classes=3)
    assert (scores["top1"], scores["top3"]) == (2 / 3, 1.0)
    assert scores["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert scores["per_class_top1"] == [1.0, None, 0.5]  # a class without examples is not scored: not 0, not nan


@pytest.mark.parametrize("num_classes", [10, 4])  # 4 classes: top-5 ranks only four
def test_scores_equal_the_training_loops_numbers_exactly(num_classes):
    """The logits are the 'images' of an identity model, so the loop ranks exactly these scores."""
    generator = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(997, num_classes, generator=generator)
    labels = torch.randint(0, num_classes, (997,), generator=generator)
    loader = DataLoader(TensorDataset(logits, labels), batch_size=64)
    loop = evaluate(nn.Identity(), loader, Accelerator(cpu=True), keep_predictions=True)
    names = [f"class{index}" for index in range(num_classes)]
    scores = score_predictions(loop["ranked_predictions"], loop["labels"], names)
    assert [scores[name] for name in ("top1", "top3", "top5")] == [loop[name] for name in ("top1", "top3", "top5")]
    predicted = logits.argmax(dim=1).numpy()
    expected = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(expected, (labels.numpy(), predicted), 1)
    assert scores["confusion_matrix"] == expected.tolist()
    assert scores["per_class_top1"]["class1"] == expected[1, 1] / expected[1].sum()
    assert scores["top1"] == (predicted == labels.numpy()).mean()


def test_a_class_absent_from_the_evaluated_split_is_reported_as_not_evaluated(tmp_path):
    """The 3 test images are red, green and blue: yellow, a class of the model, has no example to score."""
    dataset = write_hub_layout(tmp_path / "colours", {"train": 64, "test": 3}, ["red", "green", "blue", "yellow"])
    flags = f"--dataset {dataset} --output_dir {tmp_path / 'run'} --model simple_cnn --epochs 1 --num_workers 0"
    result = run_command(cifar_accel_command("train", *flags.split()))
    assert result.returncode == 0, result.stderr[-3000:]
    per_class = json.loads((tmp_path / "run" / "results.json").read_text())["final_metrics"]["per_class_top1"]
    assert per_class["yellow"] is None
    assert all(isinstance(per_class[name], float) for name in ("red", "green", "blue"))
    card = (tmp_path / "run" / "best" / "README.md").read_text()
    assert "| yellow | n/a |" in card and "| red | " in card
