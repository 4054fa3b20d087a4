"""The training loop: one ``Accelerator``; ``train`` reads as its table of contents.

``build_run`` checks and builds everything before the first step, ``train_epoch`` runs one epoch
(saving and stopping as asked), ``finish_run`` evaluates the best model and writes the reports.
Everything distributed goes through the accelerator: ``prepare`` shards the data and wraps
the model, ``gather_for_metrics`` makes evaluation exact, ``is_main_process`` decides who writes.
"""

import contextlib
import dataclasses
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accelerate
import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    TorchDynamoPlugin,
    broadcast_object_list,
    set_seed,
)
from torch import nn
from tqdm.auto import tqdm

from cifar_accel import __version__
from cifar_accel.augment import BatchMixing
from cifar_accel.checkpoint import (
    TrainingProgress,
    check_architecture,
    check_data,
    check_process_count,
    find_checkpoint,
    load_checkpoint,
    resume_command,
    save_checkpoint,
    with_prefix,
    without_prefix,
)
from cifar_accel.config import TrainConfig
from cifar_accel.data import (
    SUBSET_SEED,
    DataBundle,
    classes_without_examples,
    content_digest,
    default_num_workers,
    first_images,
    load_data,
    make_dataloader,
)
from cifar_accel.device_data import make_device_dataloader
from cifar_accel.distributed import process_group_deadline
from cifar_accel.errors import StoppedBySignal, UserError
from cifar_accel.files import FolderLock, describe_os_error
from cifar_accel.finetune import BaseModel, find_base_model, freeze_backbone, load_base_weights, resumed_base_model
from cifar_accel.hub import push_run
from cifar_accel.loop import (
    DataWaitClock,
    NonFiniteLossWatch,
    RunLengthForecast,
    evaluate,
    first_batches,
    peak_memory_megabytes,
    timing_summary,
    train_steps,
)
from cifar_accel.models import get_model
from cifar_accel.optim import build_optimizers, build_scheduler, epochs_for_updates, total_updates
from cifar_accel.reporting import (
    REPLACED_RUN,
    RunFolder,
    format_epoch_line,
    numeric_values,
    refuse_existing_run,
    selected_metric,
    tracker_config,
    tracker_folder,
    tracker_names,
)
from cifar_accel.saved_model import model_config, save_model
from cifar_accel.scoring import TOP_K_NAMES, score_predictions
from cifar_accel.stopping import AbandonPoints, SafePoint, StepAbandoned, StopRequest
from cifar_accel.tricks import Lookahead, ModelEma

