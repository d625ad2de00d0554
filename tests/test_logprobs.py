"""sequence_logprobs / token_logprobs against a naive loop over math.log(softmax)."""
from __future__ import annotations

import math

import pytest
import torch

from dpo.logprobs import sequence_logprobs, token_logprobs

B, T, V = 4, 9, 13


def naive_sequence_logprobs(logits, input_ids, response_mask, reduction="sum"):
    """Triple loop in float64 Python: for each row, each position t >= 1 with mask 1,
    log softmax(logits[b, t-1])[input_ids[b, t]]."""
    out = []
    for b in range(logits.shape[0]):
        total, n = 0.0, 0
        for t in range(1, logits.shape[1]):
            if int(response_mask[b, t]) != 1:
                continue
            row = [float(x) for x in logits[b, t - 1]]
            z = sum(math.exp(x) for x in row)
            total += math.log(math.exp(row[int(input_ids[b, t])]) / z)
            n += 1
        out.append(total / n if reduction == "mean" else total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g) * 2
    input_ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, 1, 1, 1],  # prompt 3, response to the end
            [0, 0, 1, 1, 1, 0, 0, 0, 0],  # prompt 2, response 3, right padding 4
            [0, 0, 0, 0, 0, 1, 1, 1, 1],  # left padding 2, prompt 3, response 4
            [1, 1, 0, 0, 0, 0, 0, 0, 1],  # position 0 masked in: it must not count
        ]
    )
    return logits, input_ids, mask


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_against_naive_loop(batch, reduction):
    logits, ids, mask = batch
    got = sequence_logprobs(logits, ids, mask, reduction=reduction)
    want = naive_sequence_logprobs(logits, ids, mask, reduction)
    assert got.dtype == torch.float32 and got.shape == (B,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_mean_is_sum_over_count(batch):
    logits, ids, mask = batch
    s = sequence_logprobs(logits, ids, mask, "sum")
    m = sequence_logprobs(logits, ids, mask, "mean")
    counts = torch.tensor([6.0, 3.0, 4.0, 2.0])  # row 3: positions 1 and 8, not 0
    torch.testing.assert_close(m, s / counts)


def test_prompt_and_padding_never_count(batch):
    """Changing logits/ids at positions that are not counted leaves the result unchanged."""
    logits, ids, mask = batch
    before = sequence_logprobs(logits, ids, mask)
    logits2, ids2 = logits.clone(), ids.clone()
    # row 1: positions 5.. are padding -> their ids and the logits predicting them (4..) are free
    ids2[1, 5:] = 0
    logits2[1, 5:] = 100.0
    logits2[1, 4, :] = 7.0  # predicts padding token 5
    # row 2: left padding and prompt (positions 0..4) -> logits 0..3 predict uncounted tokens
    logits2[2, :4] = -50.0
    ids2[2, :5] = 1
    after = sequence_logprobs(logits2, ids2, mask)
    torch.testing.assert_close(after, before)


def test_token_logprobs_alignment():
    """logits[:, t] predicts input_ids[:, t+1]: put all mass on a known next token."""
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    logits = torch.full((1, 5, 6), -1e4)
    for t in range(4):
        logits[0, t, ids[0, t + 1]] = 0.0
    lp = token_logprobs(logits, ids)
    assert lp.shape == (1, 4)
    torch.testing.assert_close(lp, torch.zeros(1, 4))
    # uniform logits -> every token has log-prob -ln V
    lp = token_logprobs(torch.zeros(1, 5, 6), ids)
    torch.testing.assert_close(lp, torch.full((1, 4), -math.log(6)))


def test_matches_log_softmax_on_large_vocab():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 49152, generator=g) * 3
    ids = torch.randint(0, 49152, (2, 6), generator=g)
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1000])
def test_chunking_does_not_change_result(batch, chunk_size):
    logits, ids, mask = batch
    ref = sequence_logprobs(logits, ids, mask, chunk_size=8)
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask, chunk_size=chunk_size), ref, rtol=0, atol=0)


def test_bf16_logits(batch):
    """bf16 logits are upcast: exact w.r.t. the bf16 values, close to the fp32 original."""
    logits, ids, mask = batch
    lb = logits.bfloat16()
    got = sequence_logprobs(lb, ids, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_sequence_logprobs(lb.double(), ids, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, sequence_logprobs(logits, ids, mask), rtol=0.02, atol=0.1)


def test_bool_mask_accepted(batch):
    logits, ids, mask = batch
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask.bool()), sequence_logprobs(logits, ids, mask))


def test_gradient_flows_only_through_counted_positions(batch):
    logits, ids, mask = batch
    logits = logits.clone().requires_grad_()
    sequence_logprobs(logits, ids, mask).sum().backward()
    g = logits.grad
    # d/d logits[b, t-1] of log softmax(.)[id] = onehot(id) - softmax, for counted t
    for b in range(B):
        for t in range(1, T):
            row = g[b, t - 1]
            if mask[b, t]:
                want = torch.nn.functional.one_hot(ids[b, t], V).float() - torch.softmax(logits[b, t - 1].detach(), -1)
                torch.testing.assert_close(row, want)
            else:
                assert torch.all(row == 0), (b, t)
    assert torch.all(g[:, -1] == 0)  # the last position predicts nothing


def test_bf16_gradient_flows(batch):
    logits, ids, mask = batch
    lb = logits.bfloat16().requires_grad_()
    sequence_logprobs(lb, ids, mask, "mean").sum().backward()
    assert lb.grad is not None and lb.grad.dtype == torch.bfloat16 and lb.grad.abs().sum() > 0


def test_sum_over_empty_row_is_zero(batch):
    logits, ids, mask = batch
    mask = mask.clone()
    mask[2] = 0
    assert sequence_logprobs(logits, ids, mask)[2].item() == 0.0


def test_mean_over_empty_row_raises_naming_row(batch):
    logits, ids, mask = batch
    mask = mask.clone()
    mask[1] = 0
    mask[3] = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0])  # only position 0: nothing counted
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 3\]"):
        sequence_logprobs(logits, ids, mask, reduction="mean")


def test_shape_errors_name_tensor_and_shapes(batch):
    logits, ids, mask = batch
    with pytest.raises(ValueError, match=r"logits.*\(9, 13\)"):
        sequence_logprobs(logits[0], ids, mask)
    with pytest.raises(ValueError, match=r"input_ids.*\(4, 8\)") as err:
        sequence_logprobs(logits, ids[:, :-1], mask)
    assert "(4, 9, 13)" in str(err.value)
    with pytest.raises(ValueError, match=r"response_mask.*\(4, 8\).*\(4, 9\)"):
        sequence_logprobs(logits, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        sequence_logprobs(logits, ids[None], mask)


def test_other_errors(batch):
    logits, ids, mask = batch
    with pytest.raises(ValueError, match="reduction"):
        sequence_logprobs(logits, ids, mask, reduction="avg")
    with pytest.raises(ValueError, match="0 and 1"):
        sequence_logprobs(logits, ids, mask * 2)
    bad = ids.clone()
    bad[0, 3] = -100
    with pytest.raises(ValueError, match="-100"):
        sequence_logprobs(logits, bad, mask)
    bad[0, 3] = V
    with pytest.raises(ValueError, match="input_ids"):
        sequence_logprobs(logits, bad, mask)
    with pytest.raises(ValueError, match="integer"):
        sequence_logprobs(logits, ids.float(), mask)
