"""Seed 004's BatchNorm CNN: three conv blocks, then a 4096->1024->512 classifier.

Each block is conv-BN-ReLU, conv-ReLU, max-pool (channels 32/64, 128/128, 256/256),
so a 32x32 input leaves the last block as 256x4x4 = 4096 features.
"""

from torch import Tensor, nn

from cifar_accel.models.registry import register_model


def _block(in_channels: int, middle_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, middle_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(middle_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(middle_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]


class BatchNormCNN(nn.Module):
    def __init__(self, num_classes: int = 10, conv_dropout: float = 0.05, fc_dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            *_block(3, 32, 64),
            *_block(64, 128, 128),
            nn.Dropout2d(conv_dropout),
            *_block(128, 256, 256),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(fc_dropout),
            nn.Linear(4096, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(fc_dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))


@register_model
def bn_cnn(num_classes: int = 10, conv_dropout: float = 0.05, fc_dropout: float = 0.1) -> nn.Module:
    return BatchNormCNN(num_classes=num_classes, conv_dropout=conv_dropout, fc_dropout=fc_dropout)
