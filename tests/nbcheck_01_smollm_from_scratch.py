"""What tests/test_notebooks.py checks after running notebooks/01_smollm_from_scratch.ipynb (tiny mode)."""
from __future__ import annotations

from pathlib import Path

import torch


def check(ns: dict, out: Path) -> None:
    """Facts the notebook teaches, checked on what it computed."""
    # Each building block equals its formula written out inline.
    assert ns["rmsnorm_diff"] < 1e-6
    assert ns["rope_diff"] < 1e-6  # the module's rotation angles are theta_i = base^(-2i/D)
    scores = ns["rope_scores"]  # q.k after rotating both: depends only on n - m
    assert max(scores) - min(scores) < 1e-3 * max(1.0, abs(scores[0]))
    assert ns["attention_diff"] < 1e-5 and ns["mlp_diff"] < 1e-6 and ns["block_diff"] < 1e-6
    assert ns["forward_diff"] < 1e-5
    # Grouped-query attention: each KV head serves H / KV query heads.
    assert ns["H"] % ns["KV"] == 0 and ns["attn_weights"].shape[1] == ns["H"]
    rows = ns["attn_weights"][0].sum(-1)  # [H, T]: every query's weights sum to 1
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    # The parameter table adds up to num_parameters() of the real configuration.
    assert ns["per_block"] == 3_540_096
    assert ns["total_by_hand"] == ns["skeleton"].num_parameters() == 134_515_008
    # Q4_1 decoded by hand from its bytes equals what the library dequantizes to; 5 bits per weight.
    assert ns["q4_diff"] < 1e-6
    assert ns["raw"].shape[1] * 8 == ns["reference"].shape[1] * 5
    assert ns["codes"].min() >= 0 and ns["codes"].max() <= 15
    assert ns["bytes_fp32"] > 5 * ns["bytes_q"]  # fp32 in memory is over 5x the 4-bit file
    # Parity with transformers, when it is installed.
    if ns["logit_diff"] is not None:
        assert ns["logit_diff"] < 1e-4
    # Generation: the KV cache gives exactly the tokens of rerunning the whole sequence.
    assert ns["kv_same_tokens"]
    assert ns["with_cache"].shape[1] == ns["prompt_ids"].shape[1] + ns["N_NEW"]
    # Every figure was written where the test asked, as a PNG.
    assert set(ns["PNGS"]) == {"rope", "gqa", "attention", "swiglu", "parameters", "q4_1", "kv_cache"}
    for png in ns["PNGS"].values():
        assert png.parent == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
