"""timm networks: built with ``timm.create_model``, saved with ``timm.models.save_for_hf``.

A saved folder's ``config.json`` has the ``pretrained_cfg`` of the preprocessing the run used (input size,
interpolation, ``crop_pct`` 1.0, mean, std), so timm's own ``resolve_model_data_config`` and
``create_transform`` prepare an image as ``cifar-accel predict`` does, and ``label_names`` for the classes.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open
from torch import nn

from cifar_accel.errors import UserError, first_line
from cifar_accel.hub_access import hub_errors
from cifar_accel.saved_model import WEIGHTS_NAME, on_cpu
from cifar_accel.zoo.network import InputSpec, ZooClassifier, resampling
from cifar_accel.zoo.source import TIMM, ZooSource, require


def _timm_name(source: ZooSource) -> str:
    if not source.on_hub:
        return f"local-dir:{Path(source.location).expanduser()}"
    return f"hf-hub:{source.location}" + (f"@{source.revision}" if source.revision else "")


def _create(source: ZooSource, pretrained: bool, model_args: dict, **options) -> nn.Module:
    """``timm.create_model``, its failures in one line (the Hub's through ``hub_errors``)."""
    timm = require(TIMM)
    action = f"cannot load {source.flag}"
    with hub_errors(action, source.location, source.revision, missing_file="so it is not a timm model"):
        try:
            return timm.create_model(_timm_name(source), pretrained=pretrained, **model_args, **options)
        except RuntimeError as error:  # load_state_dict: weights of another shape than config.json's network
            if "state_dict" in str(error):
                raise UserError(f"{action}: its weights do not match its config.json ({first_line(error)})") from None
            raise UserError(f"{action} ({first_line(error)})") from None
        except (TypeError, ValueError, KeyError, FileNotFoundError, AssertionError) as error:
            raise UserError(f"{action} ({first_line(error)})") from None


def build(source: ZooSource, num_classes: int, image_size: int | None, model_args: dict) -> tuple[ZooClassifier, str]:
    """The network with ``num_classes`` outputs (a new classifier when the checkpoint has another number) and the
    note that says which layers start afresh."""
    options = {"num_classes": num_classes}
    if image_size:  # a transformer's position embeddings are resampled by timm; a convnet takes any size
        options["img_size"] = image_size
    try:
        network = _create(source, source.pretrained, model_args, **options)
    except UserError as error:
        if not image_size or "img_size" not in str(error):
            raise
        del options["img_size"]  # a network that takes any input size has no such argument
        network = _create(source, source.pretrained, model_args, **options)
    head = network.pretrained_cfg.get("classifier") or "fc"
    if source.pretrained and not source.on_hub:
        _check_complete(source, network, head)
    saved_classes = network.pretrained_cfg.get("num_classes")
    note = ""
    if not source.pretrained:
        note = f"note: {source.spelling} starts from random weights (--no-pretrained)"
    elif saved_classes != num_classes:
        note = (
            f"note: the classifier ({head}) starts afresh: {saved_classes} classes in {source.spelling}, "
            f"{num_classes} here"
        )
    return _wrapped(network, image_size), note


def _check_complete(source: ZooSource, network: nn.Module, head: str) -> None:
    """The folder's weights hold every tensor of the network but the classifier, and no other (shapes are checked
    by ``load_state_dict``, after the model's own filter has adapted what it can, e.g. position embeddings). timm
    loads a checkpoint of another number of classes non-strictly: layers that config.json describes and the weights
    lack would silently start from random values, and weights it does not describe would be dropped. (Checked for
    folders, whose weights timm saved as they are; a Hub checkpoint may be in its original layout, which the model's
    own filter maps when timm loads it.)"""
    path = Path(source.location).expanduser() / WEIGHTS_NAME
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as weights:
        saved = set(weights.keys())
    differing = sorted(name for name in saved ^ network.state_dict().keys() if not name.startswith(head + "."))
    if differing:
        shown = ", ".join(differing[:4]) + (f" and {len(differing) - 4} more" if len(differing) > 4 else "")
        raise UserError(f"cannot load {source.flag}: its weights do not match its config.json ({shown})")


def _wrapped(network: nn.Module, image_size: int | None) -> ZooClassifier:
    timm = require(TIMM)
    data = timm.data.resolve_model_data_config(network)
    spec = InputSpec(image_size or data["input_size"][-1], resampling(data["interpolation"]),
                     [float(value) for value in data["mean"]], [float(value) for value in data["std"]])  # fmt: skip
    head = network.pretrained_cfg.get("classifier") or "fc"
    if hasattr(network, "group_matcher"):
        layer_of = timm.models.group_parameters(network, network.group_matcher(coarse=False), reverse=True)
    else:
        layer_of = timm.optim.auto_group_layers(network)
    # Position embeddings, class tokens: what timm's optimizer factory keeps from weight decay.
    no_decay = frozenset(network.no_weight_decay()) if hasattr(network, "no_weight_decay") else frozenset()
    return ZooClassifier(network, TIMM, spec, head, layer_of, no_decay)


def load(folder: Path) -> ZooClassifier:
    """A folder that ``save`` (or timm's ``save_for_hf``) wrote, loaded strictly by timm."""
    return _wrapped(_create(ZooSource(TIMM, f"local-dir:{folder}", str(folder), False, None, True), True, {}), None)


def save(model: ZooClassifier, folder: Path, class_names: list[str]) -> None:
    """timm's own format, its ``pretrained_cfg`` describing exactly the preprocessing the run used."""
    timm = require(TIMM)
    spec = model.spec
    data_config = {"input_size": (3, spec.side, spec.side), "interpolation": spec.interpolation, "crop_pct": 1.0,
                   "crop_mode": "center", "mean": tuple(spec.mean), "std": tuple(spec.std)}  # fmt: skip
    with _contiguous_state_dict(model.network):
        timm.models.save_for_hf(
            model.network, str(folder), model_config={"label_names": list(class_names)}, safe_serialization=True,
            data_config=data_config,
        )  # fmt: skip


@contextmanager
def _contiguous_state_dict(network: nn.Module) -> Iterator[None]:
    """timm's saver writes ``network.state_dict()`` as it is, and safetensors refuses the strided tensors of
    channels_last weights: while it saves, the state dict is contiguous CPU copies (the network is unchanged)."""
    state_dict = network.state_dict
    network.state_dict = lambda *args, **kwargs: on_cpu(state_dict(*args, **kwargs))
    try:
        yield
    finally:
        del network.state_dict


def class_names(config_json: dict) -> list[str]:
    """``label_names`` of a timm ``config.json``, or the class numbers when it has none (e.g. ImageNet's)."""
    names = config_json.get("label_names")
    if isinstance(names, dict):
        names = [names[key] for key in sorted(names, key=int)]
    return [str(name) for name in names] if names else [str(index) for index in range(config_json["num_classes"])]
