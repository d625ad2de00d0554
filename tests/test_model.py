"""The hand-written SmolLM against transformers' LlamaForCausalLM, and its own invariants."""
from __future__ import annotations

import pytest
import torch

from smollm import SMOLLM_135M, SmolLM, generate, load_pretrained
from smollm.model import KVCache

from model_utils import random_model, save_random_checkpoint, small_config

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle (pip install -r requirements-dev.txt)")

UNTIED_ONE_KV = small_config(tie_word_embeddings=False, num_key_value_heads=1, rope_theta=100000.0,
                             num_hidden_layers=3)


def hf_model(directory):
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


# The bigger sizes' attention at a small width: 1.7B's 32 heads with as many KV heads (no grouping),
# rope_theta 130000; 360M's 15 query heads sharing 5 KV heads (3 each).
HEADS_1_7B = small_config(vocab_size=2048, hidden_size=128, num_attention_heads=32, num_key_value_heads=32,
                          rope_theta=130000.0, max_position_embeddings=8192)
HEADS_360M = small_config(vocab_size=2048, hidden_size=120, num_attention_heads=15, num_key_value_heads=5,
                          rope_theta=100000.0)


@pytest.mark.parametrize("config", [SMOLLM_135M, UNTIED_ONE_KV, HEADS_1_7B, HEADS_360M],
                         ids=["smollm-135m", "untied-1kv-theta1e5", "heads-of-1.7b", "heads-of-360m"])
def test_logits_match_transformers(tmp_path, config):
    save_random_checkpoint(tmp_path, config, seed=1)
    ours, theirs = load_pretrained(tmp_path), hf_model(tmp_path)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits
    diff = (a - b).abs().max().item()
    print(f"max |logit difference| = {diff:.2e}")
    assert diff <= 1e-4


def test_untied_checkpoint_really_untied(tmp_path):
    save_random_checkpoint(tmp_path, UNTIED_ONE_KV)
    model = load_pretrained(tmp_path)
    assert not model.tied
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_parameter_names_are_huggingfaces():
    model = SmolLM(small_config(tie_word_embeddings=False))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict()))
    assert set(dict(model.named_parameters())) == set(dict(hf.named_parameters()))


def test_right_padding_leaves_real_logits_unchanged():
    model = random_model(small_config())
    ids = torch.randint(0, 1000, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        ref = model(ids)
        out = model(padded, mask)
    torch.testing.assert_close(out[:, :10], ref, atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


def test_left_padding_counts_positions_from_first_real_token():
    model = random_model(small_config())
    a, b = torch.randint(0, 1000, (1, 10)), torch.randint(0, 1000, (1, 6))
    batch = torch.cat([a, torch.cat([torch.full((1, 4), 7), b], dim=1)])  # row 1 left-padded
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        out = model(batch, mask)
        ref_a, ref_b = model(a), model(b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], ref_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 4:], ref_b[0], atol=1e-5, rtol=0)


def test_kv_cache_steps_equal_full_forward():
    model = random_model(small_config(num_hidden_layers=3))
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 12)
        steps = [model(ids[:, :5], kv_cache=cache)]  # a 5-token prefill, then one token at a time
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], torch.ones(2, t + 1, dtype=torch.long), kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 12


