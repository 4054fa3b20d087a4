"""The training loop; ``train`` reads as its table of contents.

``build_run`` (build) checks and builds everything before the first step, ``train_epoch`` runs one
epoch (saving and stopping as asked), the ``BestModelSaver`` (selection) keeps the best evaluated epoch,
``finish_run`` (final) evaluates it once more and writes the reports, ``push`` (publish) uploads the run.
What a checkpoint holds, and how a signal stops the run with one, is in run_state.
"""

import sys
import time
from collections.abc import Callable, Iterable

from tqdm.auto import tqdm

from cifar_accel.build import abandon, build_run
from cifar_accel.config import TrainConfig
from cifar_accel.final import finish_run
from cifar_accel.loop import DataWaitClock, evaluate, first_batches, train_steps
from cifar_accel.preflight import preflight
from cifar_accel.publish import push
from cifar_accel.reporting import format_epoch_line, numeric_values
from cifar_accel.run_start import start_records
from cifar_accel.run_state import Run, save_run_checkpoint, stop_if_requested
from cifar_accel.selection import BestModelSaver
from cifar_accel.stopping import StepAbandoned, StopRequest


def train(
    config: TrainConfig, on_evaluation: Callable[[dict], None] | None = None, resume_hint: str | None = None
) -> dict:
    """Train, evaluate after every epoch, keep the best model; returns ``results.json``'s content.

    With ``--checkpointing_steps`` the full state is saved as it goes; SIGINT/SIGTERM save one and
    stop; ``--resume_from_checkpoint`` continues bit for bit where a checkpoint left off.
    ``on_evaluation`` sees each evaluated epoch's record once it is saved; what it raises ends the run there.
    ``resume_hint`` replaces the resume command a stop prints (several runs in one command continue together).
    """
    start_time = time.perf_counter()
    # The command line validated the values already; a TrainConfig built in Python gets the same checks. Then what
    # the values need from the disk, the installed packages and the Hub, before anything is loaded or written.
    config.validate()
    preflight(config)
    with StopRequest() as stop:
        stop.stop_at_once("stopped while preparing the run; nothing was trained: run the same command again")
        run = build_run(config, start_time, stop)
        saver = BestModelSaver(run)
        run.on_evaluation, run.resume_hint = on_evaluation, resume_hint
        try:
            start_records(run)
            with progress_bar(run) as bar:
                while run.progress.epoch <= run.config.epoch_count:
                    train_epoch(run, saver, stop, bar)
            results = finish_run(run, saver, stop)
            if config.push_to_hub:
                push(run, stop)
        except BaseException:
            abandon(run)
            raise
        finally:
            if run.folder:
                run.folder.close()
    return results


def progress_bar(run: Run) -> tqdm:
    """The run's steps, counted from where a resumed run starts; shown by the main process only."""
    return tqdm(
        total=run.total_steps,
        initial=run.progress.global_step,
        disable=not run.accelerator.is_main_process,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
    )


def train_epoch(run: Run, saver: BestModelSaver, stop: StopRequest, bar: tqdm) -> None:
    """The epoch's training steps (checkpointing and stopping as asked), its evaluation if one is due, its record."""
    config, accelerator, progress = run.config, run.accelerator, run.progress
    epoch, steps_per_epoch = progress.epoch, len(run.train_loader)
    bar.set_description(f"epoch {epoch}/{config.epochs}")
    epoch_start = time.perf_counter()
    # Batch order and augmentation are functions of (seed, epoch): the same after a resume.
    run.train_loader.set_epoch(epoch - 1)
    run.train_loader.dataset.set_epoch(epoch - 1)
    train_whitening_bias(run, epoch)
    if not progress.step_in_epoch:  # the peak's schedule (with --layer_decay the first group learns slower)
        scheduler = run.schedulers[0].scheduler  # (inside Accelerate's wrapper)
        progress.epoch_learning_rate = run.config.learning_rate * scheduler.lr_lambdas[0](scheduler.last_epoch)
    batches, data_wait = epoch_batches(run, epoch)
    steps = train_steps(
        run.model, batches, run.optimizers, run.schedulers, run.criterion, accelerator, run.epoch_totals,
        run.weight_averages, config.max_grad_norm,
    )  # fmt: skip
    try:
        mark_safe_point(run)
        for loss in steps:
            progress.step_in_epoch += 1
            progress.global_step += 1
            mark_safe_point(run)
            run.watch.observe(loss, progress.global_step)
            bar.update(1)
            if forecast := run.forecast.note(progress.global_step):
                accelerator.print(forecast)
            # Every 20 steps the host reads values back (the loop's only waits for the device): the loss for the
            # progress bar, the non-finite check and, across GPUs, whether any process was asked to stop.
            every_twentieth = progress.step_in_epoch % 20 == 0
            if accelerator.num_processes == 1 or accelerator.device.type == "cpu" or every_twentieth:
                stop_if_requested(run, stop, f"at epoch {epoch}, step {progress.step_in_epoch}")
            if config.checkpoint_every_steps and progress.global_step % config.checkpoint_every_steps == 0:
                save_run_checkpoint(run)
            if every_twentieth:
                run.watch.check(accelerator, steps_per_epoch)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    except StepAbandoned:
        run.safe_point.restore()
        stop_if_requested(
            run, stop, f"at epoch {epoch}, step {progress.step_in_epoch} (the step in flight was dropped)"
        )
    run.watch.check(accelerator, steps_per_epoch)
    if epoch == config.epoch_count:
        finish_weight_averages(run)
    train_seconds = time.perf_counter() - epoch_start
    end_epoch(run, saver, stop, bar, epoch_record(run, epoch_start, train_seconds, data_wait.seconds))


