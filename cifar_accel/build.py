"""Building a run: everything before its first step.

``build_run`` checks what can be refused before anything is written, then builds the accelerator, the
data, the model, its optimizers and schedulers, restores a checkpoint if asked, and takes the output
folder last, once a signal no longer stops the run at once. ``abandon`` undoes the taking of the
folder when the run fails before it has anything of its own to keep.
"""

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset
from torch import nn

from cifar_accel.accel import build_accelerator, on_main_process
from cifar_accel.augment import BatchMixing
from cifar_accel.config import TrainConfig
from cifar_accel.data import DataBundle, default_num_workers, first_images, load_data, make_dataloader
from cifar_accel.device_data import make_device_dataloader, split_on_device
from cifar_accel.errors import UserError
from cifar_accel.files import FolderLock
from cifar_accel.finetune import BaseModel, find_base_model, freeze_backbone, load_base_weights, resumed_base_model
from cifar_accel.loop import RunLengthForecast
from cifar_accel.models import get_model
from cifar_accel.optim import build_optimizers, build_scheduler, epochs_for_updates, total_updates
from cifar_accel.reporting import RunFolder, refuse_existing_run
from cifar_accel.run_files import REPLACED_RUN
from cifar_accel.run_state import (
    Run,
    check_resumed_data,
    check_resumed_launch,
    checkpoint_to_resume,
    restore_run_checkpoint,
)
from cifar_accel.stopping import AbandonPoints, SafePoint, StopRequest
from cifar_accel.tricks import Lookahead, ModelEma
from cifar_accel.zoo import ZooClassifier, build_zoo_model, zoo_source

WHITENING_IMAGES = 5000  # airbench's: the patch covariance of the first 5,000 training images
# The settings load_data reads: runs that agree on them train on the same data (the validation split is drawn
# with the run's seed, so with --validation_size the seed is one of them).
DATA_SETTINGS = (
    "dataset", "dataset_config", "image_column", "label_column", "train_split", "eval_split", "max_train_samples",
    "max_eval_samples", "validation_size", "resize_on_load",
)  # fmt: skip


class SharedInputs:
    """What consecutive runs in one process (``--seeds``, a sweep's trials) load once: the data, and for the device
    loader its splits on the accelerator. Only the latest of each is kept."""

    def __init__(self):
        self._data: tuple[tuple, DataBundle] | None = None
        self._on_device: dict[tuple[int, str], tuple[Dataset, torch.Tensor, torch.Tensor]] = {}

    def data(self, config: TrainConfig) -> DataBundle:
        key = (*(getattr(config, name) for name in DATA_SETTINGS), config.seed if config.validation_size else None)
        if self._data is None or self._data[0] != key:
            self._data, self._on_device = (key, load_data(config)), {}
        return self._data[1]

    def on_device(self, data: DataBundle, split: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(split), str(device))  # the split is kept with its tensors: its id is not reused meanwhile
        if key not in self._on_device:
            self._on_device[key] = (split, *split_on_device(data, split, device))
        return self._on_device[key][1:]


_shared_inputs: SharedInputs | None = None


@contextlib.contextmanager
def inputs_shared() -> Iterator[None]:
    """Inside, runs that ask for the same data share one load of it (a dataset changed meanwhile is not seen).
    Nested (a sweep's trial of several seeds), the outer sharing goes on."""
    global _shared_inputs
    if _shared_inputs is not None:
        yield
        return
    _shared_inputs = SharedInputs()
    try:
        yield
    finally:
        _shared_inputs = None