COMPILE_BACKEND = "inductor"  # the tests count graphs with the cheaper "aot_eager"
WHITENING_IMAGES = 5000  # airbench's: the patch covariance of the first 5,000 training images


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The one Accelerator of a run.

    Under ``accelerate launch --num_processes N`` on a machine without a GPU, a default
    Accelerator treats every process as alone; asking for the CPU makes them one gloo group.
    The seedable sampler makes each epoch's order a function of (seed, epoch), so a resumed
    run draws the same batches as an uninterrupted one.
    """
    launched_with_several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cpu = config.cpu or (launched_with_several_processes and not torch.cuda.is_available())
    trackers = tracker_names(config.report_to)
    # Accelerate keeps one shared state per process: a second run in the same process (a notebook, a
    # benchmark) would silently keep the first one's mixed precision and compilation. The process group stays.
    AcceleratorState._reset_state()
    with process_group_deadline():  # CIFAR_ACCEL_JOIN_TIMEOUT s for the other processes to join
        accelerator = Accelerator(
            cpu=use_cpu,
            log_with=trackers or None,
            project_config=ProjectConfiguration(logging_dir=tracker_folder(config.output_dir)),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            dynamo_plugin=TorchDynamoPlugin(backend=COMPILE_BACKEND, mode=config.compile_mode)
            if config.compile
            else None,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        )
    check_mixed_precision(accelerator.mixed_precision, accelerator.device, config.optimizer)
    if accelerator.device.type == "cuda":
        # cuDNN times its algorithms on the first batches of each shape and keeps the fastest: every
        # step of a run has the same shapes. (Its choice may differ between runs, in the last bits.)
        torch.backends.cudnn.benchmark = True
    return accelerator


def check_mixed_precision(mixed_precision: str, device: torch.device, optimizer: str) -> None:
    """Refuse what Accelerate would silently run in float32 (fp16 on a CPU) or cannot run."""
    if mixed_precision == "fp16" and optimizer == "muon":
        # The gradient scaler unscales, and checks for inf, the gradients of an optimizer's own parameters;
        # Muon's are views it makes of the filters' gradients only when it steps.
        raise UserError("--optimizer muon does not run under --mixed_precision fp16; use bf16 or no")
    if mixed_precision == "fp16" and device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU; on the CPU use --mixed_precision bf16 or no")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--mixed_precision bf16 is not supported by {torch.cuda.get_device_name()}; use fp16 or no")


def on_main_process(accelerator: Accelerator, action: Callable[[], Any]) -> Any:
    """``action()`` on the main process only; its refusal (a ``UserError`` or what the operating
    system refused) is raised on every process alike, so that none is left waiting for the others."""
    result, problem = None, None
    if accelerator.is_main_process:
        try:
            result = action()
        except UserError as error:
            problem = str(error)
        except OSError as error:
            problem = describe_os_error(error)
    if accelerator.num_processes > 1:
        shared = [problem]
        broadcast_object_list(shared)
        problem = shared[0]
    if problem:
        raise UserError(problem)
    return result


@dataclass
class Run:
    """One training run as ``train`` advances it; ``folder`` is set on the main process only."""

    config: TrainConfig
    accelerator: Accelerator
    data: DataBundle
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]  # one; with --optimizer muon, SGD then Muon
    schedulers: list[Any]  # one per optimizer
    criterion: nn.Module
    train_loader: Any
    eval_loader: Any
    lookahead: Lookahead | None
    architecture: dict
    resume_from: Path | None
    folder: RunFolder | None
    start_time: float
    data_ready_time: float
    total_steps: int  # training batches of this process over the run; a fractional --epochs cuts the last epoch
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    examples_before_resume: float = 0.0  # trained in this epoch by the run that saved the checkpoint: not timed
    checkpoint_saved: bool = False
    data_digest: str | None = None  # of the examples, saved with checkpoints; computed at the first one
    base_model: dict | None = None  # with --init_from: where the starting weights came from
    ema: ModelEma | None = None  # with --model_ema
    mixing: BatchMixing | None = None  # with --mixup or --cutmix
    forecast: RunLengthForecast | None = None  # set by build_run, once the run is restored
    abandon_points: AbandonPoints | None = None  # where steps are slow: a stop ends the step in flight
    safe_point: SafePoint | None = None  # ...and what that step changed is put back from here

    @property
    def weight_averages(self) -> list:
        """The averages that step after every update, in that order: lookahead pulls, then the EMA follows."""
        return [average for average in (self.lookahead, self.ema) if average is not None]

    def __post_init__(self):
        self.epoch_totals = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)  # loss, correct, n
        self.watch = NonFiniteLossWatch(self.accelerator.device)

    def save_checkpoint(self) -> Path:
        self.watch.check(self.accelerator, len(self.train_loader))  # a checkpoint never holds a diverged model
        tensors = {
            "epoch_totals": self.accelerator.reduce(self.epoch_totals, reduction="sum"),
            **with_prefix("best", self.best_state),
        }
        if self.lookahead is not None:
            tensors.update(with_prefix("lookahead", self.lookahead.state_dict()))
        if self.ema is not None:
            tensors.update(with_prefix("ema", self.ema.state_dict()))
        self.data_digest = self.data_digest or content_digest(self.data)
        saved_run = {
            "architecture": self.architecture,
            "settings": self.config.to_dict(),
            "num_processes": self.accelerator.num_processes,
            "data_digest": self.data_digest,
            # With --init_from, the data is normalised as the base model was: a resume needs neither its folder
            # nor its files (finetune.resumed_base_model).
            "base_model": self.base_model and {**self.base_model, "mean": self.data.mean, "std": self.data.std},
        }
        checkpoint = save_checkpoint(
            self.accelerator, self.config.output_dir, self.progress, tensors, saved_run,
            self.config.checkpoints_total_limit,
        )  # fmt: skip
        self.checkpoint_saved = True
        return checkpoint

    def stop_if_requested(self, stop: StopRequest, where: str, checkpoint: Path | None = None) -> None:
        """After a signal: save a checkpoint (unless one was just saved), say how to resume, and stop."""
        signal_number = stop.requested(self.accelerator)
        if not signal_number:
            return
        checkpoint = checkpoint or self.save_checkpoint()
        self.accelerator.print(
            f"{signal.Signals(signal_number).name}: stopped {where}; checkpoint saved to {checkpoint}\n"
            f"resume with: {resume_command(checkpoint, self.accelerator.num_processes)}"
        )
        self.accelerator.end_training()
        raise StoppedBySignal(signal_number)

    def abandon(self, error: BaseException) -> None:
        """A run ending in an error before its first epoch finished, with no checkpoint, leaves the folder
        as it found it (the run it replaced put back); one with a checkpoint keeps that run aside until it
        finishes an epoch."""
        if self.folder is None or self.resume_from or self.progress.epoch > 1:
            return
        replaced = self.folder.path / REPLACED_RUN
        if self.checkpoint_saved and replaced.exists():
            print(f"the run this one replaces is kept in {replaced} until this one finishes its first epoch",
                  file=sys.stderr)  # fmt: skip
        elif not self.checkpoint_saved:
            self.folder.discard_run()


def environment() -> dict:
    return {
        "cifar_accel": __version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }


def resolved_settings(config: TrainConfig, accelerator: Accelerator, data: DataBundle, base_model: dict | None) -> dict:
    """``train_config.json``: every flag as used, plus what was derived from the data and the launch."""
    return {
        **config.to_dict(),
        "base_model": base_model,
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "global_batch_size": config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
        "num_train_examples": len(data.train),
        "num_eval_examples": len(data.evaluation),
        # --max_train_samples/--max_eval_samples: examples drawn at random with this seed (data.random_subset)
        "subset_seed": SUBSET_SEED if config.max_train_samples or config.max_eval_samples else None,
        "selection_split": data.selection_split,
        # The datasets library's hash of the training examples as used: another revision of the data differs.
        "dataset_fingerprint": data.train._fingerprint,
        "dataset_revision": data.dataset_revision,
        "dataset_pretty_name": data.dataset_pretty_name,
        "image_column": data.image_column,
        "label_column": data.label_column,
        "class_names": data.class_names,
        "mean": data.mean,
        "std": data.std,
        "environment": environment(),
    }


def train(config: TrainConfig) -> dict:
    """Train, evaluate after every epoch, keep the best model; returns ``results.json``'s content.

    With ``--checkpointing_steps`` the full state is saved as it goes; SIGINT/SIGTERM save one and
    stop; ``--resume_from_checkpoint`` continues bit for bit where a checkpoint left off.
    """
    start_time = time.perf_counter()
    config.validate()  # the command line validated it already; a TrainConfig built in Python gets the same checks
    with StopRequest() as stop:
        stop.stop_at_once("stopped while preparing the run; nothing was trained: run the same command again")
        run = build_run(config, start_time, stop)
        try:
            start_records(run)
            with progress_bar(run) as bar:
                while run.progress.epoch <= run.config.epoch_count:
                    train_epoch(run, stop, bar)
            results = finish_run(run, stop)
            if config.push_to_hub:
                push(run, stop)
        except BaseException as error:
            run.abandon(error)
            raise
        finally:
            if run.folder:
                run.folder.close()
    return results


def build_run(config: TrainConfig, start_time: float, stop: StopRequest) -> Run:
    """Everything before the first step. What can be refused is checked before anything is written;
    the output folder is taken last, once a signal no longer stops the run at once."""
    resume_from, skipped, data_digest = None, [], None
    architecture = {"model": config.model, "model_args": config.model_args}
    FolderLock(config.output_dir).refuse_if_held()
    if config.resume_from_checkpoint:
        resume_from, skipped = find_checkpoint(config.resume_from_checkpoint, config.output_dir)
        check_architecture(resume_from, architecture)
    elif not config.overwrite_output_dir:
        refuse_existing_run(config.output_dir)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    accelerator = build_accelerator(config)
    if resume_from:
        check_process_count(resume_from, accelerator.num_processes)
        for note in skipped:
            accelerator.print(f"note: {note}")
        if launcher_precision and launcher_precision != accelerator.mixed_precision:
            accelerator.print(f"note: the run continues in mixed precision {accelerator.mixed_precision}, as it "
                              f"was trained, not the launcher's {launcher_precision}")  # fmt: skip
    workers = default_num_workers(accelerator.num_processes) if config.num_workers is None else config.num_workers
    # Resolved values, so that train_config.json and the checkpoints record what was used.
    config = dataclasses.replace(config, mixed_precision=accelerator.mixed_precision, num_workers=workers)
    set_seed(config.seed)
    base = None
    if config.init_from and resume_from:  # the base model its checkpoint recorded: that folder may be gone
        base = resumed_base_model(resume_from, config.init_from, config.init_revision)
    elif config.init_from:
        base = find_base_model(config.init_from, config.init_revision)
    # The main process builds the datasets and decoded-image caches first; the others then read them.
    with accelerator.main_process_first():
        data = load_data(config)
        if base:  # the normalisation the base model's weights were trained with
            data.mean, data.std = base.config["mean"], base.config["std"]
        train_loader = make_loader(config, data, data.train, accelerator, train=True)
        eval_loader = make_loader(config, data, data.evaluation, accelerator)
    data_ready_time = time.perf_counter()  # speed runs time from here: data loaded, model not yet built
    architecture["num_classes"] = data.num_classes
    if resume_from:
        check_architecture(resume_from, architecture)  # again, now that the number of classes is known
        data_digest = content_digest(data)
        check_data(resume_from, data_digest, config.dataset)
    model = build_model(config, data, accelerator, train_loader, base, resuming=bool(resume_from))
    # The optimizers are built on the prepared model's parameters: on a GPU, or under DDP, prepare() gives
    # them new memory, and Muon steps the filters through views of theirs.
    model = accelerator.prepare(model)
    optimizers = build_optimizers(accelerator.unwrap_model(model, keep_torch_compile=False), config, accelerator.device)
    *prepared_optimizers, train_loader, eval_loader = accelerator.prepare(*optimizers, train_loader, eval_loader)
    if not len(train_loader):
        raise UserError(
            f"--drop_last leaves no full batch: {len(data.train)} training examples, batch {config.batch_size} x "
            f"{accelerator.num_processes} process(es); lower --batch_size or drop --drop_last"
        )
    # This process's updates, now that prepare() has sharded the loader. The prepared scheduler steps once per
    # process at each update, so it counts them for all processes.
    updates_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    if config.max_train_steps:  # now that an epoch's updates are known: the epochs that make that many
        config = dataclasses.replace(config, epochs=epochs_for_updates(config.max_train_steps, updates_per_epoch))
    process_updates = total_updates(config, updates_per_epoch)
    schedulers = [
        accelerator.prepare(build_scheduler(optimizer, config, updates_per_epoch, accelerator.num_processes))
        for optimizer in optimizers
    ]
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    mixing = config.mixup or config.cutmix
    run = Run(
        config, accelerator, data, model, prepared_optimizers, schedulers,
        # MixUp and CutMix give class probabilities as targets, which the loss takes as they are.
        nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), train_loader, eval_loader,
        Lookahead(unwrapped, process_updates) if config.lookahead else None,
        architecture, resume_from, None, start_time, data_ready_time, math.ceil(len(train_loader) * config.epochs),
        data_digest=data_digest, base_model=base.record() if base else None,
        ema=ModelEma(unwrapped, config.model_ema) if config.model_ema else None,
        mixing=BatchMixing(config.mixup, config.cutmix, data.num_classes, config.seed, accelerator.process_index)
        if mixing else None,
    )  # fmt: skip
    if resume_from:
        restore_checkpoint(run)
    run.forecast = RunLengthForecast(run.total_steps, run.progress.global_step, accelerator.device)
    if stops_inside_steps(config, accelerator):
        run.abandon_points, run.safe_point = AbandonPoints(stop), SafePoint(model)
        run.abandon_points.attach(model)
    stop.stop_at_once(None)  # from here a signal is answered with a checkpoint
    resuming, overwrite = bool(resume_from), config.overwrite_output_dir
    run.folder = on_main_process(accelerator, lambda: RunFolder(config.output_dir, resuming, overwrite))
    return run


def stops_inside_steps(config: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether a stop may end a step in flight. On the CPU a step can outlast a launcher's grace (5 s for
    ``accelerate launch``); on a GPU steps are short and the hooks would slow a speed run. Several processes
    must stop at the same step (an abandoned one would leave the others in its gradient all-reduce), and a
    compiled graph has no hooks to stop in."""
    return accelerator.device.type == "cpu" and accelerator.num_processes == 1 and not config.compile


