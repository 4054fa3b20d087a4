"""A Hub model zoo network as the trainer uses it: its own preprocessing, and the learning-rate scale of each layer.

The loaders crop, flip and cut out the dataset's 32x32 images and normalise them with the model's mean and std;
``ZooClassifier`` then resizes the whole batch on the accelerator to the model's input size, as its first
operation. Resizing is linear and its weights sum to one, so normalising before or after it gives the same
input; and training, evaluation, TTA, ``evaluate`` and ``predict`` all pass through this one resize.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The resampling filters of timm's ``interpolation`` and of Pillow's numbered ones (``resample`` in an image
# processor) that torch can apply to a batch; antialiased, as Pillow resizes, so that a model's own preprocessing
# (timm's create_transform, an image processor) gives the same input up to the rounding to 8 bits.
RESAMPLING = {"bilinear": "bilinear", "bicubic": "bicubic", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class InputSpec:
    """The input a zoo network expects: square images of ``side`` pixels, normalised by ``mean`` and ``std``."""

    side: int
    interpolation: str  # "bilinear" or "bicubic"
    mean: list[float]
    std: list[float]


def resampling(name: object) -> str:
    """A library's interpolation (a name, or Pillow's number) as the mode torch resizes with; bilinear otherwise."""
    return RESAMPLING.get(name if isinstance(name, str) else int(name), "bilinear")


class ZooClassifier(nn.Module):
    """``network`` (a timm or transformers classifier) behind a batched resize to its input size.

    ``head`` names the network's classifier module; ``layer_of`` maps each parameter name of ``network`` to its
    depth (0 for the embeddings, the largest for the head) for layer-wise learning-rate decay; ``no_decay`` names
    the parameters that weight decay must not shrink besides the one-dimensional ones (position embeddings...).
    """

    def __init__(
        self, network: nn.Module, library: str, spec: InputSpec, head: str, layer_of: dict[str, int],
        no_decay: frozenset[str] = frozenset(),
    ):  # fmt: skip
        super().__init__()
        self.network = network
        self.library = library
        self.spec = spec
        self.head_name = head
        self.layer_of = layer_of
        self.no_decay = no_decay

    @property
    def head(self) -> nn.Module:
        return self.network.get_submodule(self.head_name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side = self.spec.side
        if images.shape[-2:] != (side, side):
            images = F.interpolate(
                images, size=(side, side), mode=self.spec.interpolation, align_corners=False, antialias=True
            )
        output = self.network(images)
        return output if isinstance(output, torch.Tensor) else output.logits  # transformers: an output object

    def learning_rate_scales(self, layer_decay: float | None, head_lr_scale: float) -> dict[int, float]:
        """``id(parameter)`` -> its multiple of the learning rate: ``layer_decay ** (depth of the head - its
        depth)`` (timm's and BEiT's layer-wise decay), times ``head_lr_scale`` for the classifier."""
        deepest = max(self.layer_of.values(), default=0)
        head_prefix = self.head_name + "."
        scales = {}
        for name, parameter in self.network.named_parameters():
            scale = layer_decay ** (deepest - self.layer_of.get(name, deepest)) if layer_decay else 1.0
            scales[id(parameter)] = scale * (head_lr_scale if name.startswith(head_prefix) else 1.0)
        return scales

    def decayed(self) -> set[int]:
        """``id(parameter)`` of those weight decay applies to: not biases and norms (one-dimensional), nor
        ``no_decay``, as timm's optimizer factory and the transformers examples fine-tune."""
        return {
            id(parameter) for name, parameter in self.network.named_parameters()
            if parameter.ndim > 1 and name not in self.no_decay
        }  # fmt: skip


LAYER_NUMBER = re.compile(r"\.(?:layers?|blocks|stages|encoder_layers?)\.(\d+)\.")


def layers_by_name(names: list[str], head: str) -> dict[str, int]:
    """Depths for a network whose library has no layer map (transformers): the embeddings 0, the n-th numbered
    block (``...layer.N.``, ``blocks.N``, ``stages.N``) N + 1, the head and what follows the blocks the deepest."""
    numbered = {name: int(match.group(1)) + 1 for name in names if (match := LAYER_NUMBER.search(name))}
    deepest = max(numbered.values(), default=0) + 1
    depths = {}
    for name in names:
        if name in numbered:
            depths[name] = numbered[name]
        elif name.startswith(head + ".") or "embed" not in name:
            depths[name] = deepest
        else:
            depths[name] = 0
    return depths
