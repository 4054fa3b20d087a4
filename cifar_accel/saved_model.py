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

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms import v2

from cifar_accel import __version__
from cifar_accel.config import IMAGE_SIDE
from cifar_accel.errors import UserError
from cifar_accel.files import write_atomically, write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
NOT_A_SAVED_MODEL = f"a saved model is a folder holding {WEIGHTS_NAME} and {CONFIG_NAME}"
BEST_MODEL_FOLDER = "best"  # where a run folder keeps its saved model
CONFIG_KEYS = ("architecture", "model_args", "num_classes", "class_names", "mean", "std", "input_size")


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
    """The saved ``config.json``, checked to hold every key a model needs."""
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found; {NOT_A_SAVED_MODEL}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a cifar_accel model config ({error})") from None
    missing = [key for key in CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise UserError(f"{path} is not a cifar_accel model config (missing {', '.join(missing)})")
    if config["num_classes"] != len(config["class_names"]):
        raise UserError(f"{path} lists {len(config['class_names'])} class names for {config['num_classes']} classes")
    return config


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
