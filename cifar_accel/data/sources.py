"""Opening a dataset (a Hub id, a local copy in the Hub layout, a local image folder) and what is known of where
it came from: the Hub commit it was prepared at and the name its card gives it."""

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import yaml
from datasets import Dataset, DatasetDict, load_dataset

from cifar_accel.errors import UserError
from cifar_accel.hub_access import looks_like_local_path

HUB_UNREACHABLE = (
    "cannot reach the Hugging Face Hub to load {name!r}: pass --dataset PATH to a local copy, "
    "or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache"
)
NOT_CACHED = (
    "{name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: pass --dataset PATH to a local copy, "
    "or unset HF_HUB_OFFLINE where the Hub can be reached"
)


def _hub_is_reachable(timeout_seconds: float = 3.0) -> bool:
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_seconds).close()
        return True
    except OSError:
        return False


def _load(path: str, name: str, config_name: str | None) -> DatasetDict:
    """``load_dataset``, with a dataset of several configs and an unknown config as one-line refusals."""
    try:
        return load_dataset(path, config_name)
    except yaml.YAMLError as error:  # the dataset card's metadata, which datasets reads for the configs
        reason = " ".join(str(error).split())
        raise UserError(f"cannot read dataset {name!r}: its README.md metadata is not valid YAML ({reason})") from None
    except ValueError as error:
        message = str(error)
        if "Config name is missing" not in message and "BuilderConfig" not in message:
            raise
        configs = re.search(r"\[([^\]]*)\]", message)
        choices = configs.group(1).replace("'", "") if configs else "see the dataset's card"
        if config_name is None:
            raise UserError(
                f"dataset {name!r} has several configs; pick one with --dataset_config: {choices}"
            ) from None
        raise UserError(
            f"--dataset_config {config_name!r} is not a config of {name!r}; choose one of: {choices}"
        ) from None


def load_dataset_dict(name: str, config_name: str | None = None) -> DatasetDict:
    """Open a Hub id (with one of its configs), a local copy in the Hub layout, or a local image folder."""
    from huggingface_hub import constants

    from cifar_accel.redaction import redact, redact_log_records

    redact_log_records()  # the Hub client's warnings name the URLs it retries

    path = os.path.expanduser(name)
    if os.path.exists(path):
        try:
            return _load(path, name, config_name)
        except UserError:
            raise
        except (FileNotFoundError, ValueError) as error:
            raise UserError(f"cannot read a dataset from {name!r}: {str(error).splitlines()[0]}") from None
    if looks_like_local_path(name):  # not on disk, and not a Hub id
        raise UserError(f"dataset path {name!r} does not exist; pass --dataset a Hub id or an existing folder")
    offline = constants.HF_HUB_OFFLINE
    # Checked first because the Hub client retries for ~25 s before it gives up.
    if not offline and not _hub_is_reachable():
        raise UserError(HUB_UNREACHABLE.format(name=name))
    try:
        return _load(name, name, config_name)
    except ConnectionError:
        raise UserError((NOT_CACHED if offline else HUB_UNREACHABLE).format(name=name)) from None
    except FileNotFoundError as error:  # DatasetNotFoundError is a FileNotFoundError
        raise UserError(redact(f"dataset {name!r} not found on the Hub or on disk ({error})")) from None


def hub_revision(name: str, split: Dataset) -> str | None:
    """The Hub commit that a Hub dataset id was loaded at: ``datasets`` prepares a Hub dataset under a folder
    named by that commit, offline too (from the cache). None for a local copy, or where it cannot tell."""
    if os.path.exists(os.path.expanduser(name)) or not split.cache_files:
        return None
    folder = Path(split.cache_files[0]["filename"]).parent.name
    return folder if re.fullmatch(r"[0-9a-f]{40}", folder) else None


def pretty_name(name: str, revision: str | None) -> str | None:
    """The dataset card's ``pretty_name``: from a local copy's README.md, or for a Hub id from the card that
    loading it put in the Hugging Face cache (nothing more is downloaded). None where there is none."""
    from huggingface_hub import DatasetCard, hf_hub_download

    path = Path(os.path.expanduser(name))
    try:
        if path.exists():
            readme = path / "README.md"
        else:  # a Hub id (a missing local path was refused when the dataset was loaded)
            readme = hf_hub_download(name, "README.md", repo_type="dataset", revision=revision, local_files_only=True)
        if not Path(readme).is_file():
            return None
        value = DatasetCard.load(readme).data.pretty_name
    except (OSError, ValueError, yaml.YAMLError):  # no card, or no usable metadata: the name is only for people
        return None
    return value if isinstance(value, str) and value.strip() else None
