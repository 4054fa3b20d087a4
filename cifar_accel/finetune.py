"""Starting a run from published weights (``--init_from``): fine-tuning and linear probing.

The saved model's ``config.json`` names the architecture, so ``--model`` is not needed. Its weights load
strictly, except the classifier layer when the number of classes differs: that one starts afresh. The
run also takes the saved model's input normalisation, which its weights were trained with.
"""

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cifar_accel.checkpoint import saved_base_model
from cifar_accel.errors import UserError
from cifar_accel.hub import download_config, download_model_files
from cifar_accel.hub_access import looks_like_local_path
from cifar_accel.models import classifier_layer
from cifar_accel.saved_model import WEIGHTS_NAME, load_state_strictly, model_folder, read_model_config, read_weights
from cifar_accel.zoo import CIFAR_ACCEL, TIMM, TRANSFORMERS, ZooClassifier, saved_library


@dataclass
class BaseModel:
    """The saved model a run starts from."""

    source: str  # as given: a folder, or a Hub repo id
    # Where its files are: the folder, or the repo's snapshot in the Hugging Face cache; None for one a resumed
    # run's checkpoint recorded (its weights are in the checkpoint).
    folder: Path | None
    config: dict  # its config.json; from a checkpoint, the keys a resumed run uses
    revision: str | None  # the Hub commit it was downloaded at; None for a folder

    @property
    def on_hub(self) -> bool:
        return self.revision is not None

    def record(self) -> dict:
        """What the run folder and the model card say about it."""
        source = self.source if self.on_hub else str(Path(self.source).expanduser().resolve())
        return {"source": source, "revision": self.revision, "architecture": self.config["architecture"],
                "num_classes": self.config["num_classes"]}  # fmt: skip


def find_base_model(source: str, revision: str | None = None) -> BaseModel:
    """A local folder holding a saved model (a run's ``best/``, or the run folder itself), or a Hub repo, through
    the Hugging Face cache (so ``HF_HUB_OFFLINE=1`` works once it is cached)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        folder = model_folder(folder)
        if revision is not None:
            raise UserError(f"--init_revision is for Hub repos; --init_from {source} is a local folder")
        return BaseModel(source, folder, read_model_config(folder), None)
    if looks_like_local_path(source):
        raise UserError(f"--init_from {source}: no such folder")
    folder = download_model_files(source, revision)
    return BaseModel(source, folder, read_model_config(folder), folder.name)  # snapshots/<commit>/


def resumed_base_model(checkpoint: Path, source: str, revision: str | None = None) -> BaseModel:
    """The base model of a fine-tune resumed from ``checkpoint``, as the checkpoint recorded it (its ``record``
    and the input normalisation the run trains with, the base model's): the checkpoint holds every weight, so
    the folder (or Hub repo) the run started from may since have gone or changed. A checkpoint written before
    this was recorded finds ``source`` again."""
    saved = saved_base_model(checkpoint)
    if saved is None:
        return find_base_model(source, revision)
    config = {key: saved[key] for key in ("architecture", "num_classes", "mean", "std")}
    return BaseModel(saved["source"], None, config, saved["revision"])


def hub_model_settings(source: str, revision: str | None = None) -> dict | None:
    """``--init_from`` a model in timm's or transformers' own format (a run of a Hub model saved one): the flags that
    train it (``--model local-dir:...``/``hf-hub:...`` or ``--model_name_or_path``); None for cifar_accel's format."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        folder = model_folder(folder)
        library, where = saved_library(folder), str(folder.resolve())
        if revision is not None and library != CIFAR_ACCEL:
            raise UserError(f"--init_revision is for Hub repos; --init_from {source} is a local folder")
        spelled = {TIMM: {"model": f"local-dir:{where}"}, TRANSFORMERS: {"model_name_or_path": where}}
    elif looks_like_local_path(source):
        return None  # find_base_model says there is no such folder
    else:
        library = saved_library(download_config(source, revision))
        spelled = {TIMM: {"model": f"hf-hub:{source}"}, TRANSFORMERS: {"model_name_or_path": source}}
        spelled = {name: {**flags, "model_revision": revision} for name, flags in spelled.items()}
    return spelled.get(library)


def architecture_settings(settings: dict) -> dict:
    """``settings`` (a recipe's and the flags') with the base model's architecture, refusing a contradiction,
    and its ``--image_size`` unless one is given. A model in a Hub library's format is trained as that library's."""
    hub_model = hub_model_settings(settings["init_from"], settings.get("init_revision"))
    if hub_model is not None:
        kept = {name: value for name, value in settings.items() if name not in ("init_from", "init_revision")}
        if "model" in kept and kept["model"] != hub_model.get("model", kept["model"]):
            raise UserError(f"--model {kept['model']} contradicts --init_from {settings['init_from']}: give one")
        return {**kept, **hub_model}
    base = find_base_model(settings["init_from"], settings.get("init_revision"))
    saved = {"model": base.config["architecture"], "model_args": base.config["model_args"]}
    for name, value in saved.items():
        if name in settings and settings[name] != value:
            raise UserError(
                f"--{name} {settings[name]!r} (asked for, or set by the recipe) contradicts --init_from "
                f"{settings['init_from']}, which holds {name} {value!r}: the saved model sets it"
            )
    if "image_size" not in settings and base.config.get("image_size"):
        saved["image_size"] = base.config["image_size"]  # its resolution, unless another is asked for
    return {**settings, **saved}


def load_base_weights(network: nn.Module, base: BaseModel) -> str | None:
    """The base model's weights into ``network``, strictly. When the number of classes differs, the classifier
    layer keeps its fresh initialisation (any other difference is refused); the note returned says so."""
    path = base.folder / WEIGHTS_NAME
    state = read_weights(path)
    name, classifier = classifier_layer(network)
    note = None
    if classifier.out_features != base.config["num_classes"]:
        fresh = {f"{name}.{key}": tensor for key, tensor in classifier.state_dict().items()}
        state.update({key: tensor for key, tensor in fresh.items() if key in state})
        note = (
            f"note: the classifier layer ({name}) starts afresh: {base.config['num_classes']} classes in "
            f"{base.source}, {classifier.out_features} here"
        )
    load_state_strictly(network, state, path, base.config["architecture"])
    return note


def freeze_backbone(network: nn.Module) -> None:
    """Train only the classifier layer (linear probing): every other parameter stops requiring a gradient, and
    every other module stays in evaluation mode, so BatchNorm keeps the base model's statistics and dropout is off."""
    classifier = network.head if isinstance(network, ZooClassifier) else classifier_layer(network)[1]
    trained = {id(parameter) for parameter in classifier.parameters()}
    for parameter in network.parameters():
        parameter.requires_grad_(id(parameter) in trained)
    for module in network.modules():
        if module is not classifier and not any(True for _ in module.children()):
            module.train = _stays_in_evaluation_mode.__get__(module)
            module.eval()


def _stays_in_evaluation_mode(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)
