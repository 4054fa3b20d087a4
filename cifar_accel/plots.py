"""Figures of a run, drawn headless with matplotlib's object API (no pyplot, no display needed)."""

from pathlib import Path

from cifar_accel.files import write_atomically


def plot_training_curves(records: list[dict], path: str | Path) -> None:
    """Loss, accuracy and learning rate per epoch, from ``metrics.jsonl``'s records."""
    # Imported here, by the main process at the end of a run: matplotlib adds about 0.6 s to every
    # process's start-up otherwise.
    from matplotlib.figure import Figure

    epochs = [record["epoch"] for record in records]
    evaluated = _evaluated(records)
    evaluated_epochs = [record["epoch"] for record in evaluated]
    split = evaluated[0]["eval_split"] if evaluated else "eval"
    figure = Figure(figsize=(13, 3.8), layout="constrained")
    loss_axes, accuracy_axes, rate_axes = figure.subplots(1, 3)
    loss_axes.plot(epochs, [record["train_loss"] for record in records], marker="o", label="train")
    loss_axes.plot(evaluated_epochs, [record["eval_loss"] for record in evaluated], marker="o", label=split)
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    accuracy_axes.plot(epochs, [100 * record["train_acc"] for record in records], marker="o", label="train top-1")
    for key, label in (("eval_top1", f"{split} top-1"), ("eval_top5", f"{split} top-5")):
        accuracy_axes.plot(evaluated_epochs, [100 * record[key] for record in evaluated], marker="o", label=label)
    accuracy_axes.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    rate_axes.plot(epochs, [record["lr"] for record in records], marker="o")
    rate_axes.set(title="Learning rate (at the start of each epoch)", xlabel="epoch", ylabel="learning rate")
    for axes in (loss_axes, accuracy_axes, rate_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    loss_axes.legend()
    accuracy_axes.legend()
    _save(figure, path)


def plot_confusion_matrix(confusion: list[list[int]], class_names: list[str], split: str, path: str | Path) -> None:
    """Counts and row-normalised rates side by side (rows: true class, columns: predicted class).

    Cells and axes are labelled up to 20 classes; beyond that (CIFAR-100) the axes show class indices.
    """
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    classes = len(class_names)
    side = min(max(6.0, 0.45 * classes), 12.0)  # 100 classes: 12-pixel cells, no labels
    figure = Figure(figsize=(2 * side + 1.5, side), layout="constrained")
    panels = (
        (counts, f"Confusion matrix on {split} ({counts.sum():,} images): counts", "d"),
        (rates, "Row-normalised: share of each true class", ".0%"),
    )
    for axes, (values, title, cell_format) in zip(figure.subplots(1, 2), panels, strict=True):
        image = axes.imshow(values, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=axes, shrink=0.8, format="{x:.0%}" if cell_format == ".0%" else None)
        axes.set(title=title, xlabel="predicted class", ylabel="true class")
        if classes <= 20:
            axes.set_xticks(range(classes), class_names, rotation=45, ha="right")
            axes.set_yticks(range(classes), class_names)
            threshold = values.max() / 2
            for row in range(classes):
                for column in range(classes):
                    value = values[row, column]
                    axes.text(column, row, format(value, cell_format), ha="center", va="center", fontsize=8,
                              color="white" if value > threshold else "black")  # fmt: skip
    _save(figure, path)


def plot_run_comparison(runs: dict[str, list[dict]], path: str | Path) -> None:
    """Evaluation top-1 and loss per epoch of several runs (name -> ``metrics.jsonl`` records), one line each."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2), layout="constrained")
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for name, records in runs.items():
        records = _evaluated(records)
        epochs = [record["epoch"] for record in records]
        accuracy_axes.plot(epochs, [100 * record["eval_top1"] for record in records], marker="o", label=name)
        loss_axes.plot(epochs, [record["eval_loss"] for record in records], marker="o", label=name)
    splits = sorted({record["eval_split"] for records in runs.values() for record in _evaluated(records)})
    accuracy_axes.set(title=f"Top-1 on {'/'.join(splits)}", xlabel="epoch", ylabel="accuracy (%)")
    loss_axes.set(title=f"Loss on {'/'.join(splits)}", xlabel="epoch", ylabel="cross-entropy")
    for axes in (accuracy_axes, loss_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    accuracy_axes.legend(fontsize=8)
    _save(figure, path)


def plot_group_accuracies(panels: dict[str, dict[str, list[float]]], path: str | Path) -> None:
    """A strip plot per accuracy (title -> group name -> each run's accuracy in percent): every run a dot, spread
    sideways so that equal ones stay visible, and the group's mean with a bar of ± its standard error, which is
    what a difference between groups is to be read against."""
    import numpy as np
    from matplotlib.figure import Figure

    from cifar_accel.run_statistics import describe

    groups_drawn = max(len(groups) for groups in panels.values())
    figure = Figure(figsize=(max(5.0, 1.6 * groups_drawn) * len(panels) + 1, 4.6), layout="constrained")
    jitter = np.random.default_rng(0)  # the same figure from the same runs
    for axes, (title, groups) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True):
        for position, values in enumerate(groups.values()):
            offsets = jitter.uniform(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            axes.scatter(position + np.asarray(offsets), values, s=22, alpha=0.7, color="tab:blue", zorder=2)
            summary = describe(values)
            label = "mean ± s.e." if position == 0 else None
            axes.errorbar(position + 0.3, summary["mean"], yerr=summary["se"] or 0.0, fmt="D", color="black",
                          capsize=5, markersize=6, zorder=3, label=label)  # fmt: skip
        axes.set_xticks(range(len(groups)), [name.replace(" ", "\n") for name in groups], fontsize=8)
        axes.set(title=title, ylabel="accuracy (%)", xlim=(-0.6, len(groups) - 0.4))
        axes.grid(alpha=0.3, axis="y")
        axes.legend(fontsize=8)
    _save(figure, path)


def _evaluated(records: list[dict]) -> list[dict]:
    """The epochs that were evaluated (``--eval_strategy``/``--eval_epochs`` may skip some)."""
    return [record for record in records if "eval_top1" in record]


def _save(figure, path: str | Path) -> None:
    """Through a temporary sibling and a rename, as every run file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