def test_left_padded_prompt_is_cached_packed_and_finished_rows_can_leave():
    """A left-padded prompt batch runs as its real tokens only, each token's k, v written to its
    slot (padding slots zeroed): the next steps give the logits of the padded path. `keep` then
    drops rows, and the rows kept go on as before."""
    torch.manual_seed(0)
    model = random_model(small_config(num_hidden_layers=2)).eval()
    ids = torch.randint(3, 1000, (3, 7))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 0, 1, 1]])
    nxt = torch.randint(3, 1000, (3, 3))
    with torch.no_grad():
        packed, padded = model.new_kv_cache(3, 10), model.new_kv_cache(3, 10)
        for t in packed.keys + packed.values:
            t.fill_(float("nan"))  # what an uninitialised buffer may hold
        a = model(ids, mask, kv_cache=packed)
        b = model(ids, mask, kv_cache=padded, pack=False)
        real = mask.bool()
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)
        assert packed.length == padded.length == 7
        grown = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        a, b = model(nxt[:, :1], grown, kv_cache=packed), model(nxt[:, :1], grown, kv_cache=padded)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        keep = torch.tensor([2, 0])
        packed.keep(keep)
        assert packed.batch_size == 2 and packed.length == 8
        grown = torch.cat([grown, torch.ones(3, 1, dtype=torch.long)], dim=1)
        a = model(nxt[keep, 1:2], grown[keep], kv_cache=packed)
        b = model(nxt[:, 1:2], grown, kv_cache=padded)[keep]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_common_prefixes_pair_each_row_with_the_earlier_row_it_shares_most_with():
    from smollm.layout import common_prefixes

    P = [5, 6, 7, 8]  # a "system prompt"
    rows = [P + [9, 10], P + [11], P[:3], [20, 21], P + [9, 10], [5, 6, 30], []]
    T = 7
    left = torch.zeros(len(rows), T, dtype=torch.long)
    right = torch.zeros(len(rows), T, dtype=torch.long)
    ids = torch.full((len(rows), T), 99)
    for b, r in enumerate(rows):
        left[b, T - len(r):] = 1
        right[b, :len(r)] = 1
        if r:
            ids[b, T - len(r):] = torch.tensor(r)
    expected = [(0, 1), (0, 2), (0, 4), (0, 5)]  # row 3 shares nothing, the empty row nothing
    assert common_prefixes(ids, left) == expected
    right_ids = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, left)])
    assert common_prefixes(right_ids, right) == expected
    assert common_prefixes(ids[:1], left[:1]) == []


def test_a_prompt_batch_runs_its_common_prefixes_once():
    """Rows sharing leading tokens (a chat template's system prompt; a row that is another's
    prefix; a duplicate) are cached from one computation of the shared tokens: block 0 sees only
    the tokens not shared, every row's cache slots hold its keys and values (zeros at padding),
    and the logits, now and at the next steps, are those of the padded path."""
    torch.manual_seed(0)
    model = random_model(small_config(num_hidden_layers=2)).eval()
    system = torch.randint(3, 1000, (6,)).tolist()
    rows = [system + [11, 12, 13], system + [14], system[:4], [15, 16], system + [11, 12, 13]]
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda block, args, x: seen.append(x.shape))
    with torch.no_grad():
        shared, padded = model.new_kv_cache(5, T + 2), model.new_kv_cache(5, T + 2)
        for t in shared.keys + shared.values:
            t.fill_(float("nan"))  # what an uninitialised buffer may hold
        a = model(ids, mask, kv_cache=shared)
        b = model(ids, mask, kv_cache=padded, pack=False)
        hook.remove()
        assert seen[0] == (1, 9 + 1 + 0 + 2 + 0, 64)  # row 0 whole; 1 token of row 1; row 3; nothing of 2, 4
        real = mask.bool()
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)
        for x, y in zip(shared.keys + shared.values, padded.keys + padded.values):
            torch.testing.assert_close(x[:, :, :T].transpose(1, 2)[real], y[:, :, :T].transpose(1, 2)[real],
                                       atol=1e-5, rtol=0)
            assert not x[:, :, :T].transpose(1, 2)[~real].any()  # padding slots: zeros, no NaN
        for step in range(2):
            grown = torch.cat([mask, torch.ones(5, step + 1, dtype=torch.long)], dim=1)
            nxt = torch.full((5, 1), 40 + step)
            torch.testing.assert_close(model(nxt, grown, kv_cache=shared), model(nxt, grown, kv_cache=padded),
                                       atol=1e-5, rtol=0)


def test_kv_cache_overflow_is_an_error():
    cache = KVCache(1, 1, 4, 1, 8)
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.update(0, torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 5, 8))


def test_greedy_generate_matches_transformers(tmp_path):
    config = small_config(num_hidden_layers=3)
    save_random_checkpoint(tmp_path, config, seed=3)
    ours, theirs = load_pretrained(tmp_path), hf_model(tmp_path)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(5))
    mine = generate(ours, ids, max_new_tokens=32)
    ref = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert mine.shape == (2, 41)
    assert torch.equal(mine, ref)


