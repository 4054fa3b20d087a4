"""Optimizers and learning-rate schedules from a ``TrainConfig``.

SGD or AdamW train every parameter; with ``--optimizer muon``, Muon trains the convolution filters and
SGD the rest, as airbench94_muon splits them. Schedules are multipliers of the peak learning rate as a
function of training progress, so one ``LambdaLR`` per optimizer serves them all: linear warm-up, then
linear / cosine / multistep / constant.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from cifar_accel.errors import UserError
from cifar_accel.zoo import ZooClassifier

# airbench94_muon's Newton-Schulz iterations per Muon step (torch's default, 5, orthogonalises further).
NEWTON_SCHULZ_STEPS = 3


def parameter_groups(parameters: list[nn.Parameter], model: nn.Module, config) -> list[dict]:
    """Three groups of ``parameters``: the rest, BatchNorm biases, a whitening layer's bias.

    BatchNorm biases get ``bias_lr_scale`` times the learning rate, the whitening bias
    ``whiten_bias_lr_scale`` times, and each a weight decay divided by its scale, so that the decay
    applied per step (learning rate x decay) stays that of the other weights.
    """
    if isinstance(model, ZooClassifier):
        return hub_model_groups(parameters, model, config)
    norm_biases = {id(module.bias) for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)}
    whitening = getattr(model, "whiten", None)
    whitening_bias = {id(whitening.bias)} if whitening is not None else set()
    groups = {"other": [], "norm_bias": [], "whitening_bias": []}
    for parameter in parameters:
        groups[_group_name(id(parameter), norm_biases, whitening_bias)].append(parameter)
    scales = {"other": 1.0, "norm_bias": config.bias_lr_scale, "whitening_bias": config.whiten_bias_lr_scale}
    return [
        {"name": name, "params": groups[name], "lr": config.learning_rate * scale,
         "weight_decay": config.weight_decay / scale}
        for name, scale in scales.items()
    ]  # fmt: skip


def hub_model_groups(parameters: list[nn.Parameter], model: ZooClassifier, config) -> list[dict]:
    """A Hub model's ``parameters`` by learning-rate scale (``--layer_decay``, ``--head_lr_scale``) and by whether
    weight decay applies (not to biases, norms, position embeddings), in the order of their first parameter."""
    scales, decayed = model.learning_rate_scales(config.layer_decay, config.head_lr_scale), model.decayed()
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for parameter in parameters:
        groups.setdefault((scales[id(parameter)], id(parameter) in decayed), []).append(parameter)
    return [
        {"name": f"lr_x{scale:.6g}" + ("" if decays else "_no_decay"), "params": members,
         "lr": config.learning_rate * scale, "weight_decay": config.weight_decay if decays else 0.0}
        for (scale, decays), members in groups.items()
    ]  # fmt: skip


def _group_name(parameter_id: int, norm_biases: set[int], whitening_bias: set[int]) -> str:
    if parameter_id in norm_biases:
        return "norm_bias"
    return "whitening_bias" if parameter_id in whitening_bias else "other"


def build_optimizers(model: nn.Module, config, device: torch.device | None = None) -> list[torch.optim.Optimizer]:
    """SGD or AdamW over ``parameter_groups``, on a GPU ``device`` one fused kernel per step; with
    ``--optimizer muon``, ``FilterMuon`` for the convolution filters and SGD for the rest.

    Build them once the model is on its device: Muon steps the filters through views of their memory.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    muon = config.optimizer == "muon"
    filters = [parameter for parameter in parameters if muon and parameter.ndim == 4]
    rest = [parameter for parameter in parameters if not (muon and parameter.ndim == 4)]
    groups = parameter_groups(rest, model, config)
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if config.optimizer == "adamw":
        return [torch.optim.AdamW(groups, betas=(config.momentum, 0.999), **fused)]
    nesterov = config.nesterov and config.momentum > 0
    optimizers = [torch.optim.SGD(groups, momentum=config.momentum, nesterov=nesterov, **fused)]
    if filters:
        muon_nesterov = config.nesterov and config.muon_momentum > 0
        optimizers.append(FilterMuon(filters, config.muon_learning_rate, config.muon_momentum, muon_nesterov))
    return optimizers


def _as_matrix(tensor: Tensor, channels_last: bool) -> Tensor:
    """[out, in, h, w] as [out, in*h*w]; with ``channels_last``, [out, h*w*in], a view of such memory.
    The two differ by a permutation of columns, which the orthogonalisation commutes with."""
    if channels_last:
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.reshape(len(tensor), -1)


