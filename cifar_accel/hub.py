"""The Hugging Face Hub: download a saved model's files, publish a finished run.

Every failure becomes a one-line ``UserError`` that says what to do, and nothing local is
written by a push. The token goes to ``huggingface_hub`` and is never printed or saved; every
message and URL given back passes through ``redact``, so credentials inside ``HF_ENDPOINT`` stay hidden.
"""

from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token, hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from cifar_accel.errors import UserError
from cifar_accel.hub_access import hub_errors, looks_like_local_path
from cifar_accel.model_card import build_model_card
from cifar_accel.models import get_model
from cifar_accel.redaction import redact
from cifar_accel.run_files import BEST_MODEL_FOLDER, PLOTS_FOLDER, RESULTS_FILE, RUN_CONFIG_FILE, RUN_FILES_PUBLISHED
from cifar_accel.run_records import read_run_json
from cifar_accel.saved_model import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_model_config
from cifar_accel.zoo import CIFAR_ACCEL, TRANSFORMERS, load_zoo_folder, saved_library

# A transformers model's image processor, saved beside its weights and config.
PROCESSOR_NAME = "preprocessor_config.json"
CARD = "README.md"


def default_dataset_id(run_dir: Path) -> str | None:
    """The run's ``--dataset`` when it is a Hub id; None for a local copy."""
    dataset = read_run_json(run_dir / RUN_CONFIG_FILE)["dataset"]
    return None if looks_like_local_path(dataset) or Path(dataset).expanduser().exists() else dataset


def check_repo_id(repo_id: str, flag: str = "--repo_id") -> None:
    """A repo to publish to is ``USER/NAME`` (or ``ORG/NAME``), so its URL is known before pushing."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        pass
    else:
        if repo_id.count("/") == 1:
            return
    raise UserError(f"{flag} must be USER/NAME or ORG/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}")


def resolve_token(token: str | None = None) -> str:
    """``--token``, else ``HF_TOKEN``, else the token stored by ``hf auth login``."""
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    return token


def download_model_files(repo_id: str, revision: str | None = None, **download_options) -> Path:
    """The folder in the Hugging Face cache holding a repo's ``config.json`` and ``model.safetensors`` (and a
    transformers model's image processor).

    Through the cache: once downloaded, ``HF_HUB_OFFLINE=1`` loads it without the network.
    """
    folder = download_config(repo_id, revision, **download_options)
    extra = (PROCESSOR_NAME,) if saved_library(folder) == TRANSFORMERS else ()
    for filename in (*extra, WEIGHTS_NAME):
        with hub_errors(f"cannot download {repo_id}", repo_id, revision, filename):
            hf_hub_download(repo_id, filename, revision=revision, **download_options)
    return folder


def download_config(repo_id: str, revision: str | None = None, **download_options) -> Path:
    """The folder in the Hugging Face cache where a repo's ``config.json`` now is."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{repo_id!r} is neither a folder holding a saved model nor a valid Hub repo id") from None
    with hub_errors(f"cannot download {repo_id}", repo_id, revision, CONFIG_NAME):
        return Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **download_options)).parent


def check_saved_model(directory: Path) -> str:
    """The weights load, strictly, into the architecture their config names; returns that architecture."""
    library = saved_library(directory)
    if library != CIFAR_ACCEL:
        network, _ = load_zoo_folder(directory, library)
        return f"{library} {type(network.network).__name__}"
    config = read_model_config(directory)
    network = get_model(config["architecture"], num_classes=config["num_classes"], **config["model_args"])
    load_weights(network, directory, config["architecture"])
    return config["architecture"]


def run_upload(run_dir: Path) -> dict[str, Path]:
    """Path in the repo -> local file, for a finished run folder; refuses an unfinished one."""
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass --run_dir the --output_dir of a training run")
    best = run_dir / BEST_MODEL_FOLDER
    saved = [best / name for name in (WEIGHTS_NAME, CONFIG_NAME)]
    if best.is_dir():  # and what a library saves beside them (an image processor); the card is written anew
        saved += sorted(path for path in best.iterdir() if path.is_file() and path not in saved and path.name != CARD)
    files = {
        **{path.name: path for path in saved},
        **{name: run_dir / name for name in RUN_FILES_PUBLISHED},
    }
    results = files[RESULTS_FILE]
    if results.is_file() and "timing" not in read_run_json(results):
        raise UserError(
            f"{run_dir} was trained by an older cifar_accel (its results.json has no timing, the run no summary.csv"
            " or confusion matrix); train it again to publish it"
        )
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run (missing {', '.join(missing)}); train to the end first")
    files.update({f"{PLOTS_FOLDER}/{path.name}": path for path in sorted((run_dir / PLOTS_FOLDER).glob("*.png"))})
    return files


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dataset_id: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """Publish a run's best model with its card, plots and records in one commit; returns the repo URL.

    ``dataset_id`` names the training data in the card; by default the run's ``--dataset`` if it is a Hub id.
    """
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    files = run_upload(run_dir)
    architecture = check_saved_model(run_dir / BEST_MODEL_FOLDER)
    card = build_model_card(run_dir, repo_id, dataset_id or default_dataset_id(run_dir), license)
    token = resolve_token(token)
    operations = [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=str(card).encode())]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    api = HfApi(token=token)
    with hub_errors(f"cannot push to {repo_id}", repo_id, revision, token=token):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {architecture} trained with cifar_accel",
            revision=revision,
        )
    return redact(f"{repo_url}/tree/{revision}" if revision else str(repo_url), token)