def test_generate_stops_rows_at_eos_and_pads_with_it():
    model = random_model(small_config())
    ids = torch.randint(0, 1000, (1, 4))
    first = generate(model, ids, max_new_tokens=1)[0, -1].item()
    out = generate(model, ids, max_new_tokens=10, eos_token_id=first)  # EOS is the first greedy token
    assert out.shape == (1, 5) and out[0, -1].item() == first


def test_generate_left_padded_batch_equals_single_rows():
    model = random_model(small_config())
    a, b = torch.randint(0, 1000, (1, 8)), torch.randint(0, 1000, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    out = generate(model, batch, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(out[0], generate(model, a, 6)[0])
    assert torch.equal(out[1, 3:], generate(model, b, 6)[0])


def test_sampling_with_top_k_1_is_greedy():
    model = random_model(small_config())
    ids = torch.randint(0, 1000, (1, 4))
    sampled = generate(model, ids, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(model, ids, 8))


def test_top_p_keeps_the_smallest_set_reaching_p():
    from smollm.generation import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]


def test_bf16_model_keeps_fp32_rotary_tables():
    model = SmolLM(small_config()).to(torch.bfloat16)
    assert model.rotary.cos.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(model(torch.randint(0, 100, (1, 6))).float()).all()


def test_sequence_longer_than_max_positions_is_refused():
    model = SmolLM(small_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


class _ScriptRows:
    """ScriptedLM's KV cache: which script rows are still in the batch (`generate` drops finished ones)."""

    def __init__(self, batch: int):
        self.rows = list(range(batch))

    def keep(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in rows.tolist()]


class ScriptedLM(torch.nn.Module):
    """Stands in for a SmolLM in generate(): row b emits script[b][step], whatever it is fed."""

    def __init__(self, script: list[list[int]], vocab: int = 16):
        super().__init__()
        self.script, self.vocab, self.step = script, vocab, 0
        self.config = small_config()

    def new_kv_cache(self, batch: int, length: int):
        return _ScriptRows(batch)

    def forward(self, tokens, mask, kv_cache=None, last_only=False):
        rows = kv_cache.rows
        assert tokens.shape[0] == mask.shape[0] == len(rows)  # generate feeds the rows still going, only
        logits = torch.zeros(len(rows), tokens.shape[1], self.vocab)
        for i, b in enumerate(rows):
            logits[i, -1, self.script[b][self.step]] = 1.0
        self.step += 1
        return logits


def test_generate_accepts_several_eos_ids():
    """As transformers' eos_token_id list: any of them ends a row, which is then padded with the first."""
    ids = torch.zeros(2, 3, dtype=torch.long)
    script = [[5, 6, 2, 7, 7, 7], [8, 0, 9, 9, 9, 9]]  # row 0 ends on 2 (<|im_end|>), row 1 on 0 (<|endoftext|>)
    out = generate(ScriptedLM(script), ids, max_new_tokens=6, eos_token_id=[2, 0])
    assert out[:, 3:].tolist() == [[5, 6, 2], [8, 0, 2]]  # stops when both are done; row 1 padded with the first id
    assert generate(ScriptedLM(script), ids, 6, eos_token_id=0)[:, 3:].tolist() == [[5, 6, 2, 7, 7, 7],
                                                                                   [8, 0, 0, 0, 0, 0]]
    assert generate(ScriptedLM(script), ids, 6, eos_token_id=[])[:, 3:].tolist() == script
    # Three rows: row 1 ends first and leaves the batch; its columns still read the first stop id.
    script = [[5, 6, 7, 2, 7, 7], [0, 9, 9, 9, 9, 9], [8, 8, 8, 8, 8, 2]]
    out = generate(ScriptedLM(script), torch.zeros(3, 3, dtype=torch.long), 6, eos_token_id=[2, 0])
    assert out[:, 3:].tolist() == [[5, 6, 7, 2, 2, 2], [0, 2, 2, 2, 2, 2], [8, 8, 8, 8, 8, 2]]


class _Scaled(torch.nn.Module):
    """A stand-in adapter: a Linear whose output is scaled (what a LoRA-wrapped layer looks like
    to the model: a module, not a weight)."""

    def __init__(self, linear: torch.nn.Linear, scale: float):
        super().__init__()
        self.linear, self.scale = linear, scale

    def forward(self, x):
        return self.linear(x) * self.scale


def test_the_mlp_calls_a_down_projection_it_cannot_fuse():
    """The fused SwiGLU kernel reads down_proj's weight only when down_proj is a plain Linear;
    a wrapped module or a hook is called as itself (no module's weight read around its forward)."""
    from smollm.autograd import plain_linear

    torch.manual_seed(0)
    model = random_model(small_config())
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size)
    assert plain_linear(mlp.down_proj)
    plain = mlp(x)
    torch.testing.assert_close(plain, mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    mlp.down_proj = _Scaled(mlp.down_proj, 2.0)
    assert not plain_linear(mlp.down_proj)
    torch.testing.assert_close(mlp(x), 2 * plain)
    mlp.down_proj = mlp.down_proj.linear
    handle = mlp.down_proj.register_forward_hook(lambda module, args, out: out * 3)
    assert not plain_linear(mlp.down_proj)
    torch.testing.assert_close(mlp(x), 3 * plain)
    handle.remove()
    assert plain_linear(mlp.down_proj)


def test_a_layout_is_causal_masked_or_packed():
    from smollm.layout import Layout, Packing

    with pytest.raises(ValueError, match="not both"):
        Layout(mask=torch.ones(1, 1, 2, 2, dtype=torch.bool), segments=())
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    packing = Packing.of(mask)
    assert packing.layout.segments == tuple(packing.segments) and packing.layout.mask is None
    model = random_model(small_config())
    ids = torch.randint(5, 100, (2, 4))
    positions, layout = model.positions_and_layout(ids, torch.ones_like(ids))
    assert layout.mask is None and layout.segments is None  # no padding: plain causal
    positions, layout = model.positions_and_layout(ids, mask)
    assert layout.mask.shape == (2, 1, 4, 4) and positions[1].tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_masked_layout_attends_as_sdpa_with_its_boolean_mask(dtype):
    """Layout.attend turns its boolean mask into SDPA's additive one once per dtype and keeps it;
    the output has the very bits of SDPA given the boolean mask (which converts it at each call)."""
    import torch.nn.functional as F

    from smollm.layout import Layout

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 3, 8, generator=g).to(dtype)  # [B, H, T, D]
    k, v = (torch.randn(2, 2, 5, 8, generator=g).to(dtype) for _ in range(2))  # [B, KV, S, D]
    mask = torch.rand(2, 1, 3, 5, generator=g) > 0.4
    mask[..., -1] = True  # every query sees at least one key
    layout = Layout(mask=mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(layout.attend(q, k, v), expected)
    assert layout.additive_mask(dtype) is layout.additive_mask(dtype)  # made once
    assert layout.additive_mask(dtype).dtype == dtype
    assert torch.equal(layout.additive_mask(dtype) == 0, mask)


def test_key_windows_split_rows_only_where_the_reading_shrinks():
    from smollm.layout import _split_rows

    # 16 long prompts (keys from 0) then 16 short ones (from 450) of 640 positions: two groups
    assert _split_rows([0] * 16 + [450] * 16, 640, 0, 32) == ((0, 16, 0), (16, 32, 450))
    assert _split_rows([0, 10, 20, 30], 640, 0, 4) == ((0, 4, 0),)  # nothing worth a second call
    assert _split_rows([300] * 8, 640, 0, 8) == ((0, 8, 300),)  # one group, still from its first key
    # split in two at 16, then each half again only where that saves a quarter of its reading:
    # rows 0-15 (8 x 640 + 8 x 440 against 16 x 640) stay together, rows 16-31 split
    assert _split_rows([0] * 8 + [200] * 8 + [400] * 8 + [600] * 8, 640, 0, 32) == (
        (0, 16, 0), (16, 24, 400), (24, 32, 600))
    groups = _split_rows(list(range(0, 600, 19)), 640, 0, 32)
    assert [g[:2] for g in groups] == sorted(g[:2] for g in groups) and groups[0][0] == 0 and groups[-1][1] == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoding_step_attends_from_each_groups_first_key(dtype):
    """One query per row (a decoding step of a left-padded batch): rows with long and short prompts
    attend in groups, each from its first visible key; the output equals SDPA over all keys."""
    import torch.nn.functional as F

    from smollm.layout import Layout

    g = torch.Generator().manual_seed(1)
    B, S = 16, 300
    first = torch.tensor([0, 3, 5, 9, 1, 2, 4, 6, 250, 255, 260, 270, 251, 252, 253, 254])  # each row's first real key
    mask = (torch.arange(S)[None, :] >= first[:, None])[:, None, None, :]  # [B, 1, 1, S]
    q = torch.randn(B, 6, 1, 8, generator=g).to(dtype)  # [B, H, 1, D]
    k, v = (torch.randn(B, 2, S, 8, generator=g).to(dtype) for _ in range(2))  # [B, KV, S, D]
    layout = Layout(mask=mask)
    assert layout.key_windows() == ((0, 8, 0), (8, 16, 250))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(layout.attend(q, k, v), expected, **tol)


def test_rms_norm_keeps_the_bits_of_mean():
    """The norm's mean of squares, written as a sum divided by C, has mean's very bits."""
    from smollm.autograd import _rstd

    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(4, 7, 576, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
        assert torch.equal(_rstd(x, 1e-5), torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5))


@pytest.mark.parametrize("padded", [False, True])
def test_hidden_states_in_two_slices_equal_one_pass(padded):
    """hidden_states(end=k) then hidden_states(start=k, x=...) is the full pass, padded rows (packed)
    included: what lets two models that share their first k blocks run them once."""
    model = random_model(small_config(num_hidden_layers=3), seed=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    if padded:
        mask[1, 5:] = 0
    with torch.no_grad():
        full = model.hidden_states(ids, mask)
        trunk = model.hidden_states(ids, mask, end=2)  # not normed: the stream after block 1
        torch.testing.assert_close(model.hidden_states(ids, mask, start=2, x=trunk), full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly when start > 0"):
        model.hidden_states(ids, mask, start=2)


@pytest.mark.parametrize("packed", [False, True])
def test_run_layers_with_keep_runs_the_last_block_at_those_positions_only(packed):
    """keep: the last block's output at some positions of one row, the others giving attention
    their keys and values only: the full pass's values there, and the same gradients (what the
    training engine uses for the positions its LM head scores)."""
    from smollm.layout import Layout, Packing

    model = random_model(small_config(num_hidden_layers=3), seed=5)
    g = torch.Generator().manual_seed(5)
    if packed:  # two rows sharing 4 leading tokens, the second left-padded by 2
        ids = torch.randint(5, 1000, (2, 11), generator=g)
        ids[1, 2:6] = ids[0, :4]
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[1, :2] = 0
        packing = Packing.of(mask, ids, [(0, 1)])
        x = packing.pack(model.model.embed_tokens(ids))  # [1, N, C]
        positions, layout = packing.position_ids, packing.layout
        assert len(packing.segments) == 2 and packing.segments[1].prefix_length == 4
    else:
        ids = torch.randint(5, 1000, (1, 11), generator=g)
        x = model.model.embed_tokens(ids)
        positions, layout = torch.arange(11)[None], Layout()
    N = x.shape[1]
    keep = torch.tensor([0, 3, 4, N - 6, N - 2, N - 1])  # in both segments when packed
    x = x.detach().requires_grad_(True)
    full = model.run_layers(x, positions, layout)[:, keep]  # [1, 6, C]
    (gx_full,) = torch.autograd.grad(full.square().sum(), x)
    part = model.run_layers(x, positions, layout, keep=keep)
    assert part.shape == (1, len(keep), model.config.hidden_size)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)
    (gx_part,) = torch.autograd.grad(part.square().sum(), x)
    torch.testing.assert_close(gx_part, gx_full, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"keep needs a last block to run: blocks \[3, 3\) are none"):
        model.run_layers(x, positions, layout, start=3, keep=keep)
    with pytest.raises(ValueError, match="one row, causal or packed"):
        Layout(mask=torch.ones(1, 1, N, N, dtype=torch.bool)).attend(torch.zeros(1, 4, 2, 16),
                                                                     torch.zeros(1, 2, N, 16),
                                                                     torch.zeros(1, 2, N, 16), queries=keep[:2])