def build_run(config: TrainConfig, start_time: float, stop: StopRequest) -> Run:
    """Everything before the first step. What can be refused is checked before anything is written;
    the output folder is taken last, once a signal no longer stops the run at once."""
    resume_from, skipped, data_digest = None, [], None
    architecture = {"model": config.model, "model_args": config.model_args}
    source = zoo_source(config)
    if source:  # a checkpoint of another Hub model, revision or input size is refused
        architecture.update(hub_model=source.record(), image_size=config.image_size)
    FolderLock(config.output_dir).refuse_if_held()
    if config.resume_from_checkpoint:
        resume_from, skipped = checkpoint_to_resume(config, architecture)
    elif not config.overwrite_output_dir:
        refuse_existing_run(config.output_dir)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    accelerator = build_accelerator(config)
    if resume_from:
        check_resumed_launch(resume_from, skipped, accelerator, launcher_precision)
    workers = default_num_workers(accelerator.num_processes) if config.num_workers is None else config.num_workers
    # Resolved values, so that train_config.json and the checkpoints record what was used.
    config = dataclasses.replace(config, mixed_precision=accelerator.mixed_precision, num_workers=workers)
    set_seed(config.seed)
    base = starting_model(config, resume_from)
    data, train_loader, eval_loader, hub_network = load_run_data(config, accelerator, base, resuming=bool(resume_from))
    data_ready_time = time.perf_counter()  # speed runs time from here: data loaded, model not yet built
    architecture["num_classes"] = data.num_classes
    if resume_from:
        data_digest = check_resumed_data(resume_from, architecture, data, config.dataset)
    model = build_model(config, data, accelerator, train_loader, base, resuming=bool(resume_from), network=hub_network)
    config, model, optimizers, schedulers, train_loader, eval_loader, process_updates = prepare_training(
        config, accelerator, model, data, train_loader, eval_loader
    )
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    mixing = config.mixup or config.cutmix
    run = Run(
        config, accelerator, data, model, optimizers, schedulers,
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
        restore_run_checkpoint(run)
    run.forecast = RunLengthForecast(run.total_steps, run.progress.global_step, accelerator.device)
    if stops_inside_steps(config, accelerator):
        run.abandon_points, run.safe_point = AbandonPoints(stop), SafePoint(model)
        run.abandon_points.attach(model)
    stop.stop_at_once(None)  # from here a signal is answered with a checkpoint
    resuming, overwrite = bool(resume_from), config.overwrite_output_dir
    run.folder = on_main_process(accelerator, lambda: RunFolder(config.output_dir, resuming, overwrite))
    return run


def starting_model(config: TrainConfig, resume_from: Path | None) -> BaseModel | None:
    """With ``--init_from``: the model whose weights training starts from."""
    if config.init_from and resume_from:  # the base model its checkpoint recorded: that folder may be gone
        return resumed_base_model(resume_from, config.init_from, config.init_revision)
    if config.init_from:
        return find_base_model(config.init_from, config.init_revision)
    return None


def load_run_data(
    config: TrainConfig, accelerator: Accelerator, base: BaseModel | None, resuming: bool = False
) -> tuple[DataBundle, Any, Any, ZooClassifier | None]:
    """The data and its training and evaluation loaders, not yet prepared; and a Hub model's network, built for
    the data's classes, whose preprocessing the loaders take."""
    # The main process builds the datasets and decoded-image caches first, and downloads a Hub model into the
    # Hugging Face cache; the others then read them.
    hub_network = None
    with accelerator.main_process_first():
        data = _shared_inputs.data(config) if _shared_inputs else load_data(config)
        if base:  # the normalisation the base model's weights were trained with (a copy: the data may be shared)
            data = dataclasses.replace(data, mean=base.config["mean"], std=base.config["std"])
        if source := zoo_source(config):
            hub_network, note = build_zoo_model(source, data.class_names, config.image_size, config.model_args)
            if note and not resuming:  # (a resumed run's weights come from its checkpoint)
                accelerator.print(note)
            data = dataclasses.replace(data, mean=hub_network.spec.mean, std=hub_network.spec.std)
        train_loader = make_loader(config, data, data.train, accelerator, train=True)
        eval_loader = make_loader(config, data, data.evaluation, accelerator)
    return data, train_loader, eval_loader, hub_network


def prepare_training(
    config: TrainConfig,
    accelerator: Accelerator,
    model: nn.Module,
    data: DataBundle,
    train_loader: Any,
    eval_loader: Any,
) -> tuple[TrainConfig, nn.Module, list[torch.optim.Optimizer], list[Any], Any, Any, int]:
    """The model, its optimizers and the loaders prepared, then the schedulers, which count the sharded
    loader's updates. Returns the config (with ``--max_train_steps``, its epochs resolved), the prepared
    model, optimizers, schedulers and loaders, and this process's number of updates."""
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
    return config, model, prepared_optimizers, schedulers, train_loader, eval_loader, process_updates


def stops_inside_steps(config: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether a stop may end a step in flight. On the CPU a step can outlast a launcher's grace (5 s for
    ``accelerate launch``); on a GPU steps are short and the hooks would slow a speed run. Several processes
    must stop at the same step (an abandoned one would leave the others in its gradient all-reduce), and a
    compiled graph has no hooks to stop in."""
    return accelerator.device.type == "cpu" and accelerator.num_processes == 1 and not config.compile


def make_loader(
    config: TrainConfig, data: DataBundle, split: Dataset, accelerator: Accelerator, train: bool = False
) -> Any:
    """A loader of ``split`` as the run's settings ask: on the accelerator (``--data_loader device``) or per image."""
    batch_size = config.batch_size if train else config.eval_batch_size
    drop_last = train and config.drop_last
    if config.data_loader == "device":
        on_device = _shared_inputs.on_device(data, split, accelerator.device) if _shared_inputs else None
        return make_device_dataloader(
            split, data, train, batch_size, accelerator.device, config.cutout, config.alternating_flip,
            config.seed, config.channels_last, config.crop_padding, drop_last, on_device,
        )  # fmt: skip
    return make_dataloader(
        split, data, train, batch_size, config.num_workers, config.cutout, config.seed, config.channels_last,
        config.crop_padding, config.alternating_flip, drop_last, auto_augment=config.auto_augment,
        random_erasing=config.random_erasing,
    )  # fmt: skip


def build_model(
    config: TrainConfig, data: DataBundle, accelerator: Accelerator, train_loader: Any, base: BaseModel | None = None,
    resuming: bool = False, network: nn.Module | None = None,
) -> nn.Module:  # fmt: skip
    """The model to train, before ``prepare``: ``network`` (a Hub model's) or the registry's, its first layer
    whitened from the data (airbench), its weights from ``--init_from``, in the memory format and BatchNorm
    asked for."""
    model = network or get_model(config.model, num_classes=data.num_classes, **config.model_args)
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


def abandon(run: Run) -> None:
    """A run ending in an error before its first epoch finished, with no checkpoint, leaves the folder
    as it found it (the run it replaced put back); one with a checkpoint keeps that run aside until it
    finishes an epoch."""
    if run.folder is None or run.resume_from or run.progress.epoch > 1:
        return
    replaced = run.folder.path / REPLACED_RUN
    if run.checkpoint_saved and replaced.exists():
        print(f"the run this one replaces is kept in {replaced} until this one finishes its first epoch",
              file=sys.stderr)  # fmt: skip
    elif not run.checkpoint_saved:
        run.folder.discard_run()