def make_loader(config: TrainConfig, data: DataBundle, split, accelerator: Accelerator, train: bool = False):
    batch_size = config.batch_size if train else config.eval_batch_size
    drop_last = train and config.drop_last
    if config.data_loader == "device":
        return make_device_dataloader(
            split, data, train, batch_size, accelerator.device, config.cutout, config.alternating_flip,
            config.seed, config.channels_last, config.crop_padding, drop_last,
        )  # fmt: skip
    return make_dataloader(
        split, data, train, batch_size, config.num_workers, config.cutout, config.seed, config.channels_last,
        config.crop_padding, config.alternating_flip, drop_last, auto_augment=config.auto_augment,
        random_erasing=config.random_erasing,
    )  # fmt: skip


def build_model(
    config: TrainConfig, data: DataBundle, accelerator: Accelerator, train_loader, base: BaseModel | None = None,
    resuming: bool = False,
) -> nn.Module:  # fmt: skip
    model = get_model(config.model, num_classes=data.num_classes, **config.model_args)
    if hasattr(model, "initialize_whitening"):  # airbench models: first-layer filters from the data
        if config.data_loader == "device":  # computed on the accelerator, from the split already there
            images = train_loader.dataset.unaugmented(WHITENING_IMAGES)
        else:
            images = first_images(data.train, data, count=WHITENING_IMAGES)
        model.initialize_whitening(images)
    if base and not resuming:  # (a resumed run's weights come from its checkpoint)
        note = load_base_weights(model, base)
        if note:
            accelerator.print(note)
    if config.freeze_backbone:
        freeze_backbone(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_batchnorm and accelerator.num_processes > 1:
        if accelerator.device.type != "cuda":
            raise UserError("--sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def restore_checkpoint(run: Run) -> None:
    run.progress, saved = load_checkpoint(run.accelerator, run.resume_from)
    if run.accelerator.is_main_process:  # the saved sums are over all processes: count them once
        run.epoch_totals += saved["epoch_totals"]
    run.examples_before_resume = float(saved["epoch_totals"][2])
    run.best_state = without_prefix("best", saved)
    if run.lookahead is not None:
        run.lookahead.load_state_dict(without_prefix("lookahead", saved))
    if run.ema is not None:
        run.ema.load_state_dict(without_prefix("ema", saved))


def start_records(run: Run) -> None:
    """``train_config.json``, the metrics so far, the trackers and the run's first line."""
    config, accelerator, data = run.config, run.accelerator, run.data
    resolved = resolved_settings(config, accelerator, data, run.base_model)
    if run.folder:
        run.folder.save_config(resolved)
        run.folder.save_metrics(run.progress.records)  # a resumed run drops epochs logged after its checkpoint
    run_name = Path(config.output_dir).resolve().name
    tracker_options = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}
    if run.resume_from:  # TensorBoard drops what the interrupted run logged after its checkpoint, as metrics.jsonl
        tracker_options["tensorboard"] = {"purge_step": run.progress.epoch}
    accelerator.init_trackers("cifar_accel", tracker_config(resolved), tracker_options)
    accelerator.print(
        f"{config.model}: {sum(p.numel() for p in run.model.parameters()):,} parameters | "
        f"{len(data.train)} train / {len(data.evaluation)} {data.selection_split} examples, "
        f"{data.num_classes} classes | {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"global batch {resolved['global_batch_size']}, mixed precision {accelerator.mixed_precision}"
    )
    for note in missing_class_notes(data):
        accelerator.print(note)
    if run.resume_from:
        accelerator.print(
            f"resuming from {run.resume_from}: epoch {run.progress.epoch}, step {run.progress.step_in_epoch}"
        )


def missing_class_notes(data: DataBundle) -> list[str]:
    """Up front, a class no example teaches or tests: a subset, a hold-out or the dataset itself may lack one."""
    notes = []
    for split, role, consequence in (
        (data.train, "training", "the model cannot learn to predict them"),
        (data.evaluation, data.selection_split, "their per-class accuracy is n/a"),
    ):
        if missing := classes_without_examples(split, data.label_column, data.class_names):
            notes.append(f"note: the {role} examples hold no image of class {', '.join(map(repr, missing))}; "
                         f"{consequence}")  # fmt: skip
    return notes


def progress_bar(run: Run) -> tqdm:
    return tqdm(
        total=run.total_steps,
        initial=run.progress.global_step,
        disable=not run.accelerator.is_main_process,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
    )


def train_epoch(run: Run, stop: StopRequest, bar: tqdm) -> None:
    """The epoch's training steps (checkpointing and stopping as asked), its evaluation if one is due, its record."""
    config, accelerator, progress = run.config, run.accelerator, run.progress
    epoch, steps_per_epoch = progress.epoch, len(run.train_loader)
    bar.set_description(f"epoch {epoch}/{config.epochs}")
    epoch_start = time.perf_counter()
    # Batch order and augmentation are functions of (seed, epoch): the same after a resume.
    run.train_loader.set_epoch(epoch - 1)
    run.train_loader.dataset.set_epoch(epoch - 1)
    train_whitening_bias(run, epoch)
    batches = run.train_loader
    if progress.step_in_epoch:
        batches = accelerator.skip_first_batches(run.train_loader, progress.step_in_epoch)
    else:
        progress.epoch_learning_rate = run.schedulers[0].get_last_lr()[0]
    steps_left = min(steps_per_epoch, run.total_steps - (epoch - 1) * steps_per_epoch) - progress.step_in_epoch
    data_wait = DataWaitClock()
    batches = data_wait.timed(first_batches(batches, steps_left))
    if run.mixing is not None:
        batches = run.mixing.batches(batches, epoch, progress.step_in_epoch)
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
                run.stop_if_requested(stop, f"at epoch {epoch}, step {progress.step_in_epoch}")
            if config.checkpoint_every_steps and progress.global_step % config.checkpoint_every_steps == 0:
                run.save_checkpoint()
            if every_twentieth:
                run.watch.check(accelerator, steps_per_epoch)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    except StepAbandoned:
        run.safe_point.restore()
        run.stop_if_requested(stop, f"at epoch {epoch}, step {progress.step_in_epoch} (the step in flight was dropped)")
    run.watch.check(accelerator, steps_per_epoch)
    if epoch == config.epoch_count:
        finish_weight_averages(run)
    train_seconds = time.perf_counter() - epoch_start
    record = epoch_record(run, epoch_start, train_seconds, data_wait.seconds)
    if config.evaluates_after(epoch):
        try:
            evaluate_epoch(run, record)
        except StepAbandoned:  # the checkpoint is the epoch trained: a resume evaluates it again
            run.stop_if_requested(stop, f"during the evaluation of epoch {epoch}")
    keep_record(run, record, bar)
    progress.epoch, progress.step_in_epoch = epoch + 1, 0
    run.epoch_totals.zero_()
    if run.folder:
        run.folder.drop_replaced_run()  # this run has a finished epoch of its own now
    checkpoint = run.save_checkpoint() if config.checkpointing_steps == "epoch" else None
    run.stop_if_requested(stop, f"after epoch {epoch}", checkpoint)


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


def keep_record(run: Run, record: dict, bar: tqdm) -> None:
    """Log the epoch; if it was evaluated and is the best so far, keep its weights in memory and as the saved model."""
    run.progress.records.append(record)
    run.accelerator.log(numeric_values(record), step=record["epoch"])
    if "eval_top1" in record and selected_metric(record, "top1") > selected_metric(run.progress.best, "top1"):
        run.progress.best = record
        with run.ema.swapped_in() if record.get("selected_weights") == "ema" else contextlib.nullcontext():
            run.best_state = {name: tensor.detach().clone() for name, tensor in run.model.state_dict().items()}
            save_best_model(run)
    if run.folder:
        bar.write(format_epoch_line(record, run.config.epochs))
        run.folder.save_metrics(run.progress.records)


def save_best_model(run: Run) -> None:
    if run.folder:
        data = run.data
        saved_model_config = model_config(
            run.config.model, run.config.model_args, data.class_names, data.mean, data.std, run.config.image_size
        )
        save_model(
            run.accelerator.unwrap_model(run.model, keep_torch_compile=False),
            run.folder.best_model_dir,
            saved_model_config,
        )


def inference_model(run: Run) -> nn.Module:
    """The trained model for its last, timed evaluation: with BatchNorm folded into the convolutions where the
    architecture offers it; as trained when compiled (a new module would be compiled again)."""
    unwrapped = run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False, keep_torch_compile=False)
    if run.config.compile or not hasattr(unwrapped, "folded_for_inference"):
        return run.model
    folded = unwrapped.folded_for_inference()
    if run.abandon_points is not None:
        run.abandon_points.attach(folded)
    return folded


