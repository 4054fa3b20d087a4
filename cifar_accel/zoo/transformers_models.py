"""transformers image classifiers: ``AutoModelForImageClassification`` with their ``AutoImageProcessor``.

A saved folder is ``save_pretrained``'s output (``config.json`` with ``id2label``, ``model.safetensors``) and an
image processor (``preprocessor_config.json``) that resizes to the input size the run used, with its resampling,
mean and std, so ``pipeline("image-classification", model=...)`` prepares an image as ``cifar-accel predict`` does.
"""

import inspect
from pathlib import Path

from torch import nn

from cifar_accel.errors import UserError, first_line
from cifar_accel.hub_access import hub_errors
from cifar_accel.zoo.network import InputSpec, ZooClassifier, layers_by_name, resampling
from cifar_accel.zoo.source import TRANSFORMERS, ZooSource, require

PILLOW_FILTERS = {"bilinear": 2, "bicubic": 3}  # Pillow's numbers, which image processors record as ``resample``


def _library():
    transformers = require(TRANSFORMERS)
    # Their load reports and progress bars would be printed by every process; the run says what matters in one line.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _loaded(source: ZooSource, load):
    """``load()``'s result, with transformers' and the Hub's failures in one line."""
    action = f"cannot load {source.flag}"
    with hub_errors(action, source.location, source.revision, missing_file="so it is not a transformers model"):
        try:
            return load()
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{action} ({first_line(error)})") from None


def _head(network: nn.Module) -> str:
    """The classifier: the network's last linear layer (``classifier`` in ViT, ``classifier.1`` in ResNet)."""
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UserError(f"{type(network).__name__} has no linear classifier layer")
    return names[-1]


def _check_loaded(source: ZooSource, info: dict, head: str, strict: bool) -> None:
    """Weights that the checkpoint lacks, or holds in another shape, are refused unless they are the classifier's
    (and then only when it may start afresh): a different network would otherwise train from random layers."""
    missing = set(info.get("missing_keys", ())) | {entry[0] for entry in info.get("mismatched_keys", ())}
    wrong = sorted(key for key in missing if strict or not key.startswith(head + "."))
    if wrong:
        shown = ", ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise UserError(f"cannot load {source.flag}: its weights do not match its config.json ({shown})")


def build(source: ZooSource, class_names: list[str], image_size: int | None, model_args: dict,
          strict: bool = False) -> tuple[ZooClassifier, str]:  # fmt: skip
    """The network with one output per class (a new classifier when the checkpoint has other classes), and the
    note that says which layers start afresh."""
    transformers = _library()
    common = {"revision": source.revision} if source.revision else {}
    labels = {"id2label": dict(enumerate(class_names)), "label2id": {name: i for i, name in enumerate(class_names)}}
    location = str(Path(source.location).expanduser()) if not source.on_hub else source.location
    options = {**common, **labels, **model_args}
    config = _loaded(source, lambda: transformers.AutoConfig.from_pretrained(location, **options))
    auto = transformers.AutoModelForImageClassification
    note = f"note: {source.spelling} starts from random weights (--no-pretrained)"
    if source.pretrained:
        network, info = _loaded(source, lambda: auto.from_pretrained(
            location, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **common
        ))  # fmt: skip
        head = _head(network)
        _check_loaded(source, info, head, strict)
        fresh = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", ())} |
                       {entry[0].rsplit(".", 1)[0] for entry in info.get("mismatched_keys", ())})  # fmt: skip
        verb = "starts" if len(fresh) == 1 else "start"
        note = f"note: {', '.join(fresh)} {verb} afresh: not in {source.spelling} with this shape" if fresh else ""
    else:
        network = _loaded(source, lambda: auto.from_config(config))
        head = _head(network)
    processor = _loaded(source, lambda: transformers.AutoImageProcessor.from_pretrained(location, **common))
    return _wrapped(network, head, processor, image_size), note


def _wrapped(network: nn.Module, head: str, processor, image_size: int | None) -> ZooClassifier:
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    side = size.get("height") or size.get("shortest_edge")
    mean, std = [float(value) for value in processor.image_mean], [float(value) for value in processor.image_std]
    spec = InputSpec(image_size or side, resampling(getattr(processor, "resample", 2)), mean, std)
    names = [name for name, _ in network.named_parameters()]
    model = ZooClassifier(network, TRANSFORMERS, spec, head, layers_by_name(names, head))
    trained_side = getattr(network.config, "image_size", None)
    position_embeddings = "interpolate_pos_encoding" in inspect.signature(network.forward).parameters
    if image_size and position_embeddings and trained_side not in (None, image_size):
        # Its position embeddings would be resampled at every call, which the saved model's own users (pipeline,
        # from_pretrained) do not do: it could not be loaded at that size.
        raise UserError(
            f"--image_size {image_size}: {type(network).__name__} takes {trained_side}x{trained_side} images (its "
            "position embeddings); leave --image_size out, or fine-tune a timm model, which resamples them"
        )
    return model


def load(folder: Path) -> ZooClassifier:
    """A folder that ``save`` (or ``save_pretrained``) wrote, loaded strictly."""
    source = ZooSource(TRANSFORMERS, str(folder), str(folder), False, None, True)
    config = _loaded(source, lambda: _library().AutoConfig.from_pretrained(str(folder)))
    class_names = [config.id2label[index] for index in sorted(config.id2label)]
    model, _ = build(source, class_names, None, {}, strict=True)
    return model


def save(model: ZooClassifier, folder: Path, class_names: list[str]) -> None:
    """``save_pretrained`` output, with an image processor that resizes exactly as the run did."""
    transformers = _library()
    network, spec = model.network, model.spec
    network.config.id2label = dict(enumerate(class_names))
    network.config.label2id = {name: index for index, name in enumerate(class_names)}
    network.save_pretrained(str(folder))
    transformers.ViTImageProcessor(
        do_resize=True, size={"height": spec.side, "width": spec.side}, resample=PILLOW_FILTERS[spec.interpolation],
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=spec.mean, image_std=spec.std,
    ).save_pretrained(str(folder))  # fmt: skip


def class_names(config_json: dict) -> list[str]:
    """``id2label`` of a transformers ``config.json``, in class order."""
    labels = config_json.get("id2label") or {}
    return [str(labels[key]) for key in sorted(labels, key=int)]
