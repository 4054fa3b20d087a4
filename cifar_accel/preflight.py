"""The checks a configuration needs beyond its values: they touch the disk, the installed packages and the Hub.

``engine.train`` runs ``preflight`` after ``TrainConfig.validate``, before anything is loaded or written, so that a
run that cannot finish is refused in one line instead of after hours of training.
"""

import json

from cifar_accel.config import IMAGE_SIDE, TrainConfig
from cifar_accel.errors import UserError
from cifar_accel.files import check_writable_folder
from cifar_accel.hub import check_repo_id, download_config, resolve_token
from cifar_accel.models import NotBuildable, SideNotTaken, check_buildable, list_models
from cifar_accel.reporting import tracker_names
from cifar_accel.zoo import check_folder_library, require, zoo_source


def preflight(config: TrainConfig) -> None:
    """Refuse, naming the flag, what would fail later: an output folder that cannot be written, a model that cannot
    be built, a Hub repo id or token that cannot push, a tracker that is not installed. Nothing is written."""
    check_writable_folder(config.output_dir, "--output_dir")
    check_model(config)
    if config.push_to_hub:
        check_repo_id(config.hub_model_id, "--hub_model_id")
        resolve_token()  # refused now rather than after hours of training
    if config.report_to != "none":
        tracker_names(config.report_to)


def check_model(config: TrainConfig) -> None:
    """Build the network without memory (meta device), so bad --model_args are refused before any work. A Hub model
    is built with the data's classes once they are known; here its library must be installed, and a folder hold it."""
    if source := zoo_source(config):
        require(source.library)
        check_folder_library(source)
        if source.on_hub:  # the repo and revision exist (its config.json, into the Hugging Face cache)
            download_config(source.location, source.revision)
        return
    if config.model not in list_models():
        raise UserError(f"unknown model {config.model!r}; choose one of: {', '.join(list_models())}")
    side = config.image_side if config.image_side != IMAGE_SIDE else None
    model_args = json.dumps(config.model_args)
    try:
        check_buildable(config.model, 10, config.model_args, side)
    except UserError as error:  # an argument the model does not take
        raise UserError(f"--model_args {model_args}: {error}") from None
    except NotBuildable as error:
        raise UserError(f"--model_args {model_args}: {config.model} cannot be built ({error})") from None
    except SideNotTaken as error:
        raise UserError(
            f"--model {config.model} cannot take {side}x{side} images ({error}); the resnets take any --image_size"
        ) from None