def finish_run(run: Run, stop: StopRequest) -> dict:
    """The best epoch's model evaluated once more (with TTA if asked), then ``results.json`` and the reports."""
    config, accelerator, data = run.config, run.accelerator, run.data
    accelerator.wait_for_everyone()
    selecting = config.eval_strategy == "epoch"
    results: dict[str, Any] = {"num_processes": accelerator.num_processes}
    if selecting:
        run.model.load_state_dict(run.best_state)
        if run.folder and not (run.folder.best_model_dir / "model.safetensors").is_file():
            save_best_model(run)  # a checkpoint resumed in another --output_dir chose its best epoch before it
    final_split, final_data = data.selection_split, data.evaluation
    if data.test is not None:
        # A validation hold-out chose the epoch; report the chosen model on the untouched split.
        final_split, final_data = config.eval_split, data.test
    try:
        if config.tta_level:
            tta_loader = (
                run.eval_loader
                if data.test is None
                else accelerator.prepare(make_loader(config, data, data.test, accelerator))
            )
            with accelerator.autocast():  # the folded copy is not wrapped by prepare()
                results["tta_metrics"] = evaluate(inference_model(run), tta_loader, accelerator, config.tta_level)
        trained_time = time.perf_counter()  # evaluate() ends in a host sync: the device has finished
        # The saved model exactly as `cifar-accel evaluate` and `predict` see it: through the per-image loader
        # (the device loader normalises with a fused multiply-add, equal only to the last bits), without TTA.
        final_loader = make_dataloader(
            final_data, data, False, config.eval_batch_size, config.num_workers, channels_last=config.channels_last
        )
        # In float32, without the mixed-precision wrapper: the numbers `cifar-accel evaluate` gives for the saved
        # model.
        float32_model = accelerator.unwrap_model(run.model, keep_fp32_wrapper=False, keep_torch_compile=False)
        final = evaluate(float32_model, accelerator.prepare(final_loader), accelerator, keep_predictions=True)
    except StepAbandoned:  # training is over: the checkpoint makes a resume run this evaluation again
        run.stop_if_requested(stop, "during the final evaluation")
    results["tta_level"] = config.tta_level
    scores = score_predictions(final.pop("ranked_predictions"), final.pop("labels"), data.class_names)
    disagreeing = [name for name in TOP_K_NAMES if scores[name] != final[name]]
    if disagreeing:  # two independent countings of the same predictions; never expected
        raise RuntimeError(f"the evaluate metric and the loop disagree on {disagreeing}: {scores} vs {final}")
    results["final_metrics"] = {"split": final_split, "loss": final["loss"], "n": final["n"], **scores}
    if not selecting:  # the last epoch's model is the one kept: its evaluation is this one
        keep_last_epoch(run, {"loss": final["loss"], "n": final["n"], **{name: scores[name] for name in TOP_K_NAMES}})
    best = run.progress.best
    results.update(
        best_epoch=best["epoch"], selected_by=data.selection_split if selecting else "last", best_metrics=best
    )
    if run.ema is not None:  # the raw weights or their moving average (kept when nothing was compared)
        results["selected_weights"] = best["selected_weights"] if selecting else "ema"
    run.stop_if_requested(stop, "during the final evaluation")
    accelerator.log({f"final_{name}": scores[name] for name in TOP_K_NAMES}, step=config.epoch_count)
    results["timing"] = {
        **timing_summary(
            run.progress.records, run.start_time, run.data_ready_time, trained_time, bool(run.resume_from)
        ),
        **peak_memory_megabytes(accelerator),
    }
    if run.folder:
        run.folder.save_results(results)
        run.folder.save_reports(run.progress.records, results, config.hub_model_id if config.push_to_hub else None)
    run.stop_if_requested(stop, "while writing the reports")
    chosen = (
        f"best {data.selection_split} top1 {selected_metric(best, 'top1'):.2%} at epoch {best['epoch']}; "
        if selecting
        else ""
    )
    tta = f" ({results['tta_metrics']['top1']:.2%} with TTA)" if config.tta_level else ""
    accelerator.print(
        f"{chosen}{final_split} top1 {final['top1']:.2%}{tta}; saved to {config.output_dir}/best "
        f"({results['timing']['total_seconds']:.0f}s)"
    )
    accelerator.end_training()
    return results


