"""The saved-model format: ``model.safetensors`` beside a ``config.json``.

The config holds everything needed to rebuild and use the network: the architecture
name and its constructor arguments, the class names and the input preprocessing.
The weights file is the network's own state dict, so it also loads into ``get_model(...)``.
Every file is written through ``files.write_atomically``, so a reader never sees half of one.
(``ImageClassifier`` in ``classifier.py`` is the Hub-facing wrapper around this format;
training checkpoints, for resuming, are in ``checkpoint.py``.)
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms import v2

from cifar_accel import __version__
from cifar_accel.config import IMAGE_SIDE, RANGES
from cifar_accel.errors import UserError
from cifar_accel.files import write_atomically, write_json
from cifar_accel.models import NotBuildable, SideNotTaken, check_buildable, list_models
from cifar_accel.run_files import BEST_MODEL_FOLDER
from cifar_accel.values import is_finite_number, is_whole_number

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
NOT_A_SAVED_MODEL = f"a saved model is a folder holding {WEIGHTS_NAME} and {CONFIG_NAME}"
CONFIG_KEYS = ("architecture", "model_args", "num_classes", "class_names", "mean", "std", "input_size")
CHANNELS = 3  # every image is converted to RGB before it is normalised: one mean and one std per channel


def model_folder(folder: Path) -> Path:
    """The folder of a saved model: ``folder`` itself, or a run folder's ``best/``."""
    if not (folder / CONFIG_NAME).is_file() and (folder / BEST_MODEL_FOLDER / CONFIG_NAME).is_file():
        return folder / BEST_MODEL_FOLDER
    return folder


def model_config(
    architecture: str, model_args: dict, class_names: list[str], mean: list[float], std: list[float],
    image_size: int | None = None,
) -> dict:  # fmt: skip
    """``config.json``: ``image_size`` is set when the model was trained with ``--image_size``."""
    side = image_size or IMAGE_SIDE
    return {
        "architecture": architecture,
        "model_args": model_args,
        "num_classes": len(class_names),
        "class_names": class_names,
        "mean": mean,
        "std": std,
        "input_size": [3, side, side],
        "image_size": image_size,
        "cifar_accel_version": __version__,
    }


def preprocessing(mean: list[float], std: list[float]) -> v2.Transform:
    """uint8 images (N, C, H, W) to the network's input: scale to [0, 1], then normalise.

    Training, evaluation and ``predict`` all use this one transform, so their numbers agree exactly.
    """
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: what ``safetensors.save_file`` needs, from any device."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def save_model(network: nn.Module, directory: str | Path, config: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = on_cpu(network.state_dict())
    write_atomically(directory / WEIGHTS_NAME, lambda temporary: save_file(state, temporary, metadata={"format": "pt"}))
    write_json(directory / CONFIG_NAME, config)


def read_model_config(directory: str | Path) -> dict:
    """The saved ``config.json``, checked to hold every key a model needs, each of the type and in the range
    its readers expect: every command that loads a saved model reads it here, so none of them meets a
    malformed value later (a worker's traceback, a label that is one letter of a string)."""
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found; {NOT_A_SAVED_MODEL}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a cifar_accel model config ({error})") from None
    except OSError as error:  # no read permission, a folder of that name...
        raise UserError(f"{path} cannot be read ({error.strerror or error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a cifar_accel model config (a JSON object is expected, got {config!r:.60})")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise UserError(f"{path} is not a cifar_accel model config (missing {', '.join(missing)})")
    check_model_config(config, path)
    return config


def _invalid(path: Path, field: str, expected: str, value: Any) -> UserError:
    shown = repr(value)
    return UserError(f"{path}: {field} must be {expected}, got {shown if len(shown) <= 80 else shown[:77] + '...'}")


