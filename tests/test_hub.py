"""Tests for smollm.hub against a local HTTP server (tests/http_server.py); no internet."""
from __future__ import annotations

import hashlib
import json

import pytest
from http_server import FileServer, unused_port

from smollm.hub import (
    CACHE_ENV,
    HUB_URL_ENV,
    OFFLINE_ENV,
    HubError,
    HubFileNotFoundError,
    HubOfflineError,
    cache_root,
    cached_file_path,
    check_relative_path,
    download_file,
    hub_url,
    looks_like_repo_id,
    snapshot_model,
)

REPO = "owner/tiny-model"
DATA = bytes(range(256)) * 40  # 10 KiB, not a multiple of anything interesting


def resolve(filename: str, repo: str = REPO) -> str:
    return f"/{repo}/resolve/main/{filename}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running FileServer that smollm.hub treats as the hub, with a fresh cache."""
    with FileServer() as server:
        monkeypatch.setenv(HUB_URL_ENV, server.url)
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
        monkeypatch.delenv(OFFLINE_ENV, raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        for name in ("no_proxy", "NO_PROXY"):  # never send loopback traffic through a proxy
            monkeypatch.setenv(name, "127.0.0.1,localhost")
        yield server


def fetch(filename: str = "model.safetensors", **kwargs):
    return download_file(REPO, filename, progress=False, timeout=5.0, **kwargs)


# -- names and paths -----------------------------------------------------------


def test_hub_url(monkeypatch):
    monkeypatch.setenv(HUB_URL_ENV, "https://hub.example/")
    assert hub_url("o/m", "config.json") == "https://hub.example/o/m/resolve/main/config.json"
    assert hub_url("o/d", "data/a b.json", repo_type="dataset", revision="refs/pr/1") == (
        "https://hub.example/datasets/o/d/resolve/refs%2Fpr%2F1/data/a%20b.json"
    )


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM-135M", "Anthropic/hh-rlhf", "a/b.c_d"])
def test_looks_like_repo_id_accepts(name):
    assert looks_like_repo_id(name)


@pytest.mark.parametrize("name", ["gpt2", "a/b/c", "../x", "a/..", "./x", "/abs/x", "a b/c", "a/b--c", "a/-b", ""])
def test_looks_like_repo_id_rejects(name):
    assert not looks_like_repo_id(name)


def test_cache_layout(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "smollm"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cached_file_path("o/m", "sub/w.safetensors") == tmp_path / "c/models/o--m/main/sub/w.safetensors"
    assert cached_file_path("o/d", "x.json", repo_type="dataset", revision="v1", cache_dir=tmp_path) == (
        tmp_path / "datasets/o--d/v1/x.json"
    )


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\\b", "a//b", "./a", "", "C:/x"])
def test_path_escapes_are_rejected(name, tmp_path):
    with pytest.raises(HubError, match="unsafe"):
        check_relative_path(name)
    with pytest.raises(HubError, match="unsafe"):
        download_file(REPO, name, cache_dir=tmp_path, progress=False)


# -- download_file ---------------------------------------------------------------


def test_complete_download_then_cached(hub):
    hub.add(resolve("model.safetensors"), DATA, headers={"X-Linked-Etag": f'"{sha256(DATA)}"'})
    path = download_file(REPO, "model.safetensors", progress=True, timeout=5.0)  # with a tqdm bar
    assert path.read_bytes() == DATA
    assert not path.with_name("model.safetensors.incomplete").exists()
    assert [r.range for r in hub.requests] == [None]
    hub.clear_requests()
    assert fetch() == path
    assert hub.requests == []


def test_resume_after_interrupted_download(hub):
    hub.add(resolve("model.safetensors"), DATA, cut_after=3000, headers={"X-Linked-Size": str(len(DATA))})
    path = cached_file_path(REPO, "model.safetensors")
    partial = path.with_name(path.name + ".incomplete")
    with pytest.raises(HubError, match="interrupted"):
        fetch()
    assert not path.exists()
    assert partial.read_bytes() == DATA[:3000]

    assert fetch(expected_sha256=sha256(DATA)).read_bytes() == DATA
    assert hub.requests[-1].range == "bytes=3000-"
    assert not partial.exists()


def test_partial_with_server_ignoring_range_restarts(hub):
    hub.add(resolve("model.safetensors"), DATA, ranges=False)
    path = cached_file_path(REPO, "model.safetensors")
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".incomplete").write_bytes(b"junk" * 10)
    assert fetch().read_bytes() == DATA
    assert hub.requests[-1].range == "bytes=40-"  # asked to resume, got a 200, started over


def test_partial_longer_than_file_416_restarts(hub):
    hub.add(resolve("model.safetensors"), DATA)
    path = cached_file_path(REPO, "model.safetensors")
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".incomplete").write_bytes(b"x" * (len(DATA) + 5))
    assert fetch().read_bytes() == DATA
    assert [r.range for r in hub.requests] == [f"bytes={len(DATA) + 5}-", None]


