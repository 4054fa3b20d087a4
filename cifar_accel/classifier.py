"""The published model: a registry network with its class names and preprocessing.

``ImageClassifier`` follows ``huggingface_hub``'s ``PyTorchModelHubMixin`` conventions:
``save_pretrained`` writes ``model.safetensors``, ``config.json`` and a ``README.md`` card,
``from_pretrained`` reads a folder or a Hub repo, ``push_to_hub`` publishes.
``load_model(repo_id_or_path)`` is the same loader with one-line errors, and ``predict`` turns
images into class names with probabilities.
"""

from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from cifar_accel.errors import UserError
from cifar_accel.hub import download_model_files
from cifar_accel.hub_access import looks_like_local_path
from cifar_accel.images import resized, to_rgb
from cifar_accel.models import get_model
from cifar_accel.saved_model import (
    load_weights,
    model_config,
    model_folder,
    preprocessing,
    read_model_config,
    save_model,
)
from cifar_accel.zoo import CIFAR_ACCEL, ZooClassifier, load_zoo_folder, save_zoo_model, saved_config, saved_library

ImageInput = Image.Image | np.ndarray | torch.Tensor


class ImageClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="cifar-accel",
    pipeline_tag="image-classification",
    tags=["image-classification", "cifar-accel"],
):
    """``forward`` takes preprocessed batches (as in training); ``predict`` takes raw images.

    The constructor's arguments are ``config.json``'s keys (``input_size``, 3 x side x side, is recorded there).
    ``image_size``: the side of a model trained with ``--image_size``; its evaluation resizes images too.
    """

    def __init__(
        self,
        architecture: str,
        num_classes: int,
        class_names: list[str],
        mean: list[float],
        std: list[float],
        model_args: dict | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        if num_classes != len(class_names):
            raise UserError(f"{len(class_names)} class names given for {num_classes} classes")
        model_args = model_args or {}
        self.network = get_model(architecture, num_classes=num_classes, **model_args)
        self.config = model_config(architecture, model_args, class_names, mean, std, image_size)
        self.preprocess = preprocessing(mean, std)

    @classmethod
    def around(cls, network: ZooClassifier, class_names: list[str]) -> "ImageClassifier":
        """A Hub model zoo network (timm, transformers) with its class names and its own preprocessing."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.network = network
        model.config = saved_config(network, class_names)
        model.preprocess = preprocessing(network.spec.mean, network.spec.std)
        return model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    @torch.inference_mode()
    def predict(self, images: ImageInput | list[ImageInput], top_k: int = 5, batch_size: int = 256) -> list:
        """Class names with probabilities, most likely first: ``[{"label": "cat", "score": 0.91}, ...]``.

        ``images``: a PIL image, an ``H x W x C`` uint8 array or a ``C x H x W`` tensor (uint8, or float
        in [0, 1]) gives one such list; a list of them, an ``N x H x W x C`` array or an ``N x C x H x W``
        tensor gives a list of lists. Images are converted to RGB and resized to the input size if needed,
        then scaled and normalised exactly as in training and ``cifar-accel evaluate``.
        """
        if top_k < 1:
            raise UserError(f"top_k must be at least 1, got {top_k}")
        single = isinstance(images, Image.Image) or (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim in (2, 3)
        )
        batch = [self._to_uint8_tensor(image) for image in ([images] if single else images)]
        device = next(self.parameters()).device
        names = self.config["class_names"]
        was_training = self.training
        self.eval()
        predictions = []
        for start in range(0, len(batch), batch_size):
            logits = self(self.preprocess(torch.stack(batch[start : start + batch_size])).to(device))
            scores, indices = logits.float().softmax(dim=1).topk(min(top_k, len(names)), dim=1)
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
                ranked = zip(row_scores, row_indices, strict=True)
                predictions.append([{"label": names[index], "score": score} for score, index in ranked])
        self.train(was_training)
        return predictions[0] if single else predictions

    def _to_uint8_tensor(self, image: ImageInput) -> torch.Tensor:
        """One image as a ``3 x H x W`` tensor of the model's input size."""
        if isinstance(image, Image.Image):
            tensor = v2.functional.pil_to_tensor(to_rgb(image, "an image passed to predict"))  # as training reads it
        elif isinstance(image, np.ndarray):
            array = image[:, :, None] if image.ndim == 2 else image
            tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            tensor = image[None] if image.ndim == 2 else image
        else:
            raise UserError(f"predict takes PIL images, numpy arrays or tensors, not {type(image).__name__}")
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
            raise UserError(f"an image must have 1 or 3 channels; got shape {tuple(tensor.shape)}")
        tensor = tensor.expand(3, -1, -1)
        interpolation = self.network.spec.interpolation if isinstance(self.network, ZooClassifier) else "bilinear"
        return resized(tensor, *self.config["input_size"][1:], interpolation)

    # PyTorchModelHubMixin hooks: one file format and one loader for every entry point.
    def _save_pretrained(self, save_directory: Path) -> None:
        if isinstance(self.network, ZooClassifier):  # in its library's own format
            save_zoo_model(self.network, save_directory, self.config["class_names"])
        else:
            save_model(self.network, save_directory, self.config)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        **config_values,
    ) -> "ImageClassifier":
        # The mixin passes the config values it has read; load_model reads and checks them itself,
        # and always loads strictly (the mixin's default is not strict).
        model = load_model(
            model_id, revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token,
        )  # fmt: skip
        return model.to(map_location)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The card of a bare ``save_pretrained``; a trained run writes the full card (``model_card.py``)."""
        from cifar_accel.model_card import minimal_model_card

        return minimal_model_card(self.config)


def load_model(repo_id_or_path: str | Path, revision: str | None = None, **download_options) -> ImageClassifier:
    """A saved model in eval mode, from a local folder (a run folder stands for its ``best/``) or a Hub repo
    (through the Hugging Face cache): cifar_accel's format, or timm's or transformers' own (a Hub model's run).

    Loading is strict: weights that do not fit the configured architecture are an error.
    """
    folder = Path(repo_id_or_path).expanduser()
    if not folder.is_dir():
        if looks_like_local_path(str(repo_id_or_path)):
            raise UserError(f"model folder {repo_id_or_path} does not exist")
        folder = download_model_files(str(repo_id_or_path), revision, **download_options)
    elif revision is not None:
        raise UserError(f"--revision is for Hub repos; {repo_id_or_path} is a local folder")
    else:
        folder = model_folder(folder)
    library = saved_library(folder)
    if library != CIFAR_ACCEL:
        network, class_names = load_zoo_folder(folder, library)
        return ImageClassifier.around(network, class_names).eval()
    config = read_model_config(folder)
    model = ImageClassifier(**{key: config[key] for key in ImageClassifier._hub_mixin_init_parameters if key in config})
    load_weights(model.network, folder, config["architecture"])
    return model.eval()
