"""Figures of a run, drawn headless with matplotlib's object API (no pyplot, no display needed)."""

from pathlib import Path


def plot_training_curves(records: list[dict], path: str | Path) -> None:
    """Loss, accuracy and learning rate per epoch, from ``metrics.jsonl``'s records."""
    # Imported here, by the main process at the end of a run: matplotlib adds about 0.6 s to every
    # process's start-up otherwise.
    from matplotlib.figure import Figure

    epochs = [record["epoch"] for record in records]
    split = records[0]["eval_split"]
    figure = Figure(figsize=(13, 3.8), layout="constrained")
    loss_axes, accuracy_axes, rate_axes = figure.subplots(1, 3)
    loss_axes.plot(epochs, [record["train_loss"] for record in records], marker="o", label="train")
    loss_axes.plot(epochs, [record["eval_loss"] for record in records], marker="o", label=split)
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    for key, label in (("train_acc", "train top-1"), ("eval_top1", f"{split} top-1"), ("eval_top5", f"{split} top-5")):
        accuracy_axes.plot(epochs, [100 * record[key] for record in records], marker="o", label=label)
    accuracy_axes.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    rate_axes.plot(epochs, [record["lr"] for record in records], marker="o")
    rate_axes.set(title="Learning rate (at the start of each epoch)", xlabel="epoch", ylabel="learning rate")
    for axes in (loss_axes, accuracy_axes, rate_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    loss_axes.legend()
    accuracy_axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    temporary.replace(path)