def epoch_batches(run: Run, epoch: int) -> tuple[Iterable, DataWaitClock]:
    """The batches left to train in the epoch (a resumed one skips those trained before its checkpoint), mixed
    as asked, and the clock that times the waits for them."""
    progress, steps_per_epoch = run.progress, len(run.train_loader)
    batches = run.train_loader
    if progress.step_in_epoch:
        batches = run.accelerator.skip_first_batches(run.train_loader, progress.step_in_epoch)
    steps_left = min(steps_per_epoch, run.total_steps - (epoch - 1) * steps_per_epoch) - progress.step_in_epoch
    data_wait = DataWaitClock()
    batches = data_wait.timed(first_batches(batches, steps_left))
    if run.mixing is not None:
        batches = run.mixing.batches(batches, epoch, progress.step_in_epoch)
    return batches, data_wait


def end_epoch(run: Run, saver: BestModelSaver, stop: StopRequest, bar: tqdm, record: dict) -> None:
    """After the epoch's steps: its evaluation if one is due, its record, the best model, a checkpoint if asked."""
    config, progress, epoch = run.config, run.progress, run.progress.epoch
    if config.evaluates_after(epoch):
        try:
            evaluate_epoch(run, record)
        except StepAbandoned:  # the checkpoint is the epoch trained: a resume evaluates it again
            stop_if_requested(run, stop, f"during the evaluation of epoch {epoch}")
    keep_record(run, saver, record, bar)
    progress.epoch, progress.step_in_epoch = epoch + 1, 0
    run.epoch_totals.zero_()
    if run.folder:
        run.folder.drop_replaced_run()  # this run has a finished epoch of its own now
    checkpoint = save_run_checkpoint(run) if config.checkpointing_steps == "epoch" else None
    stop_if_requested(run, stop, f"after epoch {epoch}", checkpoint)
    if run.on_evaluation is not None and "eval_top1" in record:  # the epoch kept: a pruned run stops after it
        run.on_evaluation(record)


def mark_safe_point(run: Run) -> None:
    """After each completed update: the state an abandoned next step goes back to."""
    if run.safe_point is not None:
        run.safe_point.mark()


def finish_weight_averages(run: Run) -> None:
    """After the last step: lookahead's weights become its average (the last epoch is evaluated and saved as
    that), and with nothing selected by evaluation the EMA is the model kept."""
    if run.lookahead is not None:
        run.lookahead.finish()
    if run.ema is not None and run.config.eval_strategy == "no":
        run.ema.finish()


def train_whitening_bias(run: Run, epoch: int) -> None:
    """airbench's whitening bias trains for its first epochs, then stops requiring a gradient, so the
    first layer skips its backward pass. Under DDP every parameter it registered must get a gradient: there
    the bias keeps one, and its learning rate of zero from then on (``optim.whitening_bias_multiplier``) holds it."""
    whitening = getattr(run.accelerator.unwrap_model(run.model, keep_torch_compile=False), "whiten", None)
    # Without --whiten_bias_epochs the bias trains throughout; with a frozen backbone, never.
    scheduled = run.config.whiten_bias_epochs is not None and not run.config.freeze_backbone
    if whitening is not None and scheduled and run.accelerator.num_processes == 1:
        whitening.bias.requires_grad_(epoch <= run.config.whiten_bias_epochs)


def epoch_record(run: Run, epoch_start: float, train_seconds: float, data_wait_seconds: float) -> dict:
    """The epoch's line of ``metrics.jsonl`` before any evaluation: training sums over all processes."""
    loss_sum, correct, examples = run.accelerator.reduce(run.epoch_totals, reduction="sum").tolist()
    record = {
        "epoch": run.progress.epoch,
        "train_loss": loss_sum / examples,
        "train_acc": correct / examples,
        "train_examples": int(examples),
        "lr": run.progress.epoch_learning_rate,
        "seconds": time.perf_counter() - epoch_start,
        "train_seconds": train_seconds,
        "data_wait_seconds": data_wait_seconds,
        "compute_seconds": train_seconds - data_wait_seconds,
        "eval_seconds": 0.0,
        "images_per_second": (examples - run.examples_before_resume) / train_seconds,
    }
    run.examples_before_resume = 0.0
    return record


def evaluate_epoch(run: Run, record: dict) -> None:
    """Add the evaluation on the selection split to the epoch's record; with ``--model_ema`` the EMA's too
    (``ema_eval_*``), and which of the two weights is the better (``selected_weights``)."""
    eval_start = time.perf_counter()
    eval_stats = evaluate(run.model, run.eval_loader, run.accelerator)
    record.update(
        {"eval_split": run.data.selection_split, **{f"eval_{name}": value for name, value in eval_stats.items()}}
    )
    if run.ema is not None:
        with run.ema.swapped_in():
            ema_stats = evaluate(run.model, run.eval_loader, run.accelerator)
        record.update({f"ema_eval_{name}": value for name, value in ema_stats.items()})
        record["selected_weights"] = "ema" if ema_stats["top1"] > eval_stats["top1"] else "raw"
    eval_seconds = time.perf_counter() - eval_start
    record["eval_seconds"] = eval_seconds
    record["seconds"] += eval_seconds


def keep_record(run: Run, saver: BestModelSaver, record: dict, bar: tqdm) -> None:
    """Log the epoch; an evaluated one goes to the saver, which keeps it if it is the best so far."""
    run.progress.records.append(record)
    run.accelerator.log(numeric_values(record), step=record["epoch"])
    if "eval_top1" in record:
        saver.update(record)
    if run.folder:
        bar.write(format_epoch_line(record, run.config.epochs))
        run.folder.save_metrics(run.progress.records)
