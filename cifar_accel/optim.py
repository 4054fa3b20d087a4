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


def build_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(groups, betas=(config.momentum, 0.999))


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


def lr_multiplier(config, total_steps: int) -> Callable[[int], float]:
    """step -> factor of the peak learning rate; warm-up then the named decay over the rest."""
    warmup_steps = round(config.warmup_fraction * total_steps)
    decay = {"onecycle": _onecycle, "cosine": _cosine, "constant": _constant}.get(config.scheduler)
    if config.scheduler == "multistep":
        decay = _multistep(config.milestones, config.gamma)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
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


def build_scheduler(optimizer: torch.optim.Optimizer, config, steps_per_epoch: int) -> LambdaLR:
    """``steps_per_epoch`` counts optimizer updates of a single process seeing the whole dataset;
    Accelerate's prepared scheduler advances it once per process per update to match."""
    multiplier = lr_multiplier(config, steps_per_epoch * config.epochs)
    whitening_steps = None if config.whiten_bias_epochs is None else steps_per_epoch * config.whiten_bias_epochs
    per_group = {"whitening_bias": frozen_after(multiplier, whitening_steps)}
    return LambdaLR(optimizer, [per_group.get(group["name"], multiplier) for group in optimizer.param_groups])
