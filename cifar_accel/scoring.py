"""A run's final metrics through the ``evaluate`` library, from the metric module shipped in the package."""

from pathlib import Path

import torch

TOP_K_ACCURACY = Path(__file__).parent / "metrics" / "top_k_accuracy.py"
REPORTED_K = (1, 3, 5)
TOP_K_NAMES = tuple(f"top{k}" for k in REPORTED_K)  # the keys score_predictions returns for them


def load_top_k_accuracy():
    """The ``evaluate`` metric of ``metrics/top_k_accuracy.py``, read from disk: no network needed."""
    import evaluate  # about 0.8 s: imported only when the final metrics are computed

    return evaluate.load(str(TOP_K_ACCURACY), keep_in_memory=True)


def score_predictions(ranked_predictions: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """top1/top3/top5, per-class top-1 (by class name; None for a class with no examples among ``labels``) and
    the confusion matrix of ranked predictions."""
    scores = load_top_k_accuracy().compute(
        predictions=ranked_predictions.cpu().tolist(),
        references=labels.cpu().tolist(),
        num_classes=len(class_names),
        k=list(REPORTED_K),
    )
    scores["per_class_top1"] = dict(zip(class_names, scores["per_class_top1"], strict=True))
    return scores
