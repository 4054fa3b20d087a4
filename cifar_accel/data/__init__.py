"""Data: a ``datasets`` split in, augmented and normalised batches out.

``load_data(config)`` resolves the dataset, its image/label columns, class names, splits
and normalisation statistics; ``make_dataloader`` wraps one split in a ``DataLoader`` whose
torchvision ``transforms.v2`` pipeline runs on the fly in worker processes.

The modules, each importing only those listed before it:

- ``sources``: opening a Hub id, a local copy in the Hub layout or an image folder;
- ``splits``: columns, classes and labels checked, random subsets;
- ``decode_cache``: images decoded to uint8 tensors once, then read from the on-disk cache;
- ``loading``: ``load_data``/``load_evaluation_data`` and the ``DataBundle`` they return;
- ``loaders``: ``make_dataloader``, its collation and its worker processes.

The old module's public names are re-exported here, so that ``from cifar_accel.data import ...`` still works.
"""

from cifar_accel.data.decode_cache import cache_directory, decode_split, decode_splits
from cifar_accel.data.loaders import (
    BatchCollator,
    default_num_workers,
    first_images,
    make_dataloader,
    measure_loader_throughput,
)
from cifar_accel.data.loading import DataBundle, compute_mean_std, content_digest, load_data, load_evaluation_data
from cifar_accel.data.sources import HUB_UNREACHABLE, NOT_CACHED, hub_revision, load_dataset_dict, pretty_name
from cifar_accel.data.splits import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    SHOWN_DIFFERENCES,
    SUBSET_SEED,
    check_labels,
    check_model_classes,
    class_names_of,
    classes_without_examples,
    detect_column,
    image_column_of,
    random_subset,
)

__all__ = [
    "HUB_UNREACHABLE",
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "NOT_CACHED",
    "SHOWN_DIFFERENCES",
    "SUBSET_SEED",
    "BatchCollator",
    "DataBundle",
    "cache_directory",
    "check_labels",
    "check_model_classes",
    "class_names_of",
    "classes_without_examples",
    "compute_mean_std",
    "content_digest",
    "decode_split",
    "decode_splits",
    "default_num_workers",
    "detect_column",
    "first_images",
    "hub_revision",
    "image_column_of",
    "load_data",
    "load_dataset_dict",
    "load_evaluation_data",
    "make_dataloader",
    "measure_loader_throughput",
    "pretty_name",
    "random_subset",
]
