"""The pieces of an epoch that ``engine.train`` puts together: the training steps, the evaluation,
the watch for a diverging loss, and the clocks behind ``results.json``'s timing.

None of them synchronises host and device inside a step; they run unchanged on any process count.
"""

import resource
import sys
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from cifar_accel.errors import UserError
from cifar_accel.tricks import tta_logits


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


def train_steps(
    model, batches, optimizers, schedulers, criterion, accelerator, totals, weight_averages=(), max_grad_norm=None
):
    """Train on each batch, yielding its loss after the step so the caller can log, save or stop.

    Every optimizer steps on every batch (with Muon: SGD for some parameters, Muon for the filters); each
    weight average (lookahead, model EMA) steps after every update. A batch's labels may be class
    probabilities (MixUp, CutMix): its accuracy then counts the class with the largest share.

    ``totals`` (loss sum, correct, examples) is summed on the device: no host sync in the step.
    """
    model.train()
    for images, labels in batches:
        with accelerator.accumulate(model):
            logits = model(images)
            loss = criterion(logits, labels)
            accelerator.backward(loss)
            if max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            for optimizer in optimizers:
                optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            for average in weight_averages:
                average.step()
        classes = labels.argmax(dim=1) if labels.ndim == 2 else labels
        totals[0] += loss.detach().double() * len(labels)
        totals[1] += (logits.argmax(dim=1) == classes).sum()
        totals[2] += len(labels)
        yield loss.detach()


def first_batches(loader, count: int):
    """The first ``count`` batches of a prepared loader (all of them, or the start of a fractional last epoch).

    Stopping early, it tells Accelerate that the loader is done, as running to its end would, so that
    ``gather_for_metrics`` and gradient accumulation then follow the loaders that come after it.
    """
    if count >= len(loader):
        yield from loader
        return
    for taken, batch in enumerate(loader, start=1):
        last = taken == count
        if last:  # gradient accumulation applies its partial window, as at a loader's end
            loader.end_of_dataloader = True
        yield batch
        if last:
            break
    loader.end()


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
                f"{step % steps_per_epoch + 1}; checkpoints saved before it are kept; lower --learning_rate"
                + ("" if accelerator.mixed_precision == "no" else ", or use --mixed_precision no")
            )


class RunLengthForecast:
    """One line, once, when the first steps show that the run will take hours on the CPU: the usual surprise
    of a first run without a GPU. (On a GPU the host runs ahead of the device, so its step times mean little.)"""

    CPU_COMMAND = "python train.py --recipe airbench94"  # docs/hardware.md, On a CPU: 90.10% in 31 min, 2 cores

    def __init__(self, total_steps: int, first_step: int, device: torch.device, after_steps: int = 5,
                 hours: float = 2.0):  # fmt: skip
        self.total_steps, self.first_step, self.after_steps, self.hours = total_steps, first_step, after_steps, hours
        self.pending = device.type == "cpu" and total_steps - first_step > after_steps
        self.started = time.perf_counter()

    def note(self, step: int) -> str | None:
        """After the first steps of this process: the line to print if the rest will take hours, else None."""
        if not self.pending or step - self.first_step < self.after_steps:
            return None
        self.pending = False
        per_step = (time.perf_counter() - self.started) / (step - self.first_step)
        hours = per_step * (self.total_steps - step) / 3600
        if hours < self.hours:
            return None
        return (
            f"note: at {per_step:.1f} s a step, the {self.total_steps - step} steps left take about {hours:.0f} hours "
            f"on this CPU; for a useful model in under an hour, try: {self.CPU_COMMAND} (docs/hardware.md: On a CPU)"
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
