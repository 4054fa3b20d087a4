"""Saving and loading a trained model: ``model.safetensors`` beside a ``config.json``.

The config holds everything needed to rebuild and use the network: the architecture
name and its constructor arguments, the class names and the input normalisation.
Every file is written to a temporary sibling and renamed, so a reader never sees half of one.
(Training checkpoints, for resuming, are in ``checkpoint.py``.)
"""

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cifar_accel import __version__
from cifar_accel.errors import UserError
from cifar_accel.models import get_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def write_text(path: str | Path, text: str) -> None:
    """Write through a temporary sibling and a rename, so readers never see half a file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json(path: str | Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def model_config(
    architecture: str, model_args: dict, class_names: list[str], mean: list[float], std: list[float]
) -> dict:
    return {
        "architecture": architecture,
        "model_args": model_args,
        "num_classes": len(class_names),
        "class_names": class_names,
        "mean": mean,
        "std": std,
        "input_size": [3, 32, 32],
        "cifar_accel_version": __version__,
    }


def save_model(model: nn.Module, directory: str | Path, config: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    temporary = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, directory / WEIGHTS_NAME)
    write_json(directory / CONFIG_NAME, config)


def load_model(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the saved network in eval mode; returns it with its config."""
    directory = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise UserError(
                f"{directory / name} not found; pass --model a folder holding {WEIGHTS_NAME} and {CONFIG_NAME}"
            )
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
        model = get_model(config["architecture"], num_classes=config["num_classes"], **config["model_args"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{directory / CONFIG_NAME} is not a cifar_accel model config ({error})") from None
    try:
        state = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{directory / WEIGHTS_NAME} is truncated or corrupt ({error})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise UserError(
            f"weights in {directory} do not match architecture {config['architecture']!r}: {first_line}"
        ) from None
    return model.eval(), config
