"""Small named training tricks, each usable on its own: two weight averages (airbench's lookahead, timm's
model EMA) and test-time augmentation."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def floating_point_state(model: nn.Module) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """The names and tensors of the model's floating-point weights and buffers (BatchNorm statistics
    included, its integer batch counts not): what a weight average averages."""
    names, tensors = zip(*((name, t) for name, t in model.state_dict().items() if t.is_floating_point()), strict=True)
    return names, tensors


class Lookahead:
    """airbench's lookahead: every ``every`` steps an EMA of the weights moves toward them and
    the weights are put back on the EMA; the EMA's pull grows from 0 to 0.95^5 over training.
    At the end the weights become the EMA as of its last pull (airbench's final decay of 1.0).

    The average starts from the weights at the first pull rather than at initialisation: the same
    to within 1e-6 for a full run (the pull is ~0 early on), and a run of a few steps keeps its learning.
    """

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5):
        self.total_steps, self.every = max(total_steps, 1), every
        self.steps = 0
        self.names, self.weights = floating_point_state(model)  # each pull: two foreach kernels over them
        self.average: list[Tensor] | None = None

    def state_dict(self) -> dict[str, Tensor]:
        """For checkpoints: the step count and the running average, as tensors."""
        average = zip(self.names, self.average or (), strict=False)
        return {"steps": torch.tensor(self.steps), **{f"average.{name}": tensor for name, tensor in average}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.steps = int(state["steps"])
        saved = {name.removeprefix("average."): tensor for name, tensor in state.items() if name != "steps"}
        self.average = [saved[name].clone() for name in self.names] if saved else None

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimizer update."""
        self.steps += 1
        if self.steps % self.every == 0:
            self._pull(decay=0.95**self.every * (self.steps / self.total_steps) ** 3)

    @torch.no_grad()
    def finish(self) -> None:
        """End of training: the weights become the average (a run too short for a pull keeps its weights)."""
        if self.average is not None:
            torch._foreach_copy_(self.weights, self.average)

    def _pull(self, decay: float) -> None:
        if self.average is None:
            self.average = [tensor.detach().clone() for tensor in self.weights]
        torch._foreach_lerp_(self.average, self.weights, 1 - decay)
        torch._foreach_copy_(self.weights, self.average)


class ModelEma:
    """``--model_ema``: timm's model EMA, an exponential moving average of the weights (and BatchNorm
    statistics) kept beside the model, moved toward it after every optimizer update.

    Its decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, as TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates`` does: the first updates are not dominated by the
    initial weights. Evaluating it swaps it into the model (``swapped_in``), so the model's wrappers
    (DDP, compilation, mixed precision) serve it as they serve the weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.names, self.weights = floating_point_state(model)
        self.average = [tensor.detach().clone() for tensor in self.weights]

    def state_dict(self) -> dict[str, Tensor]:
        """For checkpoints: the update count and the average, as tensors."""
        return {"updates": torch.tensor(self.updates), **dict(zip(self.names, self.average, strict=True))}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.updates = int(state["updates"])
        self.average = [state[name].clone() for name in self.names]

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimizer update."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, self.weights, 1 - decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block, its own weights again after it."""
        kept = [tensor.clone() for tensor in self.weights]
        torch._foreach_copy_(self.weights, self.average)
        try:
            yield
        finally:
            torch._foreach_copy_(self.weights, kept)

    @torch.no_grad()
    def finish(self) -> None:
        """The model keeps the average (with ``--eval_strategy no``, where nothing is compared)."""
        torch._foreach_copy_(self.weights, self.average)


def _mirror_average(model: nn.Module, images: Tensor) -> Tensor:
    return 0.5 * (model(images) + model(images.flip(-1)))


def tta_logits(model: nn.Module, images: Tensor, level: int) -> Tensor:
    """Logits averaged over test-time augmentations: 0 none, 1 horizontal flip,
    2 flip and one-pixel shifts up-left and down-right (weights 1/2, 1/4, 1/4)."""
    if level == 0:
        return model(images)
    mirrored = _mirror_average(model, images)
    if level == 1:
        return mirrored
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    # Copied into tensors laid out like the batch: a compiled model then sees one shape and one stride.
    up_left, down_right = (
        torch.empty_like(images).copy_(view) for view in (padded[..., :-2, :-2], padded[..., 2:, 2:])
    )
    shifted = _mirror_average(model, up_left) + _mirror_average(model, down_right)
    return 0.5 * mirrored + 0.25 * shifted