def keep_last_epoch(run: Run, evaluation: dict) -> None:
    """With ``--eval_strategy no``: the last epoch's record gets the final evaluation, and its model is saved."""
    last = run.progress.records[-1]
    last.update(
        {"eval_split": run.data.selection_split, **{f"eval_{name}": value for name, value in evaluation.items()}}
    )
    run.progress.best = last
    run.accelerator.log({name: value for name, value in numeric_values(last).items() if name.startswith("eval_")},
                        step=last["epoch"])  # fmt: skip
    save_best_model(run)
    if run.folder:
        run.folder.save_metrics(run.progress.records)


def push(run: Run, stop: StopRequest) -> None:
    """The finished run to the Hub, from the main process; a failed or interrupted push keeps the run."""
    config = run.config
    retry = (
        f"the run is saved in {config.output_dir}: push it with cifar-accel push "
        f"--run_dir {config.output_dir} --repo_id {config.hub_model_id}"
    )
    if not run.accelerator.is_main_process:
        return
    stop.stop_at_once(f"stopped while pushing; {retry}")
    try:
        url = push_run(config.output_dir, config.hub_model_id, private=config.hub_private_repo)
    except UserError as error:
        raise UserError(f"{error}; {retry}") from None
    finally:
        stop.stop_at_once(None)
    run.accelerator.print(f"pushed the best model to {url}")
