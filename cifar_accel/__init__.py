"""cifar_accel: CIFAR-10 training on the Hugging Face stack (datasets, transforms.v2, Accelerate).

``load_model``, ``ImageClassifier``, ``get_model`` and ``list_models`` are imported on first use,
so that command-line ``--help`` does not wait for torch.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "ImageClassifier": "cifar_accel.classifier",
    "load_model": "cifar_accel.classifier",
    "get_model": "cifar_accel.models",
    "list_models": "cifar_accel.models",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cifar_accel' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)
