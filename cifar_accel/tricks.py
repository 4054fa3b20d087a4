"""Small named training tricks from the CIFAR speed-run literature, each usable on its own."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Lookahead:
    """airbench's lookahead: every ``every`` steps an EMA of the weights moves toward them and
    the weights are put back on the EMA; the EMA's pull grows from 0 to 0.95^5 over training.

    The average starts from the weights at the first pull rather than at initialisation: the same
    to within 1e-6 for a full run (the pull is ~0 early on), and a run of a few steps keeps its learning.
    """

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5):
        self.model, self.total_steps, self.every = model, max(total_steps, 1), every
        self.steps = 0
        self.average: dict[str, Tensor] | None = None

    def state_dict(self) -> dict[str, Tensor]:
        """For checkpoints: the step count and the running average, as tensors."""
        average = {f"average.{name}": tensor for name, tensor in (self.average or {}).items()}
        return {"steps": torch.tensor(self.steps), **average}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.steps = int(state["steps"])
        average = {name.removeprefix("average."): tensor for name, tensor in state.items() if name != "steps"}
        self.average = {name: tensor.clone() for name, tensor in average.items()} or None

    def _float_state(self) -> dict[str, Tensor]:
        return {name: t for name, t in self.model.state_dict().items() if t.dtype in (torch.float16, torch.float32)}

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimizer update."""
        self.steps += 1
        if self.steps % self.every == 0:
            self._pull(decay=0.95**self.every * (self.steps / self.total_steps) ** 3)

    @torch.no_grad()
    def finish(self) -> None:
        """End of training: fold in the steps since the last pull, then keep the average."""
        if self.steps % self.every:
            self._pull(decay=0.95**self.every * (self.steps / self.total_steps) ** 3)

    def _pull(self, decay: float) -> None:
        if self.average is None:
            self.average = {name: tensor.detach().clone() for name, tensor in self._float_state().items()}
        for name, tensor in self._float_state().items():
            self.average[name].lerp_(tensor, 1 - decay)
            tensor.copy_(self.average[name])


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
    shifted = _mirror_average(model, padded[..., :-2, :-2]) + _mirror_average(model, padded[..., 2:, 2:])
    return 0.5 * mirrored + 0.25 * shifted
