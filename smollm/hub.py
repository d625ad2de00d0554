"""Download checkpoint files from the HuggingFace hub into a local cache (stdlib only).

No ``huggingface_hub``, no ``requests``: ``urllib`` fetches
``{base}/{repo_id}/resolve/{revision}/{filename}`` (``{base}/datasets/...`` for
datasets), following the redirect HF sends for large (LFS) files to its CDN.

Cache layout (one plain file per hub file, no symlinks)::

    {cache}/models/{owner}--{name}/{revision}/config.json
    {cache}/models/{owner}--{name}/{revision}/model.safetensors
    {cache}/datasets/{owner}--{name}/{revision}/data/train.jsonl

A download streams into ``<file>.incomplete`` beside its final path, resumes from
there with ``Range: bytes=N-`` after an interruption, is checked (size and, when
known, sha256) and only then renamed into place, so a file under its final name is
always complete. A cached file is never re-checked against the hub: a branch such as
``main`` stays at the version first downloaded (delete the folder to refresh).

Environment variables:
    SMOLLM_HUB_URL   base URL of the hub (default ``https://huggingface.co``).
    SMOLLM_CACHE     cache folder (default ``$XDG_CACHE_HOME/smollm`` or ``~/.cache/smollm``).
    SMOLLM_OFFLINE   ``1``: never touch the network; only cached files are used.
    HF_TOKEN         sent as ``Authorization: Bearer ...`` for gated or private repos
                     (dropped when a redirect leaves the hub's host).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

HUB_URL_ENV = "SMOLLM_HUB_URL"
CACHE_ENV = "SMOLLM_CACHE"
OFFLINE_ENV = "SMOLLM_OFFLINE"
DEFAULT_HUB_URL = "https://huggingface.co"

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
OPTIONAL_MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_SNAPSHOT_MARKER = ".smollm-snapshot.json"  # written once every file of a snapshot is cached
_CHUNK = 1 << 20


class HubError(RuntimeError):
    """A hub download failed (bad name, HTTP error, corrupt or interrupted download)."""


class HubFileNotFoundError(HubError):
    """The hub answered 404 for a file."""


class HubOfflineError(HubError):
    """The hub cannot be reached (or SMOLLM_OFFLINE=1) and the file is not cached."""


# -- names and paths -----------------------------------------------------------

_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def looks_like_repo_id(name: str) -> bool:
    """True for an ``owner/name`` hub id such as ``HuggingFaceTB/SmolLM-135M``.

    Exactly one ``/``; each part uses ``[A-Za-z0-9._-]``, starts and ends with a letter
    or digit, and holds no ``..`` or ``--`` (the hub's rules; ``--`` is also our cache
    separator). Callers should still prefer a local path of the same name if one exists.
    """
    parts = name.split("/")
    return (
        len(parts) == 2
        and len(name) <= 96
        and all(_REPO_PART.fullmatch(p) and ".." not in p and "--" not in p for p in parts)
    )


def _check_repo_id(repo_id: str) -> None:
    if not looks_like_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a hub repo id of the form 'owner/name'")


def _check_repo_type(repo_type: str) -> None:
    if repo_type not in ("model", "dataset"):
        raise HubError(f"repo_type must be 'model' or 'dataset', got {repo_type!r}")


def check_relative_path(name: str, what: str = "file name") -> str:
    """Return ``name`` if it is a safe relative path inside a repo, else raise `HubError`.

    Names can come from the hub itself (shard names in an index JSON), so anything that
    could escape the cache folder is refused: absolute paths, ``..``/``.`` and empty
    components, backslashes, NUL bytes.
    """
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or re.match(r"[A-Za-z]:", name)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise HubError(f"unsafe {what} {name!r}: must be a relative path without '..', '.', empty parts or backslashes")
    return name


def cache_root() -> Path:
    """The cache folder: ``$SMOLLM_CACHE``, else ``$XDG_CACHE_HOME/smollm``, else ``~/.cache/smollm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "smollm"


