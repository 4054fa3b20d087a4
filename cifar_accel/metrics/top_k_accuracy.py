"""Top-k accuracy, per-class top-1 and the confusion matrix, as an ``evaluate`` metric module.

Shipped inside cifar_accel so that ``evaluate.load`` reads it from disk: the Hub's
``evaluate.load("accuracy")`` needs the network and gives top-1 only. Load it with
``cifar_accel.scoring.load_top_k_accuracy()`` (or ``evaluate.load(<path of this file>)``).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy of ranked class predictions: an example counts as correct at k when its label is
among its first k predicted classes. Also returns each class's top-1 accuracy and the confusion
matrix of the first-ranked predictions (rows: true class, columns: predicted class).
"""

_INPUTS = """
Args:
    predictions (`list` of `list` of `int`): class ids per example, most likely first
        (at least as many as the largest k; fewer only when there are fewer classes).
    references (`list` of `int`): the true class id of each example.
    num_classes (`int`): number of classes: the size of the confusion matrix.
    k (`list` of `int`, default [1, 3, 5]): the k values to report.
Returns:
    `top{k}` for each k (`float`), `per_class_top1` (`list` of `float`; `None` for a class with no
    examples, which was not evaluated), `confusion_matrix` (`list` of `list` of `int`).
Example:
    >>> metric = evaluate.load("cifar_accel/metrics/top_k_accuracy.py")
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[2, 2], num_classes=3, k=[1, 2])["top2"]
    1.0
"""


class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes: int, k=(1, 3, 5)) -> dict:
        ranked = np.asarray(predictions, dtype=np.int64).reshape(len(references), -1)
        labels = np.asarray(references, dtype=np.int64)
        hits = ranked == labels[:, None]
        # Python int / int: the correctly rounded quotient, as a float64 sum of hits divided by the count.
        scores = {f"top{value}": int(hits[:, :value].any(axis=1).sum()) / len(labels) for value in k}
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusion, (labels, ranked[:, 0]), 1)
        # A class without examples has no accuracy: None (JSON null), where 0.0 would claim every one was wrong.
        per_class = [int(confusion[c, c]) / int(row) if row else None for c, row in enumerate(confusion.sum(axis=1))]
        return {**scores, "per_class_top1": per_class, "confusion_matrix": confusion.tolist()}
