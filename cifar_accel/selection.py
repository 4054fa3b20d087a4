"""Which epoch's model the run keeps: one object decides, as timm's ``CheckpointSaver`` does.

``BestModelSaver.update`` is called once per evaluated epoch. The best weights are kept in memory as well
as saved to ``best/``: checkpoints carry them, so a resumed run still ends with the model it chose.
"""

import contextlib

from cifar_accel.reporting import numeric_values
from cifar_accel.run_records import selected_metric
from cifar_accel.run_state import Run
from cifar_accel.saved_model import WEIGHTS_NAME, model_config, save_model
from cifar_accel.zoo import ZooClassifier, save_zoo_model


class BestModelSaver:
    """Keeps the best evaluated epoch of ``run``: its record in ``run.progress.best``, its weights in
    ``run.best_state`` and, on the main process, in the run folder's saved model."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def update(self, record: dict) -> bool:
        """After an epoch's evaluation: whether it is the best so far; if it is, its weights are kept and saved
        (with ``--model_ema``, the weights its evaluation selected)."""
        run = self.run
        better = selected_metric(record, "top1") > selected_metric(run.progress.best, "top1")
        if not better:
            return False
        run.progress.best = record
        with run.ema.swapped_in() if record.get("selected_weights") == "ema" else contextlib.nullcontext():
            run.best_state = {name: tensor.detach().clone() for name, tensor in run.model.state_dict().items()}
            self.save()
        return True

    def load_best(self) -> None:
        """The best epoch's weights back into the model, for the final evaluation."""
        run = self.run
        run.model.load_state_dict(run.best_state)
        if run.folder and not (run.folder.best_model_dir / WEIGHTS_NAME).is_file():
            self.save()  # a checkpoint resumed in another --output_dir chose its best epoch before it

    def keep_last(self, evaluation: dict) -> None:
        """With ``--eval_strategy no``: the last epoch's record gets the final evaluation, and its model is saved."""
        run = self.run
        last = run.progress.records[-1]
        last.update(
            {"eval_split": run.data.selection_split, **{f"eval_{name}": value for name, value in evaluation.items()}}
        )
        run.progress.best = last
        run.accelerator.log({name: value for name, value in numeric_values(last).items() if name.startswith("eval_")},
                            step=last["epoch"])  # fmt: skip
        self.save()
        if run.folder:
            run.folder.save_metrics(run.progress.records)

    def save(self) -> None:
        """The model as it is now, as the run's saved model (main process only): a Hub model in its library's
        own format, any other in cifar_accel's."""
        run = self.run
        if run.folder:
            data = run.data
            network = run.accelerator.unwrap_model(run.model, keep_torch_compile=False)
            if isinstance(network, ZooClassifier):
                save_zoo_model(network, run.folder.best_model_dir, data.class_names)
                return
            saved_model_config = model_config(
                run.config.model, run.config.model_args, data.class_names, data.mean, data.std, run.config.image_size
            )
            save_model(network, run.folder.best_model_dir, saved_model_config)