def repo_cache_dir(
    repo_id: str, *, repo_type: str = "model", revision: str = "main", cache_dir: str | os.PathLike | None = None
) -> Path:
    """``{cache}/{models|datasets}/{owner}--{name}/{revision}``; a ``/`` in the revision becomes ``--``."""
    _check_repo_id(repo_id)
    _check_repo_type(repo_type)
    check_relative_path(revision, "revision")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / f"{repo_type}s" / repo_id.replace("/", "--") / revision.replace("/", "--")


def cached_file_path(repo_id: str, filename: str, *, repo_type: str = "model", revision: str = "main",
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``filename`` of the repo lives (or will live) in the cache."""
    check_relative_path(filename)
    return repo_cache_dir(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir) / filename


def hub_url(repo_id: str, filename: str, *, repo_type: str = "model", revision: str = "main") -> str:
    """The ``resolve`` URL of a file, e.g. ``https://huggingface.co/owner/name/resolve/main/config.json``."""
    _check_repo_id(repo_id)
    _check_repo_type(repo_type)
    check_relative_path(filename)
    base = os.environ.get(HUB_URL_ENV, DEFAULT_HUB_URL).rstrip("/")
    prefix = "datasets/" if repo_type == "dataset" else ""
    quote = urllib.parse.quote
    return f"{base}/{prefix}{quote(repo_id)}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip() == "1"


def _offline_error(reason: str, files: list[tuple[str, Path]], local: str) -> HubOfflineError:
    """An error telling the user exactly which URLs to fetch and where to put them."""
    lines = [f"cannot download from the hub: {reason}.", "Fetch these files by hand (URL -> cache path):"]
    lines += [f"  {url}\n    -> {path}" + ("  (already cached)" if path.is_file() else "") for url, path in files]
    lines.append(f"or pass {local} instead of the hub id.")
    error = HubOfflineError("\n".join(lines))
    error.reason = reason  # type: ignore[attr-defined]
    return error


# -- one file ------------------------------------------------------------------


class _Restart(Exception):
    """The partial download cannot be resumed; delete it and start from zero."""


class _RedirectRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping the ``X-Linked-*`` headers HF puts on the redirect
    response, and drops ``Authorization`` when a redirect leaves the original host."""

    def __init__(self) -> None:
        self.linked: dict[str, str] = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib hook)
        for name in ("X-Linked-Etag", "X-Linked-Size"):
            if headers.get(name):
                self.linked[name] = headers[name]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _linked_sha256(etag: str | None) -> str | None:
    """The sha256 in an ``X-Linked-Etag`` header (``"<64 hex>"``, maybe ``W/``-prefixed), else None."""
    if not etag:
        return None
    value = etag.strip().removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _progress_bar(total: int | None, initial: int, label: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label)


def _open(url: str, path: Path, label: str, offset: int, timeout: float):
    """Send the GET (with ``Range`` from ``offset``) and map failures to hub errors.

    Returns the response and the ``X-Linked-*`` headers seen along the redirects.
    Raises `_Restart` on 416 (the partial file is no use).
    """
    request = urllib.request.Request(url, headers={"User-Agent": "smollm-hub"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    if os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    redirects = _RedirectRecorder()
    try:
        response = urllib.request.build_opener(redirects).open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            raise _Restart from None
        detail = f" ({err.headers.get('X-Error-Message')})" if err.headers.get("X-Error-Message") else ""
        if err.code == 404:
            raise HubFileNotFoundError(f"{label} not found: {url} returned 404{detail}") from None
        if err.code in (401, 403):
            raise HubError(
                f"{label}: {url} returned {err.code}{detail}; the repo may be gated or private "
                "(accept its terms on the hub and set HF_TOKEN) or may not exist"
            ) from None
        raise HubError(f"{label}: {url} returned HTTP {err.code} {err.reason}{detail}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, DNS, timeout
        reason = getattr(err, "reason", None) or err
        raise _offline_error(f"could not reach {url} ({reason})", [(url, path)], "a local path") from None
    names = ("X-Linked-Etag", "X-Linked-Size")
    return response, {**redirects.linked, **{k: response.headers[k] for k in names if response.headers.get(k)}}


def _transfer(url: str, path: Path, partial: Path, label: str, progress: bool, timeout: float) -> dict:
    """Stream ``url`` into ``partial``, resuming from its current size.

    Returns what is known to check the result: ``size`` and ``sha256`` of the bytes on
    disk, ``total`` (Content-Length or Content-Range total) and the ``X-Linked-*`` headers.
    Raises `_Restart` if the partial file cannot be resumed.
    """
    offset = partial.stat().st_size if partial.is_file() else 0
    response, linked = _open(url, path, label, offset, timeout)
    with response:
        headers = response.headers
        length = _int_or_none(headers.get("Content-Length"))
        if response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != offset:
                raise _Restart
            total = _int_or_none(match.group(2)) or (offset + length if length is not None else None)
            mode = "ab"
        else:  # 200: the server ignored Range, so start over
            offset, total, mode = 0, length, "wb"

        hasher = hashlib.sha256()
        if offset:
            with open(partial, "rb") as f:
                while block := f.read(_CHUNK):
                    hasher.update(block)
        size = offset
        bar = _progress_bar(total, offset, label, progress)
        try:
            with open(partial, mode) as out:
                while block := response.read(_CHUNK):
                    out.write(block)
                    hasher.update(block)
                    size += len(block)
                    if bar is not None:
                        bar.update(len(block))
        except (OSError, http.client.HTTPException) as err:
            raise HubError(
                f"download of {label} from {url} was interrupted at {size} bytes ({err}); "
                f"the partial file {partial} is kept and the next call resumes it"
            ) from None
        finally:
            if bar is not None:
                bar.close()
    if total is not None and size < total:
        raise HubError(
            f"download of {label} from {url} was interrupted at {size} of {total} bytes; "
            f"the partial file {partial} is kept and the next call resumes it"
        )
    return {"size": size, "sha256": hasher.hexdigest(), "total": total, **linked}


def download_file(
    repo_id: str,
    filename: str,
    *,
    repo_type: str = "model",
    revision: str = "main",
    cache_dir: str | os.PathLike | None = None,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Return the local path of one hub file, downloading it into the cache if needed.

    A cached file is returned without any network access. Otherwise the file is streamed
    (resuming a previous ``.incomplete`` download), its size and sha256 are checked
    against ``expected_*``, the ``X-Linked-Size``/``X-Linked-Etag`` headers and the
    transfer length, and only then moved into place.

    Raises:
        HubFileNotFoundError: the hub answered 404.
        HubOfflineError: the hub is unreachable or SMOLLM_OFFLINE=1 (the message says
            which URL to fetch and where to put it).
        HubError: any other HTTP error, an interrupted transfer (the partial file is
            kept for resuming), or a size/sha256 mismatch (the partial file is deleted).
    """
    path = cached_file_path(repo_id, filename, repo_type=repo_type, revision=revision, cache_dir=cache_dir)
    if path.is_file() and (expected_size is None or path.stat().st_size == expected_size):
        return path
    url = hub_url(repo_id, filename, repo_type=repo_type, revision=revision)
    label = f"{filename!r} of {repo_type} {repo_id!r} (revision {revision!r})"
    if _offline():
        raise _offline_error(f"{OFFLINE_ENV}=1 and {label} is not cached", [(url, path)], "a local path")

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".incomplete")
    try:
        got = _transfer(url, path, partial, label, progress, timeout)
    except _Restart:  # 416, or a 206 starting elsewhere: the partial file is useless
        partial.unlink(missing_ok=True)
        got = _transfer(url, path, partial, label, progress, timeout)

    checks = [
        ("size", "expected_size", expected_size, got["size"]),
        ("size", "X-Linked-Size", _int_or_none(got.get("X-Linked-Size")), got["size"]),
        ("size", "Content-Length", got["total"], got["size"]),
        ("sha256", "expected_sha256", expected_sha256 and expected_sha256.lower(), got["sha256"]),
        ("sha256", "X-Linked-Etag", _linked_sha256(got.get("X-Linked-Etag")), got["sha256"]),
    ]
    for kind, source, want, have in checks:
        if want is not None and want != have:
            partial.unlink(missing_ok=True)
            raise HubError(
                f"{kind} mismatch for {label} downloaded from {url}: expected {want} ({source}), got {have}; "
                "the corrupt download was deleted, try again"
            )
    os.replace(partial, path)
    return path


