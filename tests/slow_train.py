"""``train.py`` with one more model, ``slow_bn_cnn``: seed 004's BatchNorm CNN whose steps take
``CIFAR_ACCEL_TEST_STEP_SECONDS`` (default 0) longer, half in the forward pass and half in the backward,
spread over its convolutions. Steps slower than a launcher's grace, as a CPU's are, without the CPU time.
A Hub model's training step (``zoo.ZooClassifier``) takes as much longer, in its forward pass: long enough
to be killed in the middle of a tiny run.

Launched by tests/test_stop_signals.py as ``accelerate launch tests/slow_train.py ...``.
"""

import os
import time

import torch
from torch import Tensor, nn

from cifar_accel.cli import train_main
from cifar_accel.models import register_model
from cifar_accel.models.bn_cnn import BatchNormCNN
from cifar_accel.zoo import ZooClassifier

STEP_SECONDS_VARIABLE = "CIFAR_ACCEL_TEST_STEP_SECONDS"


def _pause(pauses: int) -> None:
    time.sleep(float(os.environ.get(STEP_SECONDS_VARIABLE, "0")) / (2 * pauses))


class _PauseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images: Tensor, pauses: int) -> Tensor:
        ctx.pauses = pauses
        return images.clone()  # a new tensor: the in-place ReLU that may follow must not modify a view

    @staticmethod
    def backward(ctx, gradient: Tensor) -> tuple[Tensor, None]:
        _pause(ctx.pauses)
        return gradient, None


class Pause(nn.Module):
    """The identity, taking its share of the step's extra time in each pass while training."""

    def __init__(self, pauses: int):
        super().__init__()
        self.pauses = pauses

    def forward(self, images: Tensor) -> Tensor:
        if not self.training:
            return images
        _pause(self.pauses)
        return _PauseInBackward.apply(images, self.pauses)


@register_model
def slow_bn_cnn(num_classes: int = 10) -> nn.Module:
    model = BatchNormCNN(num_classes=num_classes)
    convolutions = sum(isinstance(layer, nn.Conv2d) for layer in model.features)
    layers = []
    for layer in model.features:
        layers.append(layer)
        if isinstance(layer, nn.Conv2d):
            layers.append(Pause(convolutions))
    model.features = nn.Sequential(*layers)
    return model


_hub_model_forward = ZooClassifier.forward


def _slow_hub_model_forward(self: ZooClassifier, images: Tensor) -> Tensor:
    if self.training:
        _pause(1)
        _pause(1)
    return _hub_model_forward(self, images)


ZooClassifier.forward = _slow_hub_model_forward

if __name__ == "__main__":
    train_main()
