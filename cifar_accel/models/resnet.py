"""ResNet-18/34 adapted to 32x32 inputs: a 3x3 stride-1 stem and no max-pool.

The four stages keep the ImageNet widths (64, 128, 256, 512); stages 2-4 halve the
resolution, so the last feature map is 4x4 before global average pooling.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from cifar_accel.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # A 1x1 projection when the identity would not match in shape.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: list[int], num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        stages = []
        in_channels = 64
        for index, (width, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage, strict=True)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(BasicBlock(in_channels, width, stride if block_index == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(images)))


@register_model
def resnet18(num_classes: int = 10) -> nn.Module:
    return CifarResNet([2, 2, 2, 2], num_classes=num_classes)


@register_model
def resnet34(num_classes: int = 10) -> nn.Module:
    return CifarResNet([3, 4, 6, 3], num_classes=num_classes)