# -- a model checkpoint ----------------------------------------------------------


def _shard_names(index_path: Path) -> list[str]:
    """The distinct shard files named by a ``model.safetensors.index.json``, validated."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HubError(f"{index_path} is not a safetensors index with a 'weight_map' ({err})") from None
    for name in names:
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise HubError(f"{index_path} names a shard {name!r} that is not a .safetensors file")
        check_relative_path(name, "shard name")
    return names


def _fetch_weights(get: Callable[[str], Path], folder: Path, repo_id: str, revision: str) -> list[str]:
    """Fetch ``model.safetensors``, or the index and its shards; return the names fetched."""
    if not (folder / WEIGHTS_INDEX_FILE).is_file():  # a cached index means sharded: skip the 404
        try:
            get(WEIGHTS_FILE)
            return [WEIGHTS_FILE]
        except HubFileNotFoundError:
            pass
    try:
        index = get(WEIGHTS_INDEX_FILE)
    except HubFileNotFoundError:
        raise HubFileNotFoundError(
            f"{repo_id} (revision {revision!r}) has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} "
            f"at {hub_url(repo_id, WEIGHTS_FILE, revision=revision)}; only safetensors checkpoints are supported"
        ) from None
    shards = _shard_names(index)
    for shard in shards:
        get(shard)
    return [WEIGHTS_INDEX_FILE, *shards]


def snapshot_model(
    repo_id: str, *, revision: str = "main", cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Fetch what a checkpoint needs into the cache and return its local folder.

    Downloads ``config.json``; ``model.safetensors``, or if that is missing
    ``model.safetensors.index.json`` and every shard in its ``weight_map``; and, when the
    hub has them, the tokenizer and generation files. Never downloads pickle (``*.bin``)
    weights. Once complete, the folder is marked so later calls make no request.

    Raises:
        HubFileNotFoundError: no ``config.json``, or neither weights file.
        HubOfflineError: the hub is unreachable or SMOLLM_OFFLINE=1; the message lists
            every file needed and the folder to put them in.
    """
    folder = repo_cache_dir(repo_id, revision=revision, cache_dir=cache_dir)
    marker = folder / _SNAPSHOT_MARKER
    if marker.is_file() and all((folder / n).is_file() for n in json.loads(marker.read_text())):
        return folder

    def get(name: str) -> Path:
        return download_file(repo_id, name, revision=revision, cache_dir=cache_dir, progress=progress)

    try:
        get("config.json")
        files = ["config.json", *_fetch_weights(get, folder, repo_id, revision)]
    except HubOfflineError as err:
        raise _snapshot_offline_error(repo_id, revision, folder, err) from None

    complete = True
    for name in OPTIONAL_MODEL_FILES:
        try:
            get(name)
            files.append(name)
        except HubFileNotFoundError:
            pass
        except HubOfflineError:
            complete = False  # unknown whether the hub has it; try again next time
    if complete:
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(files))
        os.replace(tmp, marker)
    return folder


def _snapshot_offline_error(repo_id: str, revision: str, folder: Path, err: HubOfflineError) -> HubOfflineError:
    """List every file a checkpoint needs, with its URL and cache path."""
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        weights = [WEIGHTS_INDEX_FILE, *_shard_names(index)]
    else:
        weights = [WEIGHTS_FILE]
    names = ["config.json", *weights, "tokenizer.json"]
    return _offline_error(
        f"{getattr(err, 'reason', err)}; the checkpoint needs the files below in {folder}",
        [(hub_url(repo_id, name, revision=revision), folder / name) for name in names],
        "a local directory holding config.json, model.safetensors and tokenizer.json",
    )
