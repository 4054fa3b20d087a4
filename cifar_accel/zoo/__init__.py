"""The Hub's model zoo: timm and transformers image classifiers, trained here and handed back in their own format.

``zoo_source(config)`` says whether a run trains one; ``build_zoo_model`` builds it (a new classifier for the
dataset's classes), ``save_zoo_model`` writes the library's own saved format, ``load_zoo_folder`` reads it back.
"""

import os
import shutil
from pathlib import Path

from cifar_accel.zoo import timm_models, transformers_models
from cifar_accel.zoo.network import InputSpec, ZooClassifier
from cifar_accel.zoo.source import (
    CIFAR_ACCEL,
    TIMM,
    TRANSFORMERS,
    ZooSource,
    check_folder_library,
    folder_library,
    read_config_json,
    require,
    saved_library,
    zoo_source,
)

FAMILIES = {TIMM: timm_models, TRANSFORMERS: transformers_models}

__all__ = [
    "CIFAR_ACCEL",
    "TIMM",
    "TRANSFORMERS",
    "InputSpec",
    "ZooClassifier",
    "build_zoo_model",
    "check_folder_library",
    "folder_summary",
    "load_zoo_folder",
    "require",
    "save_zoo_model",
    "saved_config",
    "saved_library",
    "zoo_source",
]


def build_zoo_model(
    source: ZooSource, class_names: list[str], image_size: int | None = None, model_args: dict | None = None
) -> tuple[ZooClassifier, str]:
    """The network for ``class_names``, and a note naming the layers that start afresh ("" when none do)."""
    check_folder_library(source)
    if source.library == TIMM:
        return timm_models.build(source, len(class_names), image_size, model_args or {})
    return transformers_models.build(source, class_names, image_size, model_args or {})


def load_zoo_folder(folder: Path, library: str) -> tuple[ZooClassifier, list[str]]:
    """A saved timm or transformers folder, loaded strictly by its library, and its class names."""
    return FAMILIES[library].load(folder), FAMILIES[library].class_names(read_config_json(folder))


def save_zoo_model(model: ZooClassifier, folder: Path, class_names: list[str]) -> None:
    """``folder`` in the library's own format. Written beside it first, then each file moved in whole
    (``os.replace``), so that a reader never sees half of one."""
    folder = Path(folder)
    staging = folder.parent / f".{folder.name}.saving"
    shutil.rmtree(staging, ignore_errors=True)
    FAMILIES[model.library].save(model, staging, class_names)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, folder / path.name)
    staging.rmdir()


def folder_summary(folder: Path) -> dict:
    """A saved timm or transformers folder's library, architecture and classes, read from its config alone."""
    config_json = read_config_json(folder)
    library = folder_library(config_json)
    architecture = config_json["architecture"] if library == TIMM else (config_json.get("architectures") or ["?"])[0]
    class_names = FAMILIES[library].class_names(config_json)
    return {"library": library, "architecture": architecture, "class_names": class_names,
            "num_classes": len(class_names)}  # fmt: skip


def saved_config(model: ZooClassifier, class_names: list[str]) -> dict:
    """What cifar_accel's loaders and ``predict`` read from a saved model's config (``saved_model.model_config``'s
    keys): the images stay at the dataset's size (``image_size`` None) and the network resizes them itself."""
    spec = model.spec
    return {
        "architecture": f"{model.library}:{type(model.network).__name__}",
        "library": model.library,
        "model_args": {},
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "mean": spec.mean,
        "std": spec.std,
        "input_size": [3, spec.side, spec.side],
        "image_size": None,
    }
