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

from smollm import generate
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
