"""Optimizer and learning-rate schedule from a ``TrainConfig``.

Schedules are multipliers of the peak learning rate as a function of training progress,
so one ``LambdaLR`` serves them all: linear warm-up, then onecycle / cosine / multistep / constant.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(model: nn.Module, config) -> list[dict]:
    """Three groups: the rest, BatchNorm biases (faster learning rate), a whitening layer's bias.

    BatchNorm biases get ``bias_lr_scale`` times the learning rate and weight decay divided by it,
    so that the decay applied per step (learning rate x decay) stays that of the other weights.
    """
    norm_biases = {id(module.bias) for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)}
    whitening = getattr(model, "whiten", None)
    whitening_bias = {id(whitening.bias)} if whitening is not None else set()
    groups = {"other": [], "norm_bias": [], "whitening_bias": []}
    for parameter in model.parameters():
        if parameter.requires_grad:
            groups[_group_name(id(parameter), norm_biases, whitening_bias)].append(parameter)
    scale = config.bias_lr_scale
    return [
        {"name": "other", "params": groups["other"], "lr": config.learning_rate, "weight_decay": config.weight_decay},
        {"name": "norm_bias", "params": groups["norm_bias"], "lr": config.learning_rate * scale,
         "weight_decay": config.weight_decay / scale},
        {"name": "whitening_bias", "params": groups["whitening_bias"], "lr": config.learning_rate,
         "weight_decay": config.weight_decay},
    ]  # fmt: skip


def _group_name(parameter_id: int, norm_biases: set[int], whitening_bias: set[int]) -> str:
    if parameter_id in norm_biases:
        return "norm_bias"
    return "whitening_bias" if parameter_id in whitening_bias else "other"


def build_optimizer(model: nn.Module, config, device: torch.device | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW over ``parameter_groups``; on a GPU ``device``, one fused kernel per step."""
    groups = parameter_groups(model, config)
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if config.optimizer == "sgd":
        nesterov = config.nesterov and config.momentum > 0
        return torch.optim.SGD(groups, momentum=config.momentum, nesterov=nesterov, **fused)
    return torch.optim.AdamW(groups, betas=(config.momentum, 0.999), **fused)


def _onecycle(progress: float) -> float:
    return 1.0 - progress


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _constant(progress: float) -> float:
    return 1.0


def _multistep(milestones: list[float], gamma: float) -> Callable[[float], float]:
    def multiplier(progress: float) -> float:
        return gamma ** sum(progress >= milestone for milestone in milestones)

    return multiplier


def _warmup(step: int, warmup_steps: int, start: float) -> float:
    """Linear from ``start`` at the first step towards the peak; from zero, the first step already
    moves (1/warmup_steps of the peak) rather than being wasted at a learning rate of 0."""
    if start == 0:
        return (step + 1) / warmup_steps
    return start + (1 - start) * step / warmup_steps


def total_updates(config, updates_per_epoch: int) -> int:
    """Optimizer updates in the run; a fractional ``epochs`` rounds up, as airbench counts its 9.9 epochs."""
    return math.ceil(updates_per_epoch * config.epochs)


def lr_multiplier(config, total_steps: int) -> Callable[[int], float]:
    """step -> factor of the peak learning rate; warm-up then the named decay over the rest.

    With ``warmup_start_fraction`` 0.2, ``warmup_fraction`` 0.23 and ``final_lr_fraction`` 0.07 this
    is airbench94's triangle: 0.2 of the peak at the first step, the peak at 23%, 0.07 at the end.
    """
    warmup_steps = round(config.warmup_fraction * total_steps)
    decay = {"onecycle": _onecycle, "cosine": _cosine, "constant": _constant}.get(config.scheduler)
    if config.scheduler == "multistep":
        decay = _multistep(config.milestones, config.gamma)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps, config.warmup_start_fraction)
        # Multistep milestones are fractions of the whole run; the others decay after warm-up.
        if config.scheduler == "multistep":
            return decay(step / total_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return config.final_lr_fraction + (1 - config.final_lr_fraction) * decay(progress)

    return multiplier


def frozen_after(multiplier: Callable[[int], float], last_step: int | None) -> Callable[[int], float]:
    """The same schedule, but zero from ``last_step`` on: the group stops moving (airbench's whitening bias)."""
    if last_step is None:
        return multiplier
    return lambda step: multiplier(step) if step < last_step else 0.0


def build_scheduler(optimizer: torch.optim.Optimizer, config, steps_per_epoch: int, num_processes: int = 1) -> LambdaLR:
    """``steps_per_epoch`` counts one process's optimizer updates in an epoch. Accelerate's prepared
    scheduler advances once per process at each update, so the schedule spans ``num_processes`` times them."""
    multiplier = lr_multiplier(config, num_processes * total_updates(config, steps_per_epoch))
    whitening_steps = None
    if config.whiten_bias_epochs is not None:
        whitening_steps = num_processes * steps_per_epoch * config.whiten_bias_epochs
    per_group = {"whitening_bias": frozen_after(multiplier, whitening_steps)}
    return LambdaLR(optimizer, [per_group.get(group["name"], multiplier) for group in optimizer.param_groups])
