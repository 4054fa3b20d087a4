"""A stand-in Hugging Face Hub: a tiny in-memory HTTP server for tests that cannot reach the real Hub.

Standard library plus PyYAML. Written against huggingface_hub 2.4.0 (httpx2 client, hf-xet 1.8.0 installed) by
reading what its client sends for ``HfApi.whoami``, ``create_repo``, ``create_branch``, ``create_commit`` (regular
and LFS files, and the README.md metadata check it makes first), ``model_info`` and ``hf_hub_download``, plus
``/api/agent-harnesses``, which every client process fetches for its User-Agent. Only those routes exist; anything
else answers 404 "not implemented". ``hub.requests`` records every request.

Xet: the 2.4.0 client uploads LFS files through Xet whenever ``hf_xet`` is importable; it never asks the server first.
This server has no Xet storage, so uploading clients must run with Xet disabled: ``HF_HUB_DISABLE_XET=1`` in a
subprocess's environment (see ``client_env``), or ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` in-process.
They then take the plain git-LFS "basic" path (batch API, then one PUT per file); with Xet left on, the upload fails
fast on a 501 from ``xet-write-token``. Downloads never use Xet here
because ``/resolve`` answers carry no ``X-Xet-Hash`` header.

Differences from the real Hub: model repos only, a new repo has no initial ``.gitattributes`` commit, and LFS files are
served directly by ``/resolve`` instead of through a redirect to a CDN.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import secrets
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml  # a dependency of cifar_accel; used to check model cards as the Hub would
from huggingface_hub.repocard_data import model_index_to_eval_results

# Like the default .gitattributes of a Hub repo: these suffixes (and big or binary files) are stored in LFS.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".pkl", ".onnx", ".png", ".jpg")
LFS_MIN_SIZE = 10 * 1024 * 1024

_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"  # the client quotes revisions with safe="", so a branch "a/b" arrives as "a%2Fb"
ROUTES = [  # (method, raw path pattern, StandInHub method)
    ("GET", r"/api/whoami-v2", "_whoami"),
    ("GET", r"/api/agent-harnesses", "_agent_harnesses"),
    ("POST", r"/api/repos/create", "_create_repo"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "_model_info"),
    ("POST", rf"/api/models/{_REPO}/branch/{_REV}", "_create_branch"),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "_preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "_commit"),
    ("GET", rf"/api/models/{_REPO}/xet-write-token/{_REV}", "_xet_write_token"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "_lfs_batch"),
    ("PUT", r"/stand-in-lfs/(?P<ticket>[0-9a-f]+)", "_lfs_put"),
    ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "_resolve"),
    ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "_resolve"),
]


class HubError(Exception):
    """An error answer. ``code`` goes to X-Error-Code, which hf_raise_for_status maps to RepositoryNotFoundError,
    RevisionNotFoundError or EntryNotFoundError (needed: its 401 fallback only matches https:// URLs)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub uses as ETag and oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


def file_oid(path: str, data: bytes) -> str:
    """The oid the client compares with its local one to skip unchanged files: sha256 for LFS, git sha1 otherwise."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path, len(data), data[:512]) else git_blob_sha1(data)


class StandInHub:
    """Serve a fake Hub on ``self.endpoint`` until ``stop()``; ``tokens`` maps token -> user name owning it."""

    def __init__(self, tokens: dict[str, str]):
        self._tokens = dict(tokens)
        self._lock = threading.Lock()
        self._repos: dict[str, dict] = {}  # repo_id -> {"private", "branches": {name: [commit]}, "lfs": {oid: bytes}}
        self._uploads: dict[str, tuple[str, str, int]] = {}  # LFS upload ticket -> (repo_id, sha256, size)
        self.requests: list[tuple[str, str, bool]] = []  # (method, path without query, had Authorization header)
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        serve = {"poll_interval": 0.05}  # how often serve_forever checks for stop(); its 0.5 s default is slow
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs=serve, name="stand-in-hub", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> StandInHub:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def client_env(self) -> dict[str, str]:
        """Environment variables that point a huggingface_hub subprocess at this server."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1"}

    # --- Views for assertions ---

    def repo(self, repo_id: str) -> dict:
        with self._lock:
            repo = self._repos[repo_id]
            return {"private": repo["private"], "branches": sorted(repo["branches"])}

    def gate(self, repo_id: str) -> None:
        """Make a repo gated: only its owner reads it until others accept its terms (here, never)."""
        with self._lock:
            self._repos[repo_id]["gated"] = True

    def commits(self, repo_id: str, revision: str = "main") -> list[dict]:
        """Commits of ``revision``, oldest first: message, oid, files_added, files_deleted and the full tree."""
        with self._lock:
            return copy.deepcopy(self._history(self._repos[repo_id], revision))

    # --- Shared checks ---

    def _user(self, headers) -> str | None:
        authorization = headers.get("Authorization")
        if authorization is None:
            return None
        user = self._tokens.get(authorization.removeprefix("Bearer ").strip())
        if user is None:
            # The exact message the client checks so that it reports a bad token, not a missing repo.
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable_repo(self, headers, repo_id: str) -> dict:
        user = self._user(headers)
        repo = self._repos.get(repo_id)
        if repo is None or (repo["private"] and user != repo_id.split("/")[0]):
            # Like the Hub: a private repo is indistinguishable from a missing one; 401 when anonymous, else 404.
            raise HubError(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        if repo.get("gated") and user != repo_id.split("/")[0]:
            raise HubError(403, f"Access to model {repo_id} is restricted; visit its page to ask for access",
                           code="GatedRepo")  # fmt: skip
        return repo

    def _writable_repo(self, headers, repo_id: str) -> dict:
        user = self._user(headers)
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        if repo_id not in self._repos:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return self._repos[repo_id]

    def _history(self, repo: dict, revision: str) -> list[dict]:
        """The commits reachable from a branch name or a full commit oid (an empty list for an empty branch)."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        for commits in repo["branches"].values():
            for index, commit in enumerate(commits):
                if commit["oid"] == revision:
                    return commits[: index + 1]
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _branch(self, repo: dict, revision: str) -> list[dict]:
        if revision not in repo["branches"]:
            raise HubError(404, f"Invalid rev id: {revision} is not a branch", code="RevisionNotFound")
        return repo["branches"][revision]

    # --- Routes: each takes (headers, query, body, **path groups) and returns (status, headers, body) ---

    def _whoami(self, headers, query, body):
        user = self._user(headers)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        token_info = {"displayName": "stand-in", "role": "write"}
        return _json(
            {
                "type": "user",
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token_info},
            }
        )

    def _agent_harnesses(self, headers, query, body):
        # Fetched (anonymously, at most daily, cached under HF_HOME) by every client process whose HF_ENDPOINT is
        # this server, to fill the User-Agent header. An empty registry means "no agent detected".
        return _json({"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self, headers, query, body):
        # create_commit sends README.md here before uploading anything. The real Hub checks the metadata
        # against its schema; this checks that the front matter is there and parses to a mapping.
        content = json.loads(body)["content"]
        parts = content.split("---\n", 2) if content.startswith("---\n") else []
        try:
            metadata = yaml.safe_load(parts[1]) if len(parts) == 3 else None
        except yaml.YAMLError as error:
            metadata = f"{error}"
        if not isinstance(metadata, dict):
            problem = {"message": f"README.md has no YAML metadata block that parses to a mapping: {metadata!r}"}
            raise HubError(400, "Invalid metadata", errors=[problem])
        if "model-index" in metadata:  # the fields the Hub requires, as huggingface_hub's own parser reads them
            try:
                model_index_to_eval_results(metadata["model-index"])
            except (KeyError, TypeError, ValueError) as error:
                problem = {"message": f"model-index lacks or misuses {error}"}
                raise HubError(400, "Invalid metadata", errors=[problem]) from None
        return _json({"errors": [], "warnings": []})

    def _create_repo(self, headers, query, body):
        payload = json.loads(body)
        user = self._user(headers)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HubError(400, "The stand-in hub only has model repos")
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {repo_id}")
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self._repos:
            # create_repo(exist_ok=True) swallows the 409 and then still reads "url" from this body.
            raise HubError(409, "You already created this model repo", url=url)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._repos[repo_id] = {"private": private, "branches": {"main": []}, "lfs": {}}
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _model_info(self, headers, query, body, repo_id, rev="main"):
        # Used by create_repo(exist_ok=True) after a 401/403 and by create_commit when every file is unchanged.
        repo = self._readable_repo(headers, repo_id)
        commits = self._history(repo, rev)
        tree = commits[-1]["tree"] if commits else {}
        sha = commits[-1]["oid"] if commits else None
        siblings = [{"rfilename": path} for path in sorted(tree)]
        return _json({"id": repo_id, "private": repo["private"], "sha": sha, "siblings": siblings})

    def _create_branch(self, headers, query, body, repo_id, rev):
        repo = self._writable_repo(headers, repo_id)
        if rev in repo["branches"]:
            raise HubError(409, f"Branch {rev} already exists")  # create_branch(exist_ok=True) ignores a 409
        starting_point = json.loads(body or b"{}").get("startingPoint", "main")
        repo["branches"][rev] = list(self._history(repo, starting_point))  # new list: main is unaffected
        return _json({})

    def _preupload(self, headers, query, body, repo_id, rev):
        # Decides "lfs" vs "regular" per file and reports the current oid, so unchanged files are skipped.
        repo = self._writable_repo(headers, repo_id)
        commits = self._branch(repo, rev)
        tree = commits[-1]["tree"] if commits else {}
        files = []
        for file in json.loads(body)["files"]:
            path, sample = file["path"], base64.b64decode(file["sample"])
            mode = "lfs" if is_lfs(path, file["size"], sample) else "regular"
            oid = file_oid(path, tree[path]) if path in tree else None
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": files})

    def _lfs_batch(self, headers, query, body, repo_id):
        # git-LFS batch API: answer with the "basic" transfer, i.e. one PUT of the whole file to a one-off URL
        # (no "chunk_size" header => no multipart). The PUT carries no Authorization header, like a presigned URL.
        repo = self._writable_repo(headers, repo_id)
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in repo["lfs"]:  # no "actions" => the client knows it is already stored
                ticket = secrets.token_hex(16)
                self._uploads[ticket] = (repo_id, obj["oid"], obj["size"])
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/stand-in-lfs/{ticket}"}}
            objects.append(entry)
        return (
            200,
            {"Content-Type": "application/vnd.git-lfs+json"},
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
        )

    def _lfs_put(self, headers, query, body, ticket):
        if ticket not in self._uploads:
            raise HubError(403, "Unknown or used upload URL")
        repo_id, oid, size = self._uploads.pop(ticket)
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256 and size")
        self._repos[repo_id]["lfs"][oid] = body
        return 200, {"ETag": f'"{oid}"'}, b""

    def _xet_write_token(self, headers, query, body, repo_id, rev):
        raise HubError(501, "The stand-in hub has no Xet storage: run the client with HF_HUB_DISABLE_XET=1")

    def _commit(self, headers, query, body, repo_id, rev):
        repo = self._writable_repo(headers, repo_id)
        if "create_pr" in query:
            raise HubError(400, "The stand-in hub does not support pull requests")
        commits = self._branch(repo, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]  # ndjson: header, then operations
        header = next(line["value"] for line in lines if line["key"] == "header")
        parent = commits[-1]["oid"] if commits else None
        if header.get("parentCommit") and (parent is None or not parent.startswith(header["parentCommit"])):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(commits[-1]["tree"]) if commits else {}
        added, deleted = {}, []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in repo["lfs"]:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                added[value["path"]] = repo["lfs"][value["oid"]]
            elif key in ("deletedFile", "deletedFolder"):
                prefix = value["path"].rstrip("/") + "/"
                deleted += [path for path in tree if path == value["path"] or path.startswith(prefix)]
            elif key != "header":
                raise HubError(400, f"The stand-in hub does not support {key!r} operations")
        for path in deleted:
            tree.pop(path, None)
        tree.update(added)
        oid = secrets.token_hex(20)  # 40 hex digits, like a git commit id
        commits.append(
            {"oid": oid, "message": header["summary"], "files_added": added, "files_deleted": deleted, "tree": tree}
        )
        return _json({"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    def _resolve(self, headers, query, body, repo_id, rev, path):
        repo = self._readable_repo(headers, repo_id)
        commits = self._history(repo, rev)
        commit_header = {"X-Repo-Commit": commits[-1]["oid"]} if commits else {}
        if not commits or path not in commits[-1]["tree"]:
            # X-Repo-Commit lets hf_hub_download cache the file's absence for that commit.
            raise HubError(404, "Entry not found", code="EntryNotFound", headers=commit_header)
        data = commits[-1]["tree"][path]
        # hf_hub_download needs X-Repo-Commit and an ETag (it names the cached blob); the size comes from
        # Content-Length, or X-Linked-Size for LFS files, whose X-Linked-Etag (sha256) takes precedence over ETag.
        etag = file_oid(path, data)
        response_headers = {**commit_header, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        if is_lfs(path, len(data), data[:512]):
            response_headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        return 200, response_headers, data


def _json(payload) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    hub: StandInHub  # set on the subclass built by StandInHub

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _route(self, url, body: bytes) -> tuple[int, dict, bytes]:
        for method, pattern, name in ROUTES:
            match = re.fullmatch(pattern, url.path)
            if method == self.command and match:
                groups = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                return getattr(self.hub, name)(self.headers, parse_qs(url.query), body, **groups)
        raise HubError(404, f"The stand-in hub does not implement {self.command} {url.path}")

    def _dispatch(self):
        url = urlsplit(self.path)
        # huggingface_hub's client (httpx2) sends a Content-Length with every body, file uploads included.
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub = self.hub
        with hub._lock:
            hub.requests.append((self.command, url.path, "Authorization" in self.headers))
            try:
                status, headers, payload = self._route(url, body)
            except Exception as error:
                if not isinstance(error, HubError):  # a stand-in bug or a malformed request: 400, as 5xx makes
                    traceback.print_exc(file=sys.stderr)  # the client retry with backoff
                    error = HubError(400, f"stand-in hub failed: {error!r}")
                status, payload = error.status, json.dumps({"error": error.message, **error.extra}).encode()
                headers = {"Content-Type": "application/json", "X-Error-Message": error.message, **error.headers}
                if error.code:
                    headers["X-Error-Code"] = error.code
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
