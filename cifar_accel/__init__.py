"""cifar_accel: CIFAR-10 training on the Hugging Face stack (datasets, transforms.v2, Accelerate)."""

__version__ = "0.1.0"

from cifar_accel.models import get_model, list_models  # noqa: E402

__all__ = ["__version__", "get_model", "list_models"]
