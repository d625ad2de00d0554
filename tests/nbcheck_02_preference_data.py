"""What tests/test_notebooks.py checks after running notebooks/02_preference_data.ipynb (tiny mode)."""
from __future__ import annotations

from pathlib import Path


def check(ns: dict, out: Path) -> None:
    """Facts the notebook teaches, checked on what it computed."""
    # An HH row splits at the last "\n\nAssistant:", and prompt + response gives the transcript back.
    row = ns["raw_row"]
    assert ns["split_prompt"].endswith("\n\nAssistant:")
    assert ns["split_prompt"] + ns["split_chosen"] == row["chosen"]
    assert ns["split_prompt"] + ns["split_rejected"] == row["rejected"]
    pairs = ns["pairs"]
    assert len(pairs) == 400  # tiny mode: 200 usable pairs from each split
    # The filter report adds up, and it kept some pairs but not all.
    report, kept = ns["report"], ns["kept"]
    assert report.total == len(pairs)
    assert report.kept == len(kept) and report.kept + sum(report.rejected.values()) == report.total
    assert 0 < report.kept < report.total
    assert ns["remaining"][0] == report.total and ns["remaining"][-1] == report.kept
    # Rules on their own: all off keeps everything; the first rule's count is the same either way,
    # and no rule removes fewer pairs alone than the report credits it with.
    assert ns["all_off_report"].kept == len(pairs)
    alone = ns["alone"]
    assert alone["chosen_length"] == report.rejected["chosen_length"]
    assert all(alone[rule] >= report.rejected[rule] for rule in report.rejected)
    # The response mask: 0 on the prompt, 1 from the first response token through EOS, on both sides.
    tp, eos = ns["tp"], ns["EOS"]
    for ids, mask in ((tp.chosen_ids, tp.chosen_mask), (tp.rejected_ids, tp.rejected_mask)):
        assert mask == [0] * tp.prompt_len + [1] * (len(ids) - tp.prompt_len)
        assert ids[-1] == eos
    assert tp.chosen_ids[:tp.prompt_len] == tp.rejected_ids[:tp.prompt_len]
    # A collated batch: 2B rows (chosen, then rejected), the response inside the real tokens.
    batch, B = ns["batch"], ns["B"]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["response_mask"].shape
    assert batch["input_ids"].shape[0] == 2 * B and batch["pair_index"].shape == (B,)
    assert bool((batch["response_mask"] <= batch["attention_mask"]).all())
    # The chat rendering: ChatML prompt, and each side ends with <|im_end|>, which is the EOS id.
    chat_tp = ns["chat_tp"]
    assert chat_tp is not None, "the tokenizer has no chat template"
    assert ns["chat_pair"].prompt.startswith("<|im_start|>") and ns["chat_pair"].prompt.endswith("<|im_start|>assistant\n")
    assert chat_tp.chosen_ids[-1] == chat_tp.rejected_ids[-1] == eos == ns["tokenizer"].token_to_id("<|im_end|>")
    assert chat_tp.chosen_mask == [0] * chat_tp.prompt_len + [1] * (len(chat_tp.chosen_ids) - chat_tp.prompt_len)
    assert ns["chat_report"].rendered == len(kept)
    # Every figure was written where the test asked, as a PNG.
    assert set(ns["PNGS"]) == {"turns", "filter", "lengths", "tokens_plain", "batch", "tokens_chat"}
    for png in ns["PNGS"].values():
        assert png.parent == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
