"""A Hugging Face Hub on 127.0.0.1 that huggingface_hub accepts as HF_ENDPOINT.

It answers the requests huggingface_hub 2.4 makes to download (read in its file_download.py,
_snapshot_download.py and hf_api.py), for model and dataset repos at one or more revisions:

    HEAD/GET /{repo}/resolve/{revision}/{path}             a model repo's file
    HEAD/GET /datasets/{repo}/resolve/{revision}/{path}    a dataset repo's file
        200 with X-Repo-Commit (the commit the revision points at), ETag (the file's git blob id;
        for an LFS file, X-Linked-Etag = its sha256 and X-Linked-Size too) and Content-Length;
        Range (206) as FileServer serves it.
    GET /api/{models|datasets}/{repo}/revision/{revision}  repo_info: {"id", "sha", "siblings"}
    GET /api/{models|datasets}/{repo}/tree/{revision}      list_repo_tree(recursive=True):
        [{"type": "file", "path", "size", "oid", "lfs": {"oid", "size", "pointerSize"}}]

and fails as the hub fails: 404 with X-Error-Code RepoNotFound, RevisionNotFound or EntryNotFound
(with X-Repo-Commit, as huggingface_hub records a file's absence per commit), and 401 with
X-Error-Code GatedRepo for a gated repo asked without its token. Every request is logged
(`requests`), so a test can say that an offline load made none.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import pytest

from http_server import FileServer, Route

LFS_SUFFIXES = (".safetensors", ".parquet", ".gz", ".gguf")  # served as LFS files, as on the hub
_URL = re.compile(r"/(?:api/(?P<api_type>models|datasets)/(?P<api_repo>[^/]+/[^/]+)/(?P<call>revision|tree)/"
                  r"(?P<api_rev>[^/]+)(?:/.*)?|(?P<datasets>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/"
                  r"(?P<path>.+))")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (the hub's ETag for a file kept in git)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files_at: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}
    revisions: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    token: str | None = None  # a gated repo answers only requests that send this token


class HubServer(FileServer):
    """A running hub: ``add_repo`` what it serves; ``server.url`` is its HF_ENDPOINT."""

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo type, repo id) -> Repo

    def add_repo(self, repo_id: str, files: Mapping[str, bytes], *, repo_type: str = "model",
                 revision: str = "main", token: str | None = None) -> str:
        """Serve `files` as `revision` of the repo (a new commit); returns the commit id."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo())
        listing = json.dumps({p: git_blob_id(b) for p, b in sorted(files.items())}).encode()
        commit = hashlib.sha1(repo_id.encode() + b"\0" + revision.encode() + b"\0" + listing).hexdigest()
        repo.files_at[commit] = dict(files)
        repo.revisions[revision] = commit
        repo.token = token
        return commit

    def _lookup(self, path: str, headers: Mapping[str, str] | None = None) -> Route | None:
        match = _URL.fullmatch(path)
        if match is None:
            return super()._lookup(path, headers)
        if match["api_type"]:
            repo_type, repo_id, revision = match["api_type"][:-1], match["api_repo"], match["api_rev"]
        else:
            repo_type, repo_id, revision = ("dataset" if match["datasets"] else "model"), match["repo"], match["rev"]
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return _error(404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.token is not None and (headers or {}).get("Authorization") != f"Bearer {repo.token}":
            return _error(401, "GatedRepo", f"Access to {repo_id} is restricted: you must have access to it")
        commit = revision if revision in repo.files_at else repo.revisions.get(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.files_at[commit]
        if match["call"] == "revision":
            return _json({"id": repo_id, "sha": commit, "private": False,
                          "siblings": [{"rfilename": p} for p in sorted(files)]})
        if match["call"] == "tree":
            return _json([_tree_entry(p, b) for p, b in sorted(files.items())])
        name = match["path"]
        if name not in files:
            return _error(404, "EntryNotFound", f"{name} does not exist on {revision!r}", {"X-Repo-Commit": commit})
        body = files[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(body)}"'}
        if name.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(body).hexdigest()}"', "X-Linked-Size": str(len(body))})
        return Route(body=body, headers=headers)

    def hits(self, method: str | None = None) -> list[str]:
        """The paths requested so far (with one method only, if given)."""
        return [r.path for r in self.requests if method is None or r.method == method]


def _tree_entry(path: str, body: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(body), "oid": git_blob_id(body)}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
    return entry


def _json(obj) -> Route:
    return Route(body=json.dumps(obj).encode(), headers={"Content-Type": "application/json"})


def _error(status: int, code: str, message: str, extra: Mapping[str, str] | None = None) -> Route:
    return Route(body=json.dumps({"error": message}).encode(), status=status,
                 headers={"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message,
                          **(extra or {})})


@pytest.fixture
def hub(monkeypatch, tmp_path) -> Iterator[HubServer]:
    """A running `HubServer` that smollm and huggingface_hub use (HF_ENDPOINT), with an empty cache
    under tmp_path/hf (HF_HOME), online, no token, and the current directory moved to tmp_path so
    that no hub id is a local folder by accident."""
    with HubServer() as server:
        isolate_hub_env(monkeypatch, tmp_path / "hf", server.url)
        monkeypatch.chdir(tmp_path)
        yield server


def isolate_hub_env(monkeypatch, hf_home, endpoint: str) -> None:
    """Point every hub variable at a fresh HF_HOME and `endpoint`; nothing offline, no token."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SMOLLM_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                 "SMOLLM_CACHE", "SMOLLM_HUB_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("no_proxy", "NO_PROXY"):  # never send loopback traffic through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
