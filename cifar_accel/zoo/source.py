"""Where a Hub model zoo network comes from, and which library a saved model folder belongs to.

timm models are named as timm names them (``hf-hub:OWNER/REPO``, ``local-dir:PATH``, and ``timm/NAME`` for
``hf-hub:timm/NAME``); transformers models by a repo id or a folder (``--model_name_or_path``). Both
libraries are optional extras: a missing one is a one-line error naming its install command.
"""

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from cifar_accel.config import TrainConfig
from cifar_accel.errors import UserError
from cifar_accel.hub_access import looks_like_local_path
from cifar_accel.saved_model import CONFIG_NAME

TIMM, TRANSFORMERS, CIFAR_ACCEL = "timm", "transformers", "cifar_accel"


@dataclass(frozen=True)
class ZooSource:
    """A timm or transformers checkpoint to build a network from."""

    library: str  # TIMM or TRANSFORMERS
    spelling: str  # as the user wrote it, for messages
    location: str  # a Hub repo id, or a local folder
    on_hub: bool
    revision: str | None  # a branch, tag or commit of a Hub repo
    pretrained: bool  # load the checkpoint's weights (else only its architecture and preprocessing)

    @property
    def flag(self) -> str:
        """The flag that names it, as typed."""
        option = "--model_name_or_path" if self.library == TRANSFORMERS else "--model"
        return f"{option} {self.spelling}"

    def record(self) -> dict:
        """What the run folder and the model card say about it (the ``base_model`` of a card when on the Hub)."""
        location = self.location if self.on_hub else str(Path(self.location).expanduser().resolve())
        return {"library": self.library, "source": location, "on_hub": self.on_hub, "revision": self.revision,
                "pretrained": self.pretrained}  # fmt: skip


def zoo_source(config: TrainConfig) -> ZooSource | None:
    """The Hub model a run trains, or None for one of cifar_accel's own architectures."""
    if config.model_name_or_path:
        return _source(TRANSFORMERS, config.model_name_or_path, config.model_name_or_path, config)
    model = config.model
    if model.startswith("timm/"):
        return _source(TIMM, model, model, config, on_hub=True)
    for prefix, on_hub in (("hf-hub:", True), ("local-dir:", False)):
        if model.startswith(prefix):
            return _source(TIMM, model, model.removeprefix(prefix), config, on_hub)
    return None


def _source(library: str, spelling: str, location: str, config: TrainConfig, on_hub: bool | None = None) -> ZooSource:
    revision = config.model_revision
    if library == TIMM and on_hub and "@" in location:  # timm's own spelling of a revision: hf-hub:REPO@REVISION
        location, _, named = location.partition("@")
        if revision and revision != named:
            raise UserError(f"--model {spelling} names revision {named!r} and --model_revision {revision!r}: give one")
        revision = named
    if on_hub is None:  # transformers: a folder if there is one, as from_pretrained decides
        on_hub = not Path(location).expanduser().is_dir()
        if on_hub and looks_like_local_path(location):
            raise UserError(f"--model_name_or_path {spelling}: no such folder")
    if not location.strip():
        raise UserError(f"{spelling!r} names no model after its prefix")
    if not on_hub and revision:
        raise UserError(f"--model_revision is for Hub repos; {spelling} is a local folder")
    return ZooSource(library, spelling, location, on_hub, revision, config.pretrained)


def require(library: str) -> ModuleType:
    """The library, imported; a one-line error naming the install command when it is missing."""
    try:
        return importlib.import_module(library)
    except ImportError:
        raise UserError(
            f'{library} is not installed: pip install "cifar-accel[{library}]" (or pip install {library})'
        ) from None


def folder_library(config_json: dict) -> str:
    """The library whose format a saved model's ``config.json`` is in: timm's ``save_for_hf`` writes a
    ``pretrained_cfg``, transformers' ``save_pretrained`` a ``model_type``; cifar_accel's own has neither."""
    if "pretrained_cfg" in config_json:
        return TIMM
    if "model_type" in config_json:
        return TRANSFORMERS
    return CIFAR_ACCEL


def saved_library(folder: Path) -> str:
    """The library of the saved model in ``folder``; cifar_accel's when its ``config.json`` cannot be read, so that
    cifar_accel's own reader refuses it, naming what is wrong."""
    try:
        config_json = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return CIFAR_ACCEL
    return folder_library(config_json) if isinstance(config_json, dict) else CIFAR_ACCEL


def read_config_json(folder: Path) -> dict:
    """A saved model folder's ``config.json``, as a dict, or a one-line error."""
    path = folder / CONFIG_NAME
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} holds no config.json: it is not a saved model") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read as JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} is not a model config (a JSON object is expected)")
    return loaded


def how_to_load(library: str, folder: str) -> str:
    """The flag that trains from a saved model folder of ``library``."""
    return {TIMM: f"--model local-dir:{folder}", TRANSFORMERS: f"--model_name_or_path {folder}",
            CIFAR_ACCEL: f"--init_from {folder}"}[library]  # fmt: skip


def check_folder_library(source: ZooSource) -> None:
    """A local folder named as a timm (or transformers) model must hold one; the refusal names the flag that
    loads what it does hold."""
    if source.on_hub:
        return
    folder = Path(source.location).expanduser()
    if not folder.is_dir():
        raise UserError(f"{source.flag}: no such folder")
    held = folder_library(read_config_json(folder))
    if held != source.library:
        raise UserError(
            f"{source.flag}: {folder} holds a {held} model, not a {source.library} one; "
            f"use {how_to_load(held, str(folder))}"
        )
