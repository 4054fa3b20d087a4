"""Optimizer and learning-rate schedule from a ``TrainConfig``.

Schedules are multipliers of the peak learning rate as a function of training progress,
so one ``LambdaLR`` serves them all: linear warm-up, then onecycle / cosine / multistep / constant.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.learning_rate,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.momentum, 0.999), weight_decay=config.weight_decay
    )


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
        return decay(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int) -> LambdaLR:
    """``total_steps`` counts optimizer updates of a single process seeing the whole dataset;
    Accelerate's prepared scheduler advances it once per process per update to match."""
    return LambdaLR(optimizer, lr_multiplier(config, total_steps))