def test_404_is_file_not_found(hub):
    with pytest.raises(HubFileNotFoundError, match="missing.json") as info:
        fetch("missing.json")
    assert REPO in str(info.value) and hub.url in str(info.value)


def test_403_mentions_gated_and_sends_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.add(resolve("config.json"), b"denied", status=403)
    with pytest.raises(HubError, match="gated") as info:
        fetch("config.json")
    assert "HF_TOKEN" in str(info.value)
    assert hub.requests[0].headers["Authorization"] == "Bearer hf_secret"


@pytest.mark.parametrize(
    "headers, kwargs",
    [
        ({"X-Linked-Etag": f'"{sha256(b"other")}"'}, {}),
        ({}, {"expected_sha256": sha256(b"other")}),
    ],
)
def test_sha256_mismatch_deletes_download(hub, headers, kwargs):
    hub.add(resolve("model.safetensors"), DATA, headers=headers)
    path = cached_file_path(REPO, "model.safetensors")
    with pytest.raises(HubError, match="sha256 mismatch") as info:
        fetch(**kwargs)
    assert sha256(DATA) in str(info.value) and "model.safetensors" in str(info.value)
    assert not path.exists() and not path.with_name(path.name + ".incomplete").exists()


@pytest.mark.parametrize("headers, kwargs", [({"X-Linked-Size": str(len(DATA) + 1)}, {}), ({}, {"expected_size": 7})])
def test_size_mismatch_deletes_download(hub, headers, kwargs):
    hub.add(resolve("model.safetensors"), DATA, headers=headers)
    path = cached_file_path(REPO, "model.safetensors")
    with pytest.raises(HubError, match="size mismatch"):
        fetch(**kwargs)
    assert not path.exists() and not path.with_name(path.name + ".incomplete").exists()


def test_weak_etag_with_right_sha256_passes(hub):
    hub.add(resolve("model.safetensors"), DATA, headers={"X-Linked-Etag": f'W/"{sha256(DATA).upper()}"'})
    assert fetch().read_bytes() == DATA


