"""ResNet-9, the fast residual network of the DAWNBench CIFAR-10 entries (Myrtle.ai, 2018).

prep (64) -> layer1 (128, pool, + residual of two convs) -> layer2 (256, pool)
-> layer3 (512, pool, + residual) -> global max-pool -> linear. The logits are scaled
down (0.125 by default), which that line of work found to train faster than a plain head.
"""

from torch import Tensor, nn

from cifar_accel.models.registry import register_model


def conv_bn_relu(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, num_classes: int = 10, logit_scale: float = 0.125):
        super().__init__()
        self.prep = conv_bn_relu(3, 64)
        self.layer1 = nn.Sequential(conv_bn_relu(64, 128, pool=True), Residual(128))
        self.layer2 = conv_bn_relu(128, 256, pool=True)
        self.layer3 = nn.Sequential(conv_bn_relu(256, 512, pool=True), Residual(512))
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(512, num_classes, bias=False))
        self.logit_scale = logit_scale

    def forward(self, images: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(images))))
        return self.head(x) * self.logit_scale


@register_model
def resnet9(num_classes: int = 10, logit_scale: float = 0.125) -> nn.Module:
    return ResNet9(num_classes=num_classes, logit_scale=logit_scale)