def check_model_config(config: dict, path: Path) -> None:
    """Each field of a config that holds every key: what a malformed one would break is named in the refusal."""
    architecture, model_args = config["architecture"], config["model_args"]
    if not isinstance(architecture, str):
        raise _invalid(path, "architecture", "the name of a model", architecture)
    if architecture not in list_models():  # e.g. saved by a later cifar_accel that has more
        raise _invalid(path, "architecture", f"a model of this cifar_accel, one of: {', '.join(list_models())}",
                       architecture)  # fmt: skip
    if not isinstance(model_args, dict):
        raise _invalid(path, "model_args", "a JSON object of the architecture's arguments", model_args)
    num_classes, class_names = config["num_classes"], config["class_names"]
    if not is_whole_number(num_classes) or num_classes < 1:
        raise _invalid(path, "num_classes", "a whole number of at least 1", num_classes)
    if (
        not isinstance(class_names, list)
        or not all(isinstance(name, str) for name in class_names)
        or len(set(class_names)) != len(class_names)
    ):  # a string would be indexed letter by letter, and two classes of one name could not be told apart
        raise _invalid(path, "class_names", f"a list of {num_classes} distinct strings", class_names)
    if len(class_names) != num_classes:
        raise UserError(f"{path} lists {len(class_names)} class names for {num_classes} classes")
    for field, positive in (("mean", False), ("std", True)):  # std divides: zero or less cannot normalise
        values = config[field]
        if not (
            isinstance(values, list)
            and len(values) == CHANNELS
            and all(is_finite_number(value) and (value > 0 or not positive) for value in values)
        ):
            kind = "positive finite numbers" if positive else "finite numbers"
            raise _invalid(path, field, f"a list of {CHANNELS} {kind} (one per RGB channel)", values)
    image_size = config.get("image_size")  # absent from the configs of models saved before --image_size
    in_range, valid = RANGES["image_size"]
    if image_size is not None and not (is_whole_number(image_size) and in_range(image_size)):
        expected = f"null ({IMAGE_SIDE}x{IMAGE_SIDE} images) or a whole number of {valid}"
        raise _invalid(path, "image_size", expected, image_size)
    side = image_size or IMAGE_SIDE
    if config["input_size"] != [CHANNELS, side, side]:  # derived from image_size: a different one would be ignored
        raise _invalid(path, "input_size", f"[{CHANNELS}, {side}, {side}] (image_size {json.dumps(image_size)})",
                       config["input_size"])  # fmt: skip
    _check_network(config, path, side)


def _check_network(config: dict, path: Path, side: int) -> None:
    """The network the config describes is built, and given images of its side, without memory (meta device):
    arguments it does not take, or a side its classifier does not fit, are refused before any weights load."""
    architecture, model_args = config["architecture"], config["model_args"]
    try:  # every architecture takes 32x32 images; the resnets take any side
        check_buildable(architecture, config["num_classes"], model_args, side if side != IMAGE_SIDE else None)
    except UserError as error:  # an argument the architecture does not take, or a value of the wrong type
        raise UserError(f"{path}: model_args: {error}") from None
    except NotBuildable as error:
        raise UserError(f"{path}: model_args {json.dumps(model_args)} cannot build {architecture} ({error})") from None
    except SideNotTaken as error:
        raise UserError(
            f"{path}: architecture {architecture!r} cannot take {side}x{side} images (image_size {side}; {error})"
        ) from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``model.safetensors``, or a one-line error saying why not."""
    if not path.is_file():
        raise UserError(f"{path} not found; {NOT_A_SAVED_MODEL}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} is truncated or corrupt ({error})") from None


def load_state_strictly(network: nn.Module, state: dict[str, torch.Tensor], path: Path, architecture: str) -> None:
    """A missing, unexpected or differently shaped tensor is an error, never a partial load."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # PyTorch lists every missing and unexpected key, one kind per line: keep the start of each.
        lines = [line.strip() for line in str(error).splitlines()[1:3]]
        details = "; ".join(line if len(line) <= 150 else line[:150] + "..." for line in lines)
        raise UserError(f"weights in {path} do not match architecture {architecture!r}: {details}") from None


def load_weights(network: nn.Module, directory: str | Path, architecture: str) -> None:
    """Load ``model.safetensors`` strictly into ``network``."""
    path = Path(directory) / WEIGHTS_NAME
    load_state_strictly(network, read_weights(path), path, architecture)
