"""`python -m dpo.sft`: the masked SFT loss, and a tiny run end to end that feeds dpo.train."""
from __future__ import annotations

import json

import pytest
import torch

from dpo import sft, train
from dpo.data import make_synthetic_pairs
from dpo.tokenization import TokenizedSequence, collate_sequences
from smollm import load_pretrained, load_tokenizer

from model_utils import random_model, save_random_checkpoint, small_config


def test_sft_loss_is_the_token_mean_nll_over_response_tokens_only():
    model = random_model(small_config())
    seqs = [  # prompt tokens (mask 0), response tokens (mask 1); rows of different lengths get padded
        TokenizedSequence([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], 2),
        TokenizedSequence([10, 11, 12], [0, 1, 1], 1),
        TokenizedSequence([13, 14, 15, 16, 17, 18, 19], [0, 0, 0, 0, 0, 0, 1], 6),
        TokenizedSequence([20, 21], [1, 1], 0),  # position 0 is predicted by nothing: only token 21 counts
    ]
    batch = collate_sequences(seqs, pad_token_id=0)
    nll_sum, n = sft.sft_nll(model, batch)
    with torch.no_grad():
        naive, count = 0.0, 0
        for s in seqs:  # each sequence alone, no padding at all
            logp = torch.log_softmax(model(torch.tensor([s.input_ids]))[0], -1)  # [T, V]
            for t in range(1, len(s.input_ids)):
                if s.response_mask[t]:
                    naive -= logp[t - 1, s.input_ids[t]].item()
                    count += 1
    assert int(n) == count == 3 + 2 + 1 + 1
    torch.testing.assert_close((nll_sum / n).item(), naive / count, rtol=1e-5, atol=1e-5)


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs), encoding="utf-8")
    return path


@pytest.mark.slow
def test_sft_end_to_end_lowers_held_out_nll_and_feeds_dpo(tmp_path, tokenizer_json, capsys):
    base = save_random_checkpoint(tmp_path / "base", small_config(), tokenizer=load_tokenizer(tokenizer_json))
    data = write_jsonl(tmp_path / "pairs.jsonl", make_synthetic_pairs(200))
    out = tmp_path / "sft"
    args = ["--model", str(base), "--data", str(data), "--output-dir", str(out), "--num-pairs", "48",
            "--eval-pairs", "16", "--batch-size", "8", "--lr", "1e-2", "--epochs", "2", "--max-steps", "6",
            "--no-progress"]
    assert sft.main(args) == 0

    ev = json.loads((out / "eval.json").read_text())
    before, after = ev["before"], ev["after"]
    assert before["nll"] > 9  # a random model: about ln(49152) = 10.8 nats per token
    assert after["nll"] < before["nll"] - 2, (before, after)  # 6 steps: 10.8 -> about 6.0
    assert after["perplexity"] == pytest.approx(torch.tensor(after["nll"]).exp().item(), rel=1e-4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # --max-steps cuts the 2 x 6 planned steps
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "final" / "tokenizer.json").is_file()
    model = load_pretrained(out / "final")
    assert model.tied  # full fine-tuning keeps the head tied to the embedding

    # Running again into the same directory is refused without --overwrite.
    capsys.readouterr()
    assert sft.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err

    # The SFT model is the DPO starting policy.
    dpo_args = ["--model", str(out / "final"), "--data", str(data), "--output-dir", str(tmp_path / "dpo"),
                "--no-filter", "--num-pairs", "8", "--eval-pairs", "4", "--batch-size", "4", "--train-last-n", "1",
                "--max-steps", "2", "--no-progress"]
    assert train.main(dpo_args) == 0
    assert (tmp_path / "dpo" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sft_with_lora_writes_peft_adapters_or_merged_weights(tmp_path, tokenizer_json):
    """dpo.sft takes dpo.train's LoRA flags: adapters train, and final/ is peft's folder, or with
    --merge-lora a HuggingFace model that dpo.train can start from."""
    from smollm.lora import load_peft

    base = save_random_checkpoint(tmp_path / "base", small_config(), tokenizer=load_tokenizer(tokenizer_json))
    data = write_jsonl(tmp_path / "pairs.jsonl", make_synthetic_pairs(60))
    common = ["--model", str(base), "--data", str(data), "--num-pairs", "16", "--eval-pairs", "8", "--batch-size",
              "8", "--lr", "1e-2", "--max-steps", "3", "--no-progress", "--lora-r", "4", "--lora-layers", "1"]
    assert sft.main(common + ["--output-dir", str(tmp_path / "peft")]) == 0
    ev = json.loads((tmp_path / "peft" / "eval.json").read_text())
    assert ev["after"]["nll"] < ev["before"]["nll"]  # the adapters learn
    adapted = load_pretrained(base)
    assert load_peft(adapted, tmp_path / "peft" / "final").layers == [1]
    assert sft.main(common + ["--output-dir", str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = load_pretrained(tmp_path / "merged" / "final")
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():  # the same run (same seed), two ways of writing it
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "0", "--lr: must be a positive"),
    ("--batch-size", "0", "--batch-size: must be at least 1"),
    ("--train-last-n", "-1", "--train-last-n: must be >= 0"),
    ("--max-steps", "0", "--max-steps: must be at least 1"),
])
def test_bad_arguments_are_a_clear_error(flag, value, message, capsys, tmp_path):
    assert sft.main([flag, value, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_train_last_n_beyond_the_model_is_refused(tmp_path, tokenizer_json, capsys):
    base = save_random_checkpoint(tmp_path / "base", small_config(), tokenizer=load_tokenizer(tokenizer_json))
    assert sft.main(["--model", str(base), "--train-last-n", "3", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--train-last-n 3: the model has only 2 blocks" in capsys.readouterr().err


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "chosen responses" in text and "--train-last-n" in text and "--no-filter" in text