def test_redirect_keeps_linked_headers_and_drops_token_off_host(hub, monkeypatch):
    """HF answers LFS files with a 302 to a CDN; X-Linked-* sit on the 302."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with FileServer({"/blob": DATA}) as cdn:
        bad = {"X-Linked-Etag": f'"{sha256(b"other")}"'}
        hub.add(resolve("model.safetensors"), redirect=cdn.url_for("/blob"), headers=bad)
        with pytest.raises(HubError, match="X-Linked-Etag"):
            fetch()
        assert "Authorization" in hub.requests[0].headers
        assert "Authorization" not in cdn.requests[0].headers

        hub.add(resolve("model.safetensors"), redirect=cdn.url_for("/blob"), headers={"X-Linked-Etag": sha256(DATA)})
        assert fetch().read_bytes() == DATA


def test_unreachable_hub_is_offline_error(hub, monkeypatch):
    monkeypatch.setenv(HUB_URL_ENV, f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(HubOfflineError) as info:
        fetch("config.json")
    message = str(info.value)
    assert hub_url(REPO, "config.json") in message
    assert str(cached_file_path(REPO, "config.json")) in message
    assert "local path" in message


def test_offline_env_uses_only_the_cache(hub, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(HubOfflineError, match=OFFLINE_ENV) as info:
        fetch("config.json")
    assert hub_url(REPO, "config.json") in str(info.value)
    assert str(cached_file_path(REPO, "config.json")) in str(info.value)
    path = cached_file_path(REPO, "config.json")
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    assert fetch("config.json") == path
    assert hub.requests == []


# -- snapshot_model ----------------------------------------------------------------


def test_snapshot_single_file(hub):
    hub.add(resolve("config.json"), b'{"hidden_size": 8}')
    hub.add(resolve("model.safetensors"), DATA)
    hub.add(resolve("tokenizer.json"), b"{}")
    hub.add(resolve("pytorch_model.bin"), b"pickle")
    folder = snapshot_model(REPO, progress=False)
    assert (folder / "model.safetensors").read_bytes() == DATA
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert not any(r.path.endswith(".bin") for r in hub.requests)
    hub.clear_requests()
    assert snapshot_model(REPO, progress=False) == folder
    assert hub.requests == []  # missing optional files are not asked for again


def test_snapshot_sharded(hub):
    shards = {"model-00001-of-00002.safetensors": b"one" * 100, "model-00002-of-00002.safetensors": b"two" * 50}
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors",
                                            "c.weight": "model-00002-of-00002.safetensors"}}
    hub.add(resolve("config.json"), b"{}")
    hub.add(resolve("model.safetensors.index.json"), json.dumps(index).encode())
    for name, data in shards.items():
        hub.add(resolve(name), data)
    folder = snapshot_model(REPO, progress=False)
    for name, data in shards.items():
        assert (folder / name).read_bytes() == data
    assert not (folder / "model.safetensors").exists()


def test_snapshot_rejects_escaping_shard_names(hub, tmp_path):
    hub.add(resolve("config.json"), b"{}")
    hub.add(resolve("model.safetensors.index.json"), json.dumps({"weight_map": {"w": "../../evil.safetensors"}}).encode())
    with pytest.raises(HubError, match="unsafe shard name"):
        snapshot_model(REPO, progress=False)
    assert not list(tmp_path.rglob("evil*"))


def test_snapshot_without_weights(hub):
    hub.add(resolve("config.json"), b"{}")
    hub.add(resolve("pytorch_model.bin"), b"pickle")
    with pytest.raises(HubFileNotFoundError) as info:
        snapshot_model(REPO, progress=False)
    assert "model.safetensors" in str(info.value) and "model.safetensors.index.json" in str(info.value)


def test_snapshot_offline_lists_every_file(hub, monkeypatch):
    monkeypatch.setenv(HUB_URL_ENV, f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(HubOfflineError) as info:
        snapshot_model(REPO, progress=False)
    message = str(info.value)
    folder = cached_file_path(REPO, "config.json").parent
    assert str(folder) in message
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert hub_url(REPO, name) in message


def test_snapshot_offline_with_files_placed_by_hand(hub, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    folder = cached_file_path(REPO, "config.json").parent
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_bytes(b"{}")
    assert snapshot_model(REPO, progress=False) == folder
    assert hub.requests == []


# -- the test server itself (other test modules rely on it) ------------------------


def test_file_server_directory_head_and_ranges(tmp_path):
    import urllib.error
    import urllib.request

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_bytes(b"0123456789")
    (tmp_path.parent / "outside.txt").write_bytes(b"secret")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with FileServer(tmp_path) as server:
        url = server.url_for("/sub/f.txt")
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=5) as r:
            assert r.headers["Content-Length"] == "10" and r.read() == b""
        with opener.open(urllib.request.Request(url, headers={"Range": "bytes=4-"}), timeout=5) as r:
            assert r.status == 206 and r.headers["Content-Range"] == "bytes 4-9/10" and r.read() == b"456789"
        for path, headers, code in [("/sub/f.txt", {"Range": "bytes=10-"}, 416), ("/../outside.txt", {}, 404)]:
            with pytest.raises(urllib.error.HTTPError) as info:
                opener.open(urllib.request.Request(server.url + path, headers=headers), timeout=5)
            info.value.close()
            assert info.value.code == code
        assert [(r.method, r.range) for r in server.requests][:2] == [("HEAD", None), ("GET", "bytes=4-")]
