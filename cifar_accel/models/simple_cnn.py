"""Seed 002's five-convolution network, without BatchNorm.

Shapes for a 32x32 input: two padded 3x3 convs (3->8->32), pool to 16x16, two more
(32->64->128), pool to 8x8, one unpadded 3x3 conv (128->256) down to 6x6, then a
three-hidden-layer classifier on the 6*6*256 features.
"""

from torch import Tensor, nn

from cifar_accel.models.registry import register_model


def _conv_relu(in_channels: int, out_channels: int, padding: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=padding), nn.ReLU(inplace=True)]


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_relu(3, 8),
            *_conv_relu(8, 32),
            nn.MaxPool2d(2),
            *_conv_relu(32, 64),
            *_conv_relu(64, 128),
            nn.MaxPool2d(2),
            *_conv_relu(128, 256, padding=0),
            nn.Dropout2d(dropout),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(6 * 6 * 256, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))


@register_model
def simple_cnn(num_classes: int = 10, dropout: float = 0.5) -> nn.Module:
    return SimpleCNN(num_classes=num_classes, dropout=dropout)
