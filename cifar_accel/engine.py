"""The training loop: one ``Accelerator``, read top to bottom in ``train``.

Everything distributed goes through the accelerator: ``prepare`` shards the data and wraps
the model, ``gather_for_metrics`` makes evaluation exact, ``is_main_process`` decides who writes.
"""

import dataclasses
import math
import os
import platform
import resource
import signal
import sys
import time
from pathlib import Path

import accelerate
import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from cifar_accel import __version__
from cifar_accel.checkpoint import (
    StopRequest,
    TrainingProgress,
    check_architecture,
    find_checkpoint,
    load_checkpoint,
    resume_command,
    save_checkpoint,
    with_prefix,
    without_prefix,
)
from cifar_accel.config import TrainConfig
from cifar_accel.data import DataBundle, default_num_workers, first_images, load_data, make_dataloader
from cifar_accel.device_data import make_device_dataloader
from cifar_accel.errors import StoppedBySignal, UserError
from cifar_accel.hub import push_run
from cifar_accel.models import get_model
from cifar_accel.optim import build_optimizer, build_scheduler
from cifar_accel.reporting import (
    RunFolder,
    format_epoch_line,
    numeric_values,
    refuse_existing_run,
    tracker_config,
    tracker_folder,
    tracker_names,
)
from cifar_accel.saved_model import model_config, save_model
from cifar_accel.scoring import TOP_K_NAMES, score_predictions
from cifar_accel.tricks import Lookahead, tta_logits


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
    accelerator = Accelerator(
        cpu=use_cpu,
        log_with=trackers or None,
        project_config=ProjectConfiguration(logging_dir=tracker_folder(config.output_dir)),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dynamo_backend="inductor" if config.compile else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    check_mixed_precision(accelerator.mixed_precision, accelerator.device)
    return accelerator


def check_mixed_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse what Accelerate would silently run in float32 (fp16 on a CPU) or cannot run."""
    if mixed_precision == "fp16" and device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU; on the CPU use --mixed_precision bf16 or no")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--mixed_precision bf16 is not supported by {torch.cuda.get_device_name()}; use fp16 or no")


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, accelerator: Accelerator, tta_level: int = 0, keep_predictions: bool = False
) -> dict:
    """Loss, top-1, top-3 and top-5 over every example of ``loader`` exactly once, on all processes.

    ``keep_predictions`` adds ``labels`` and ``ranked_predictions`` (the five most likely class ids
    per example, best first), gathered from all processes, for ``scoring.score_predictions``.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top-1, top-3, top-5 sums
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = 0
    for images, labels in loader:
        logits = tta_logits(model, images, tta_level).float()
        losses = F.cross_entropy(logits, labels, reduction="none")
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        # gather_for_metrics drops the duplicates that pad the last batch across processes.
        extra = (labels, ranked) if keep_predictions else ()
        losses, top1, top3, top5, *extra = accelerator.gather_for_metrics(
            (losses, hits[:, 0], hits[:, :3].any(dim=1), hits.any(dim=1), *extra)
        )
        totals += torch.stack([losses.sum(), top1.sum(), top3.sum(), top5.sum()]).double()
        count += len(losses)
        if keep_predictions:
            kept.append(tuple(extra))
    loss, top1, top3, top5 = (totals / max(count, 1)).tolist()
    metrics = {"loss": loss, "top1": top1, "top3": top3, "top5": top5, "n": count}
    if keep_predictions:
        metrics["labels"] = torch.cat([labels for labels, _ in kept]).cpu()
        metrics["ranked_predictions"] = torch.cat([ranked for _, ranked in kept]).cpu()
    return metrics


def train_steps(model, batches, optimizer, scheduler, criterion, accelerator, totals, lookahead=None):
    """Train on each batch, yielding its loss after the step so the caller can log, save or stop.

    ``totals`` (loss sum, correct, examples) is summed on the device: no host sync in the step.
    """
    model.train()
    for images, labels in batches:
        with accelerator.accumulate(model):
            logits = model(images)
            loss = criterion(logits, labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if lookahead is not None and accelerator.sync_gradients:
            lookahead.step()
        totals[0] += loss.detach().double() * len(labels)
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += len(labels)
        yield loss.detach()


class NonFiniteLossWatch:
    """Notes on the device, without a host sync, the first step whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.first_step = torch.zeros((), dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.first_step = torch.where((self.first_step == 0) & ~torch.isfinite(loss), step, self.first_step)

    def check(self, accelerator: Accelerator, steps_per_epoch: int) -> None:
        """Raise, on every process alike, if any process saw a non-finite loss."""
        steps = accelerator.gather(self.first_step.reshape(1))
        steps = steps[steps > 0]
        if len(steps):
            step = int(steps.min()) - 1
            raise UserError(
                f"training loss became nan or inf at epoch {step // steps_per_epoch + 1}, step "
                f"{step % steps_per_epoch + 1}; the last checkpoint is kept; lower --learning_rate, "
                "or use --mixed_precision no"
            )


class DataWaitClock:
    """Host seconds the loop stood waiting for its next training batch; the rest of an epoch is compute.

    On a GPU the host runs ahead of the device, so "compute" also holds the waits at host syncs.
    """

    def __init__(self):
        self.seconds = 0.0

    def timed(self, batches):
        iterator = iter(batches)
        while True:
            asked = time.perf_counter()
            batch = next(iterator, None)
            self.seconds += time.perf_counter() - asked
            if batch is None:
                return
            yield batch


def peak_memory_megabytes(accelerator: Accelerator) -> dict:
    """The largest peak over processes: resident host memory of the training process (DataLoader
    workers not included) and tensor memory allocated on the GPU (None without one)."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    on_gpu = accelerator.device.type == "cuda"
    device = torch.cuda.max_memory_allocated(accelerator.device) / 2**20 if on_gpu else 0.0
    peaks = accelerator.gather(torch.tensor([[host, device]], dtype=torch.float64, device=accelerator.device))
    host, device = peaks.amax(dim=0).tolist()
    return {"peak_host_memory_mb": round(host, 1), "peak_device_memory_mb": round(device, 1) if on_gpu else None}


def timing_summary(
    records: list[dict], start_time: float, data_ready_time: float, trained_time: float, resumed: bool
) -> dict:
    """``results.json``'s timing: the run, its phases summed over epochs, and each epoch's seconds.

    ``speed_run_seconds`` runs from data loaded to the last evaluation (TTA included), as speed records count.
    After a resume, the epochs' figures cover every epoch; the first three only the last process.
    """

    def total(name: str) -> float:  # records of a checkpoint written by an older version may lack a field
        return sum(record.get(name, 0.0) for record in records)

    train_seconds = total("train_seconds")
    return {
        "total_seconds": time.perf_counter() - start_time,
        "data_loading_seconds": data_ready_time - start_time,
        "speed_run_seconds": trained_time - data_ready_time,
        "epoch_seconds": [record["seconds"] for record in records],
        "train_seconds": train_seconds,
        "data_wait_seconds": total("data_wait_seconds"),
        "compute_seconds": total("compute_seconds"),
        "eval_seconds": total("eval_seconds"),
        # images timed = rate x time: an epoch resumed mid-way timed only the images after the resume
        "images_per_second": sum(r["images_per_second"] * r.get("train_seconds", 0.0) for r in records) / train_seconds,
        "resumed": resumed,
    }


def environment() -> dict:
    return {
        "cifar_accel": __version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }


def resolved_settings(config: TrainConfig, accelerator: Accelerator, data: DataBundle) -> dict:
    """``train_config.json``: every flag as used, plus what was derived from the data and the launch."""
    return {
        **config.to_dict(),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "global_batch_size": config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
        "num_train_examples": len(data.train),
        "num_eval_examples": len(data.evaluation),
        "selection_split": data.selection_split,
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
    # Everything that can be refused is checked before anything is written.
    resume_from = None
    architecture = {"model": config.model, "model_args": config.model_args}
    if config.resume_from_checkpoint:
        resume_from = find_checkpoint(config.resume_from_checkpoint, config.output_dir)
        check_architecture(resume_from, architecture)
    elif not config.overwrite_output_dir:
        refuse_existing_run(config.output_dir)
    accelerator = build_accelerator(config)
    if config.num_workers is None:
        config = dataclasses.replace(config, num_workers=default_num_workers(accelerator.num_processes))
    set_seed(config.seed)

    def loader(split, train: bool = False):
        batch_size = config.batch_size if train else config.eval_batch_size
        if config.data_loader == "device":
            return make_device_dataloader(
                split, data, train, batch_size, accelerator.device, config.cutout, config.alternating_flip,
                config.seed, config.channels_last, config.crop_padding,
            )  # fmt: skip
        return make_dataloader(
            split, data, train, batch_size, config.num_workers, config.cutout, config.seed, config.channels_last,
            config.crop_padding, config.alternating_flip,
        )  # fmt: skip

    # The main process builds the datasets and decoded-image caches first; the others then read them.
    with accelerator.main_process_first():
        data = load_data(config)
        train_loader, eval_loader = loader(data.train, train=True), loader(data.evaluation)
    data_ready_time = time.perf_counter()  # speed runs time from here: data loaded, model not yet built
    architecture["num_classes"] = data.num_classes
    if resume_from:
        check_architecture(resume_from, architecture)  # again, now that the number of classes is known
    model = get_model(config.model, num_classes=data.num_classes, **config.model_args)
    if hasattr(model, "initialize_whitening"):  # airbench models: first-layer filters from the data
        model.initialize_whitening(first_images(data.train, data, count=5000))
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_batchnorm and accelerator.num_processes > 1:
        if accelerator.device.type != "cuda":
            raise UserError("--sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, config)
    # Counted before prepare(), as for one process: the prepared scheduler steps once per process.
    updates_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=updates_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    lookahead = (
        Lookahead(accelerator.unwrap_model(model), updates_per_epoch * config.epochs) if config.lookahead else None
    )

    progress = TrainingProgress()
    epoch_totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, examples
    best_state: dict[str, torch.Tensor] = {}
    examples_before_resume = 0.0  # trained in this epoch by the run that saved the checkpoint: not timed here
    if resume_from:
        progress, saved = load_checkpoint(accelerator, resume_from)
        if accelerator.is_main_process:  # the saved sums are over all processes: count them once
            epoch_totals += saved["epoch_totals"]
        examples_before_resume = float(saved["epoch_totals"][2])
        best_state = without_prefix("best", saved)
        if lookahead is not None:
            lookahead.load_state_dict(without_prefix("lookahead", saved))

    watch = NonFiniteLossWatch(accelerator.device)

    def save() -> Path:
        watch.check(accelerator, len(train_loader))  # a checkpoint never holds a diverged model
        tensors = {"epoch_totals": accelerator.reduce(epoch_totals, reduction="sum"), **with_prefix("best", best_state)}
        if lookahead is not None:
            tensors.update(with_prefix("lookahead", lookahead.state_dict()))
        return save_checkpoint(
            accelerator, config.output_dir, progress, tensors, architecture, config.checkpoints_total_limit
        )

    saved_model_config = model_config(config.model, config.model_args, data.class_names, data.mean, data.std)
    resolved = resolved_settings(config, accelerator, data)
    run_folder = RunFolder(config.output_dir, resuming=bool(resume_from)) if accelerator.is_main_process else None
    if run_folder:
        run_folder.save_config(resolved)
        run_folder.save_metrics(progress.records)  # a resumed run drops epochs logged after its checkpoint
    run_name = Path(config.output_dir).resolve().name
    tracker_options = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}
    if resume_from:  # TensorBoard drops what the interrupted run logged after its checkpoint, as metrics.jsonl does
        tracker_options["tensorboard"] = {"purge_step": progress.epoch}
    accelerator.init_trackers("cifar_accel", tracker_config(resolved), tracker_options)
    accelerator.print(
        f"{config.model}: {sum(p.numel() for p in model.parameters()):,} parameters | "
        f"{len(data.train)} train / {len(data.evaluation)} {data.selection_split} examples, "
        f"{data.num_classes} classes | {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"global batch {resolved['global_batch_size']}, mixed precision {accelerator.mixed_precision}"
    )
    if resume_from:
        accelerator.print(f"resuming from {resume_from}: epoch {progress.epoch}, step {progress.step_in_epoch}")

    with (
        StopRequest() as stop,
        tqdm(
            total=len(train_loader) * config.epochs,
            initial=progress.global_step,
            disable=not accelerator.is_main_process,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
        ) as progress_bar,
    ):  # closed before an error is printed
        while progress.epoch <= config.epochs:
            epoch = progress.epoch
            progress_bar.set_description(f"epoch {epoch}/{config.epochs}")
            epoch_start = time.perf_counter()
            # Batch order and augmentation are functions of (seed, epoch): the same after a resume.
            train_loader.set_epoch(epoch - 1)
            train_loader.dataset.set_epoch(epoch - 1)
            batches = train_loader
            if progress.step_in_epoch:
                batches = accelerator.skip_first_batches(train_loader, progress.step_in_epoch)
            else:
                progress.epoch_learning_rate = scheduler.get_last_lr()[0]
            data_wait = DataWaitClock()
            steps = train_steps(
                model, data_wait.timed(batches), optimizer, scheduler, criterion, accelerator, epoch_totals, lookahead
            )
            for loss in steps:
                progress.step_in_epoch += 1
                progress.global_step += 1
                watch.observe(loss, progress.global_step)
                progress_bar.update(1)
                signal_number = stop.requested(accelerator)
                if signal_number:
                    progress_bar.close()
                    checkpoint = save()
                    accelerator.print(
                        f"{signal.Signals(signal_number).name}: stopped at epoch {epoch}, "
                        f"step {progress.step_in_epoch}; checkpoint saved to {checkpoint}\n"
                        f"resume with: {resume_command(checkpoint, accelerator.num_processes)}"
                    )
                    accelerator.end_training()
                    raise StoppedBySignal(signal_number)
                if config.checkpoint_every_steps and progress.global_step % config.checkpoint_every_steps == 0:
                    save()
                if progress.step_in_epoch % 20 == 0:
                    watch.check(accelerator, len(train_loader))
                    progress_bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            watch.check(accelerator, len(train_loader))
            if lookahead is not None and epoch == config.epochs:
                lookahead.finish()  # the last epoch is evaluated and saved as the average
            train_seconds = time.perf_counter() - epoch_start
            loss_sum, correct, examples = accelerator.reduce(epoch_totals, reduction="sum").tolist()
            eval_start = time.perf_counter()
            eval_stats = evaluate(model, eval_loader, accelerator)
            epoch_end = time.perf_counter()
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / examples,
                "train_acc": correct / examples,
                "train_examples": int(examples),
                "eval_split": data.selection_split,
                **{f"eval_{name}": value for name, value in eval_stats.items()},
                "lr": progress.epoch_learning_rate,
                "seconds": epoch_end - epoch_start,
                "train_seconds": train_seconds,
                "data_wait_seconds": data_wait.seconds,
                "compute_seconds": train_seconds - data_wait.seconds,
                "eval_seconds": epoch_end - eval_start,
                "images_per_second": (examples - examples_before_resume) / train_seconds,
            }
            examples_before_resume = 0.0
            progress.records.append(record)
            accelerator.log(numeric_values(record), step=epoch)
            if record["eval_top1"] > progress.best["eval_top1"]:
                progress.best = record
                best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
                if run_folder:
                    save_model(accelerator.unwrap_model(model), run_folder.best_model_dir, saved_model_config)
            if run_folder:
                progress_bar.write(format_epoch_line(record, config.epochs))
                run_folder.save_metrics(progress.records)
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            epoch_totals.zero_()
            if config.checkpointing_steps == "epoch":
                save()
    accelerator.wait_for_everyone()

    best = progress.best
    results = {
        "best_epoch": best["epoch"],
        "selected_by": data.selection_split,
        "best_metrics": best,
        "num_processes": accelerator.num_processes,
    }
    model.load_state_dict(best_state)
    final_split, final_data = data.selection_split, data.evaluation
    if data.test is not None:
        # A validation hold-out chose the epoch; report the chosen model on the untouched split.
        final_split, final_data = config.eval_split, data.test
    if config.tta_level:
        tta_loader = eval_loader if data.test is None else accelerator.prepare(loader(data.test))
        results["tta_metrics"] = evaluate(model, tta_loader, accelerator, config.tta_level)
    results["tta_level"] = config.tta_level
    trained_time = time.perf_counter()  # evaluate() ends in a host sync: the device has finished
    # The saved model exactly as `cifar-accel evaluate` and `predict` see it: through the per-image loader
    # (the device loader normalises with a fused multiply-add, equal only to the last bits), without TTA.
    final_loader = make_dataloader(final_data, data, False, config.eval_batch_size, config.num_workers)
    final = evaluate(model, accelerator.prepare(final_loader), accelerator, keep_predictions=True)
    scores = score_predictions(final.pop("ranked_predictions"), final.pop("labels"), data.class_names)
    disagreeing = [name for name in TOP_K_NAMES if scores[name] != final[name]]
    if disagreeing:  # two independent countings of the same predictions; never expected
        raise RuntimeError(f"the evaluate metric and the loop disagree on {disagreeing}: {scores} vs {final}")
    results["final_metrics"] = {"split": final_split, "loss": final["loss"], "n": final["n"], **scores}
    accelerator.log({f"final_{name}": scores[name] for name in TOP_K_NAMES}, step=config.epochs)
    results["timing"] = {
        **timing_summary(progress.records, start_time, data_ready_time, trained_time, resumed=bool(resume_from)),
        **peak_memory_megabytes(accelerator),
    }
    if run_folder:
        run_folder.save_results(results)
        run_folder.save_reports(progress.records, results, config.hub_model_id if config.push_to_hub else None)
        accelerator.print(
            f"best {data.selection_split} top1 {best['eval_top1']:.2%} at epoch {best['epoch']}; "
            f"{final_split} top1 {final['top1']:.2%}; saved to {run_folder.best_model_dir} "
            f"({results['timing']['total_seconds']:.0f}s)"
        )
    accelerator.end_training()
    if config.push_to_hub and accelerator.is_main_process:
        try:
            url = push_run(config.output_dir, config.hub_model_id, private=config.hub_private_repo)
        except UserError as error:
            raise UserError(
                f"{error}; the run is saved in {config.output_dir}: push it with cifar-accel push "
                f"--run_dir {config.output_dir} --repo_id {config.hub_model_id}"
            ) from None
        accelerator.print(f"pushed the best model to {url}")
    return results
