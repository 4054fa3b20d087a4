"""The stand-in Hub (tests/hub_server.py) against huggingface_hub's real client."""

import json
import os

import huggingface_hub
import pytest
from hub_server import StandInHub
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

ALICE = "hf_alice_write"
BOB = "hf_bob_write"
CONFIG = json.dumps({"model": "resnet18", "num_classes": 10}).encode()


@pytest.fixture
def hub(monkeypatch):
    # With hf_xet installed the client uploads LFS files through Xet without asking the server; the stand-in has
    # no Xet storage, so take the plain LFS path (a subprocess would set HF_HUB_DISABLE_XET=1 instead).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with StandInHub({ALICE: "alice", BOB: "bob"}) as server:
        yield server


def _download(hub, tmp_path, filename, repo_id="alice/x", **kwargs):
    kwargs.setdefault("token", False)  # anonymous unless asked: never send a token saved on this machine
    path = hf_hub_download(repo_id, filename, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", **kwargs)
    with open(path, "rb") as file:
        return file.read()


def _push(api, files: dict, message="Upload", revision=None, repo_id="alice/x"):
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    return api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)


def test_commit_regular_and_lfs_files_then_download(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    assert api.whoami()["name"] == "alice"
    api.create_repo("alice/x", private=False, exist_ok=True)
    weights = os.urandom(300_000)
    image = tmp_path / "curve.png"  # a file on disk goes through the client's path-based (streamed) upload
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(5_000))
    info = _push(api, {"config.json": CONFIG, "model.safetensors": weights, "plots/curve.png": str(image)})

    [commit] = hub.commits("alice/x")
    assert commit["oid"] == info.oid and len(info.oid) == 40
    assert commit["message"] == "Upload"
    assert commit["files_added"] == {
        "config.json": CONFIG,
        "model.safetensors": weights,
        "plots/curve.png": image.read_bytes(),
    }
    assert hub.repo("alice/x")["private"] is False
    calls = [(method, path) for method, path, _ in hub.requests]
    assert ("POST", "/alice/x.git/info/lfs/objects/batch") in calls  # LFS, not Xet
    assert sum(method == "PUT" for method, _ in calls) == 2  # one basic-transfer PUT per LFS file
    assert not any("xet" in path for _, path in calls)

    assert _download(hub, tmp_path, "config.json") == CONFIG
    assert _download(hub, tmp_path, "model.safetensors") == weights
    assert _download(hub, tmp_path, "plots/curve.png", revision=info.oid) == image.read_bytes()


def test_unchanged_files_make_no_new_commit(hub):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/x")
    first = _push(api, {"config.json": CONFIG, "model.safetensors": b"\x01" * 1000})
    again = _push(api, {"config.json": CONFIG, "model.safetensors": b"\x01" * 1000}, message="Same again")
    assert again.oid == first.oid
    assert len(hub.commits("alice/x")) == 1


def test_branch_commit_leaves_main_unchanged(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/x", private=False, exist_ok=True)
    _push(api, {"config.json": CONFIG})
    api.create_branch("alice/x", branch="run/2", exist_ok=True)
    api.create_branch("alice/x", branch="run/2", exist_ok=True)  # already there: no error
    _push(api, {"config.json": b"{}", "model.safetensors": b"\x00" * 2048}, message="Epoch 2", revision="run/2")

    assert [c["message"] for c in hub.commits("alice/x")] == ["Upload"]
    assert [c["message"] for c in hub.commits("alice/x", "run/2")] == ["Upload", "Epoch 2"]
    assert hub.commits("alice/x", "run/2")[-1]["tree"] == {"config.json": b"{}", "model.safetensors": b"\x00" * 2048}
    assert _download(hub, tmp_path, "config.json", revision="run/2") == b"{}"
    assert _download(hub, tmp_path, "config.json") == CONFIG
    with pytest.raises(EntryNotFoundError):
        _download(hub, tmp_path, "model.safetensors")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, tmp_path, "config.json", revision="no-such-branch")


def test_writes_need_the_owners_token(hub):
    HfApi(endpoint=hub.endpoint, token=ALICE).create_repo("alice/x")

    with pytest.raises(HfHubHTTPError) as anonymous:
        _push(HfApi(endpoint=hub.endpoint, token=False), {"config.json": CONFIG})
    assert anonymous.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as other_user:
        _push(HfApi(endpoint=hub.endpoint, token=BOB), {"model.safetensors": b"\x01" * 100})
    assert other_user.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as unknown_token:
        HfApi(endpoint=hub.endpoint, token="hf_not_a_token").whoami()
    assert unknown_token.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as other_namespace:
        HfApi(endpoint=hub.endpoint, token=BOB).create_repo("alice/y")
    assert other_namespace.value.response.status_code == 403

    assert hub.commits("alice/x") == []
    assert not any(method == "PUT" or "/commit/" in path for method, path, _ in hub.requests)
    with pytest.raises(KeyError):
        hub.repo("alice/y")


def test_missing_repo_file_and_private_repo(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/secret", private=True)
    _push(api, {"config.json": CONFIG}, repo_id="alice/secret")
    assert hub.repo("alice/secret")["private"] is True

    with pytest.raises(RepositoryNotFoundError):
        _download(hub, tmp_path, "config.json", repo_id="alice/missing")
    with pytest.raises(EntryNotFoundError):
        _download(hub, tmp_path, "missing.json", repo_id="alice/secret", token=ALICE)
    with pytest.raises(RepositoryNotFoundError):  # private: anonymous and other users cannot see it
        _download(hub, tmp_path, "config.json", repo_id="alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, tmp_path, "config.json", repo_id="alice/secret", token=BOB)
    assert _download(hub, tmp_path, "config.json", repo_id="alice/secret", token=ALICE) == CONFIG
    assert api.model_info("alice/secret").private is True
    assert not any(auth for method, path, auth in hub.requests if path == "/alice/missing/resolve/main/config.json")


def test_cached_file_is_served_without_the_server(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/x")
    weights = os.urandom(50_000)
    _push(api, {"model.safetensors": weights})
    first = hf_hub_download("alice/x", "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    seen = len(hub.requests)

    again = hf_hub_download(
        "alice/x", "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path, token=False, local_files_only=True
    )
    assert again == first
    with open(again, "rb") as file:
        assert file.read() == weights
    assert len(hub.requests) == seen


def test_card_validation_refuses_a_model_index_without_the_fields_the_hub_requires(hub, monkeypatch):
    """What ``ModelCard.validate`` and ``create_commit`` (before any upload) ask the Hub; ``push`` tests rely on it."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
    result = "{task: {type: image-classification}, dataset: {type: d, name: d}, metrics: [{type: accuracy, %s}]}"
    card = "---\nmodel-index:\n- name: m\n  results: [" + result + "]\n---\ntext"
    ModelCard(card % "value: 0.9").validate()
    api = HfApi(endpoint=hub.endpoint, token=ALICE)
    api.create_repo("alice/x")
    # huggingface_hub's ModelCard will not even parse this one; a README written by hand reaches the Hub as it is.
    with pytest.raises(ValueError, match="Invalid metadata in README.md.\n- model-index lacks or misuses .value."):
        _push(api, {"README.md": (card % "name: top-1").encode()})
    assert hub.commits("alice/x") == []
