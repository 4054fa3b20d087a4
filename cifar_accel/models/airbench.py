"""The airbench networks (Keller Jordan's CIFAR-10 speed-run line, 2024), written for this registry.

whitening 2x2 conv (frozen weights from the data, bias trained briefly) -> GELU -> three groups of
conv-pool-BatchNorm-GELU, conv-BatchNorm-GELU -> 3x3 max-pool -> linear, with the logits scaled by 1/9.
airbench94 has widths 64/256/256 (airbench94_muon the same, its logits scaled by 1/256); airbench96 has
128/512/512 and a third conv per group whose output is added back to the group's first activation (a
residual). BatchNorm has no trainable weight; convolutions start as partial identities. Under mixed
precision, autocast keeps BatchNorm in fp32.
"""

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cifar_accel.models.registry import register_model

WHITENING_KERNEL = 2


def whitening_filters(images: Tensor, eps: float = 5e-4) -> Tensor:
    """2x2 filters that decorrelate the pixels of 2x2 patches, as + and - pairs.

    The eigenvectors of the patch covariance, each scaled by 1/sqrt(eigenvalue), map patches to
    unit-variance uncorrelated features; the negated copies let a following GELU keep both signs.
    """
    channels = images.shape[1]
    patches = images.unfold(2, WHITENING_KERNEL, 1).unfold(3, WHITENING_KERNEL, 1)  # N, C, H', W', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * WHITENING_KERNEL**2)
    # The sum in float32 as airbench does it (a quarter of float64's time on a CPU), the eigenvectors in float64.
    covariance = (patches.T @ patches / len(patches)).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.flip(0)  # largest eigenvalue first
    filters = filters.reshape(-1, channels, WHITENING_KERNEL, WHITENING_KERNEL).float()
    return torch.cat([filters, -filters])


class BatchNormWithoutWeight(nn.BatchNorm2d):
    def __init__(self, num_features: int, momentum: float):
        super().__init__(num_features, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


def identity_init(conv: nn.Conv2d) -> nn.Conv2d:
    """Start the first ``in_channels`` filters as identities, so early training passes signal through."""
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: conv.in_channels])
    return conv


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, batchnorm_momentum: float, residual: bool = False):
        super().__init__()
        self.conv1 = identity_init(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNormWithoutWeight(out_channels, batchnorm_momentum)
        self.conv2 = identity_init(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False))
        self.norm2 = BatchNormWithoutWeight(out_channels, batchnorm_momentum)
        self.activation = nn.GELU()
        self.residual = residual
        if residual:
            self.conv3 = identity_init(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False))
            self.norm3 = BatchNormWithoutWeight(out_channels, batchnorm_momentum)

    def fold_batchnorm(self) -> None:
        """Each BatchNorm folded into the convolution before it (inference mode only). ``norm1`` comes after the
        max-pool, which commutes with a positive per-channel scale: folded only where every scale is positive
        (always, while the frozen weight is 1)."""
        pairs = [("conv1", "norm1"), ("conv2", "norm2")] + [("conv3", "norm3")] * self.residual
        for conv_name, norm_name in pairs:
            norm = getattr(self, norm_name)
            if conv_name == "conv1" and not bool((norm.weight > 0).all()):
                continue
            setattr(self, conv_name, fuse_conv_bn_eval(getattr(self, conv_name), norm))
            setattr(self, norm_name, nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        out = self.activation(self.norm2(self.conv2(x)))
        if self.residual:
            out = x + self.activation(self.norm3(self.conv3(out)))
        return out


class AirbenchNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (64, 256, 256),
        batchnorm_momentum: float = 0.4,
        logit_scale: float = 1 / 9,
        residual: bool = False,
        head_std: float | None = None,
    ):
        super().__init__()
        whitening_width = 2 * 3 * WHITENING_KERNEL**2
        self.whiten = nn.Conv2d(3, whitening_width, WHITENING_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by initialize_whitening
        nn.init.zeros_(self.whiten.bias)  # as airbench starts it
        self.activation = nn.GELU()
        in_widths = (whitening_width, *widths[:-1])
        self.groups = nn.Sequential(
            *(ConvGroup(i, o, batchnorm_momentum, residual) for i, o in zip(in_widths, widths, strict=True))
        )
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        if head_std is not None:
            with torch.no_grad():
                self.head.weight.mul_(head_std / self.head.weight.std())
        self.logit_scale = logit_scale

    @torch.no_grad()
    def initialize_whitening(self, images: Tensor) -> None:
        """Set the frozen whitening filters from normalised training images [N, 3, 32, 32]."""
        self.whiten.weight.copy_(whitening_filters(images.float()))

    @torch.no_grad()
    def folded_for_inference(self) -> "AirbenchNet":
        """A copy in eval mode computing the same logits with its BatchNorm folded into the convolutions:
        one pass fewer over each activation (6% of an evaluation's time on a CPU)."""
        folded = copy.deepcopy(self).eval()
        for group in folded.groups:
            group.fold_batchnorm()
        return folded

    def forward(self, images: Tensor) -> Tensor:
        x = self.groups(self.activation(self.whiten(images)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale


@register_model
def airbench94(num_classes: int = 10, widths: list[int] | None = None) -> nn.Module:
    return AirbenchNet(num_classes=num_classes, widths=tuple(widths or (64, 256, 256)))


@register_model
def airbench94_muon(num_classes: int = 10, widths: list[int] | None = None) -> nn.Module:
    """airbench94's network as airbench94_muon starts it: head weights of standard deviation 1 and
    logits divided by the last width (256) rather than by 9."""
    widths = tuple(widths or (64, 256, 256))
    return AirbenchNet(num_classes=num_classes, widths=widths, logit_scale=1 / widths[-1], head_std=1.0)


@register_model
def airbench96(num_classes: int = 10, widths: list[int] | None = None) -> nn.Module:
    return AirbenchNet(num_classes=num_classes, widths=tuple(widths or (128, 512, 512)), residual=True)
