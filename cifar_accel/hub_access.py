"""Reaching the Hugging Face Hub: what names a repo rather than a folder, and the client's failures as one line.

Shared by the downloads of saved models (``hub``), of Hub model zoo checkpoints (``zoo``) and of datasets.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from cifar_accel.errors import UserError
from cifar_accel.redaction import redact, redact_log_records


def looks_like_local_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a path on disk."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _is_network_error(error: Exception) -> bool:
    # The client's HTTP library has changed across versions (requests, httpx, httpx2): match by module.
    return isinstance(error, ConnectionError) or type(error).__module__.split(".")[0] in (
        "httpx", "httpx2", "requests", "urllib3",
    )  # fmt: skip


@contextmanager
def hub_errors(
    action: str,
    repo_id: str,
    revision: str | None = None,
    filename: str | None = None,
    token: str | None = None,
    missing_file: str = "so it is not a cifar_accel model",
) -> Iterator[None]:
    """Turn the client's exceptions into one line that starts with ``action``, with no secret in it
    (``token``, ``HF_TOKEN``, credentials inside ``HF_ENDPOINT`` or what the server or client echoed)."""
    endpoint = constants.ENDPOINT
    redact_log_records()  # the client's own warnings name the URLs it retries

    def refusal(message: str) -> UserError:
        return UserError(redact(message, token))

    try:
        yield
    except RevisionNotFoundError:
        raise refusal(f"{action}: {repo_id} has no revision {revision!r}") from None
    except GatedRepoError:  # (a kind of RepositoryNotFoundError)
        raise refusal(
            f"{action}: {repo_id} is gated: accept its terms on the Hub ({endpoint}/{repo_id}) with the account "
            "whose token is used"
        ) from None
    except RepositoryNotFoundError:
        raise refusal(
            f"{action}: {repo_id} not found on {endpoint}, or it is private and the token cannot read it"
        ) from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise refusal(
                f"{action}: {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                "unset it where the Hub can be reached, or pass a local folder"
            ) from None
        raise refusal(f"{action}: cannot reach {endpoint}, and {repo_id} is not in the Hugging Face cache") from None
    except EntryNotFoundError:
        raise refusal(f"{action}: {repo_id} has no {filename}, {missing_file}") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        server_says = f" ({error.server_message.splitlines()[0]})" if error.server_message else ""
        if status == 401:
            raise refusal(
                f"{action}: the Hub refused the token (HTTP 401){server_says}; "
                "check --token, HF_TOKEN or `hf auth login`"
            ) from None
        if status == 403:
            raise refusal(f"{action}: permission denied for {repo_id} (HTTP 403){server_says}") from None
        raise refusal(f"{action}: the Hub answered HTTP {status}{server_says}") from None
    except Exception as error:
        if _is_network_error(error):
            raise refusal(f"{action}: cannot reach {endpoint} ({error})") from None
        raise