class FilterMuon(torch.optim.Muon):
    """``torch.optim.Muon`` for convolution filters, as airbench94_muon uses it.

    torch's Muon takes matrices: each filter is stepped through a matrix view of its own memory, whose
    gradient is the filter's, reshaped the same way. Before each step every filter is rescaled to norm
    sqrt(out channels), airbench94_muon's stand-in for weight decay: the BatchNorm after each convolution
    makes a filter's scale free. (torch's momentum buffer is airbench's times (1 - momentum); the update is
    normalised, so the step is the same.)
    """

    def __init__(self, filters: list[nn.Parameter], lr: float, momentum: float, nesterov: bool):
        self.filters = filters
        self.channels_last = [parameter.is_contiguous(memory_format=torch.channels_last) and not
                              parameter.is_contiguous() for parameter in filters]  # fmt: skip
        matrices = [
            _as_matrix(parameter.detach(), channels_last)
            for parameter, channels_last in zip(filters, self.channels_last, strict=True)
        ]
        super().__init__(
            [{"name": "filters", "params": matrices}], lr=lr, momentum=momentum, nesterov=nesterov,
            weight_decay=0.0, ns_steps=NEWTON_SCHULZ_STEPS,
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        matrices = self.param_groups[0]["params"]
        for parameter, matrix, channels_last in zip(self.filters, matrices, self.channels_last, strict=True):
            if matrix.data_ptr() != parameter.data_ptr():
                raise RuntimeError(
                    "a filter is not in the memory FilterMuon steps (it moved, or it is neither contiguous nor "
                    "channels_last): build FilterMuon once the model is in place"
                )
            matrix.grad = None
            if parameter.grad is not None:
                matrix.grad = _as_matrix(parameter.grad, channels_last)
                parameter.mul_(math.sqrt(len(parameter)) / parameter.norm())
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for parameter in self.filters:  # the filters' own gradients, of which the matrices' were views
            if parameter.grad is not None:
                if set_to_none:
                    parameter.grad = None
                else:
                    parameter.grad.zero_()


def _linear(progress: float) -> float:
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


def epochs_for_updates(updates: int, updates_per_epoch: int) -> float:
    """``--max_train_steps`` as a (fractional) number of epochs whose ``total_updates`` is exactly ``updates``."""
    epochs = updates / updates_per_epoch
    while math.ceil(updates_per_epoch * epochs) > updates:  # 10 / 3 * 3 is 10.000000000000002
        epochs = math.nextafter(epochs, 0)
    return int(epochs) if float(epochs).is_integer() else epochs


def total_updates(config, updates_per_epoch: int) -> int:
    """Optimizer updates in the run; a fractional ``epochs`` rounds up, as airbench counts its 9.9 epochs."""
    return math.ceil(updates_per_epoch * config.epochs)


def check_warmup(config, updates_per_epoch: int) -> None:
    """``--num_warmup_steps`` must end before the run does; only now, with the data loaded, is its length known."""
    updates = total_updates(config, updates_per_epoch)
    if config.num_warmup_steps is not None and config.num_warmup_steps >= updates:
        epochs = f"{config.epochs} epoch{'' if config.epochs == 1 else 's'}"
        length = "--max_train_steps" if config.max_train_steps else f"{epochs} of {updates_per_epoch}"
        raise UserError(
            f"--num_warmup_steps {config.num_warmup_steps} must be fewer than the {updates} optimizer updates this "
            f"run makes ({length}), or warm-up never ends: give at most {updates - 1}, or use --warmup_fraction"
        )


def lr_multiplier(config, total_steps: int, steps_per_update: int = 1) -> Callable[[int], float]:
    """step -> factor of the peak learning rate; warm-up then the named decay over the rest. The scheduler
    takes ``steps_per_update`` steps at each optimizer update (one per process, under Accelerate).

    With ``warmup_start_fraction`` 0.2, ``warmup_fraction`` 0.23 and ``final_lr_fraction`` 0.07 this
    is airbench94's triangle: 0.2 of the peak at the first step, the peak at 23%, 0.07 at the end.
    """
    warmup_steps = round(config.warmup_fraction * total_steps)
    if config.num_warmup_steps is not None:  # the Hugging Face examples' way: a count of updates, over the fraction
        warmup_steps = config.num_warmup_steps * steps_per_update
    decay = {"linear": _linear, "cosine": _cosine, "constant": _constant}.get(config.scheduler)
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


def whitening_bias_multiplier(multiplier: Callable[[int], float], last_step: int | None, decays: bool):
    """The whitening bias's schedule: zero from ``last_step`` on, so it stops moving; before that the run's
    schedule (airbench94) or, when it ``decays``, a straight fall from the peak to zero (airbench94_muon)."""
    if last_step is None:
        return multiplier
    before = (lambda step: 1 - step / last_step) if decays else multiplier
    return lambda step: before(step) if step < last_step else 0.0


def build_scheduler(optimizer: torch.optim.Optimizer, config, steps_per_epoch: int, num_processes: int = 1) -> LambdaLR:
    """``steps_per_epoch`` counts one process's optimizer updates in an epoch. Accelerate's prepared
    scheduler advances once per process at each update, so the schedule spans ``num_processes`` times them."""
    check_warmup(config, steps_per_epoch)
    multiplier = lr_multiplier(config, num_processes * total_updates(config, steps_per_epoch), num_processes)
    whitening_steps = None
    if config.whiten_bias_epochs is not None:
        whitening_steps = num_processes * steps_per_epoch * config.whiten_bias_epochs
    per_group = {"whitening_bias": whitening_bias_multiplier(multiplier, whitening_steps, config.whiten_bias_decay)}
    return LambdaLR(optimizer, [per_group.get(group["name"], multiplier) for group in optimizer.param_groups])
