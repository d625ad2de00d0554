"""`smollm.compiled.CompiledDecoder`: `generate`'s decoding steps compiled by TorchInductor make the
tokens the eager steps make (tests/test_generation.py ties those to the textbook loop), on a tiny
random model: left-padded batches with a shared system prompt, stop ids, one row, every cache length
from one compiled step; and it refuses what it cannot compile or would compute wrongly. Its speed,
and its tokens on the real SmolLM2-135M-Instruct: `python -m bench.generate_speed --compile`
(docs/benchmarks.md, section 16)."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from smollm import generate, load_pretrained
from smollm.compiled import CompiledDecoder, unsupported
from smollm.generation import StreamRecorder
from smollm.lora import LoRAConfig, add_lora

from model_utils import random_model, small_config
from test_generation import left_padded, prompts

pytestmark = [pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor compiles C++ with g++, not installed"),
              # PyTorch's own: Inductor's C++ backend still reaches torch.jit.script_method while compiling
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")]


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(num_hidden_layers=2), seed=13)


@pytest.fixture(scope="module")
def decoder(model):
    return CompiledDecoder(model)


def test_greedy_tokens_equal_the_eager_steps(model, decoder):
    ids, mask = left_padded(prompts([9, 3, 6], seed=2, system=4))
    ours = generate(model, ids, 24, attention_mask=mask, decoder=decoder)
    assert torch.equal(ours, generate(model, ids, 24, attention_mask=mask))
    assert list(decoder.compile_seconds) == [3] and decoder.compile_seconds[3] > 0


def test_one_compiled_step_serves_every_cache_length(model, decoder):
    graphs = counters["stats"]["unique_graphs"]
    for lengths, n in (([5, 2, 7], 9), ([12, 1, 4], 30)):  # other prompt lengths, other cache sizes
        ids, mask = left_padded(prompts(lengths, seed=n))
        assert torch.equal(generate(model, ids, n, attention_mask=mask, decoder=decoder),
                           generate(model, ids, n, attention_mask=mask))
    assert counters["stats"]["unique_graphs"] == graphs  # the batch of 3 was compiled already: nothing new
    assert list(decoder.compiled) == [3]


def test_stop_ids_end_rows_as_the_eager_steps_do(model, decoder):
    ids, mask = left_padded(prompts([4, 9, 6], seed=3))
    free = generate(model, ids, 20, attention_mask=mask)[:, ids.shape[1]:]
    stops = [int(free[0, 2]), int(free[2, 5])]  # rows 0 and 2 stop at different steps; row 1 runs on
    ours = generate(model, ids, 20, attention_mask=mask, eos_token_id=stops, decoder=decoder)
    assert torch.equal(ours, generate(model, ids, 20, attention_mask=mask, eos_token_id=stops))
    assert list(decoder.compiled) == [3]  # finished rows stayed in the batch: no batch of 2 compiled


def test_one_row_without_a_mask(model, decoder):
    ids = prompts([6], seed=5)[0]
    assert torch.equal(generate(model, ids, 12, decoder=decoder), generate(model, ids, 12))
    assert sorted(decoder.compiled) == [1, 3]


def test_sampling_runs_and_a_seeded_generator_repeats_it(model, decoder):
    ids, mask = left_padded(prompts([5, 8, 2], seed=4))
    runs = [generate(model, ids, 10, attention_mask=mask, temperature=0.8, top_k=50, decoder=decoder,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (3, ids.shape[1] + 10)
    assert int(runs[0].max()) < model.config.vocab_size


def test_a_changed_model_or_another_one_is_refused(model):
    twin = copy.deepcopy(model)
    decoder = CompiledDecoder(twin)
    ids = prompts([4], seed=6)[0]
    with pytest.raises(ValueError, match="another model"):
        generate(model, ids, 4, decoder=decoder)
    with torch.no_grad():
        twin.model.layers[1].mlp.down_proj.weight.add_(0.1)  # what an optimizer step does
    with pytest.raises(RuntimeError, match="parameters changed after its CompiledDecoder was built"):
        generate(twin, ids, 4, decoder=decoder)
    twin.load_state_dict(model.state_dict())  # load_state_dict copies in place: changed too
    with pytest.raises(RuntimeError, match="build a new CompiledDecoder"):
        generate(twin, ids, 4, decoder=decoder)
    assert decoder.compiled == {}  # refused before anything was compiled


def test_what_cannot_be_compiled_is_refused_with_the_reason(model, decoder):
    assert unsupported(model) == []
    with pytest.raises(ValueError, match="not fp32"):
        CompiledDecoder(copy.deepcopy(model).to(torch.bfloat16))
    adapted = copy.deepcopy(model)
    add_lora(adapted, LoRAConfig(r=4))
    with pytest.raises(ValueError, match="LoRA adapter"):
        CompiledDecoder(adapted)
    with pytest.raises(ValueError, match="StreamRecorder"):
        generate(model, prompts([4])[0], 4, record=StreamRecorder([1]), decoder=decoder)


def test_the_server_compiles_before_it_listens_and_answers_as_generate_does(tmp_path, tokenizer_json):
    """`python -m smollm.serve --compile` on a tiny random checkpoint: the step compiled at start (it
    says so, with the time), then a greedy answer equal to the eager `generate`'s."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from smollm import load_tokenizer

    from model_utils import save_random_checkpoint

    tokenizer = load_tokenizer(tokenizer_json)
    folder = save_random_checkpoint(tmp_path / "tiny", small_config(num_hidden_layers=2), seed=3, tokenizer=tokenizer)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "smollm.serve", "--model", str(folder), "--port", "0",
                             "--device", "cpu", "--compile"], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        request = urllib.request.Request(url + "/chat/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"messages": messages, "temperature": 0,
                                                          "max_tokens": 12}).encode())
        with urllib.request.urlopen(request, timeout=120) as reply:
            text = json.loads(reply.read())["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    err = proc.stderr.read()
    assert "compiling the decoding step" in err and "compiled in" in err
    model, tokenizer = load_pretrained(folder), load_tokenizer(folder)  # as the server loaded them
    assert tokenizer.chat_template is None  # so the server wrote the prompt as plain ChatML
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.encode_ids(prompt)])
    stops = list(dict.fromkeys(list(tokenizer.stop_token_ids) + [tokenizer.eos_token_id]))
    new = generate(model, ids, 12, eos_token_id=stops)[0, ids.shape[1]:].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert len(new) >= 4 and text == tokenizer.decode(new, skip_special_tokens=True)


def test_the_server_refuses_to_compile_what_it_cannot(tmp_path, tokenizer_json):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from smollm import load_tokenizer

    from model_utils import save_random_checkpoint

    folder = save_random_checkpoint(tmp_path / "tiny", small_config(num_hidden_layers=1), tokenizer=load_tokenizer(tokenizer_json))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "smollm.serve", "--model", str(folder), "--port", "0",
                           "--device", "cpu", "--dtype", "bfloat16", "--compile"], cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "error: --compile: the model is not fp32"
