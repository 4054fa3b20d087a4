"""Models for 32x32 images, built by name: ``get_model("resnet18", num_classes=10)``.

Each family lives in its own file and registers its builders on import.
"""

from cifar_accel.models import airbench, bn_cnn, resnet, resnet9, simple_cnn  # noqa: F401  (registers the models)
from cifar_accel.models.registry import (
    NotBuildable,
    SideNotTaken,
    check_buildable,
    classifier_layer,
    get_model,
    list_models,
    register_model,
)

__all__ = [
    "NotBuildable", "SideNotTaken", "check_buildable", "classifier_layer", "get_model", "list_models", "register_model",
]  # fmt: skip
