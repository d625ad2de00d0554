"""Reliability of `dpo.train`: checkpoints, non-finite steps, bad data, and no pickle anywhere.

docs/reliability.md lists each guarantee with the test that shows it. Runs here are
in-process (`dpo.train.run` / `main`) on a 2-block random SmolLM and synthetic pairs; the
subprocess runs (SIGKILL, SIGINT, SIGTERM) are in tests/test_resume.py.
"""
from __future__ import annotations

import ast
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo.checkpointing
import dpo.train
from dpo.checkpointing import CheckpointLoadError, list_checkpoints, load_checkpoint, save_checkpoint
from dpo.config import TrainConfig
from dpo.data import ASSISTANT, HUMAN, make_synthetic_pairs
from dpo.train import main, prepare_data, run
from dpo.trainer import DPOTrainer
from smollm import SmolLMConfig, load_tokenizer

from model_utils import save_random_checkpoint, small_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp("tiny")
    save_random_checkpoint(root / "model", small_config(), tokenizer=load_tokenizer(tokenizer_json))
    write_rows(root / "pairs.jsonl", [row(p) for p in make_synthetic_pairs(24, seed=2)])
    return root


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr(dpo.train, "plot_curves", lambda *a, **k: None)  # matplotlib costs seconds


def row(pair) -> dict:
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}


def write_rows(path: Path, rows: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """JSONL with `rows`; raw_lines {index: bytes} puts exact bytes at those 0-based lines."""
    lines = [json.dumps(r).encode() for r in rows]
    for i, raw in sorted((raw_lines or {}).items()):
        lines.insert(i, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def small_run(tiny: Path, out: Path, **overrides) -> TrainConfig:
    kw = dict(model=str(tiny / "model"), data=[str(tiny / "pairs.jsonl")], output_dir=str(out), filter=False,
              train_last_n=1, freeze_head=False, batch_size=2, num_pairs=12, eval_pairs=2, max_steps=4, progress=False)
    kw.update(overrides)
    return TrainConfig(**kw)


def cli(tiny: Path, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["--model", str(tiny / "model"), "--data", str(data or tiny / "pairs.jsonl"),
            "--output-dir", str(out), "--no-filter", "--train-last-n", "1", "--batch-size", "2",
            "--num-pairs", "12", "--eval-pairs", "2", "--max-steps", "4", "--no-progress", *extra]


def error_line(capsys) -> str:
    """The CLI's error: the last stderr line, `error: ...`, and no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-2000:]
    return last


@pytest.fixture
def never_load_model(monkeypatch):
    """Fail the test if the model weights are loaded: the error must come before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_pretrained was called: the check came after the expensive work")

    monkeypatch.setattr(dpo.train, "load_pretrained", refuse)


# ====================================================================== 1. checkpoints
def test_checkpoints_hold_everything_needed_to_resume(tiny, tmp_path):
    out = tmp_path / "run"
    config = small_run(tiny, out, save_every=2, max_steps=5, keep_checkpoints=2, eval_every=2)
    run(config)
    ckpts = list_checkpoints(out)
    # every --save-every steps (2, 4) and at the end (5); only the newest --keep-checkpoints kept
    assert [p.name for p in ckpts] == ["step-000004", "step-000005"]
    assert all(sorted(os.listdir(p)) == ["state.json", "state.safetensors"] for p in ckpts)  # nothing pickled

    tensors, meta, where = load_checkpoint(out)  # a run directory means its latest checkpoint
    assert where == ckpts[-1]
    final = load_file(out / "final" / "model.safetensors")
    trainable = {k.removeprefix("model.") for k in tensors if k.startswith("model.")}
    # only the trainable part: the last block, the final norm and the (untied) head
    assert trainable == {k for k in final if k.startswith(("model.layers.1.", "model.norm.", "lm_head."))}
    assert all(torch.equal(tensors[f"model.{k}"], final[k]) for k in trainable)
    for k in trainable:  # AdamW moments and step count of every trainable tensor
        assert {f"optim.{k}.exp_avg", f"optim.{k}.exp_avg_sq", f"optim.{k}.step"} <= tensors.keys()
    assert tensors["rng.torch"].dtype == torch.uint8
    assert meta["step"] == 5 and (meta["epoch"], meta["cursor"]) == (0, 5)  # data-order position
    assert meta["scheduler"]["last_epoch"] == 5 and "python_rng" not in meta  # no unused state
    assert meta["config"] == config.to_dict() and len(meta["data_fingerprint"]) == 16
    # before training, then every --eval-every 2 steps; the final one comes after this checkpoint
    assert [e["step"] for e in meta["evals"]] == [0, 2, 4]
    assert all("health" in e and "healthy" in e for e in meta["evals"])

    # A checkpoint directory itself can be resumed too; from step 4 the run ends where it ended.
    before = {k: v.clone() for k, v in final.items()}
    result = run(TrainConfig(resume=str(ckpts[0]), progress=False))
    assert result["steps"] == 5
    after = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4, 5]
    assert [e["step"] for e in json.loads((out / "eval.json").read_text())["history"]] == [0, 2, 4, 5]


def test_by_default_a_short_run_evaluates_before_and_after_only(tiny, tmp_path):
    """The default schedule (no --eval-every): before training and at the end, and in between only every
    100 steps, so the default 75-step run's evaluations stay within a fifth of its time on a CPU."""
    out = tmp_path / "run"
    result = run(small_run(tiny, out, max_steps=6))
    assert [e["step"] for e in result["history"]] == [0, 6]
    assert [step for step, _ in result["timing"]["evaluation_seconds"]] == [0, 6]
    assert not any("eval_policy_accuracy" in r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))


def _fake_state(step: int) -> tuple[dict, dict]:
    tensors = {"model.w": torch.full((4,), float(step)), "rng.torch": torch.get_rng_state()}
    meta = dict.fromkeys(dpo.checkpointing.META_KEYS, 0)
    meta.update(step=step, config={})
    return tensors, meta


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_ones(tmp_path, monkeypatch):
    for step in (1, 2):
        save_checkpoint(tmp_path, *_fake_state(step), keep=2)
    before = _snapshot(tmp_path)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(dpo.checkpointing, "save_file", crash)
    for step in (3, 2):  # a new step, and the same step written again
        with pytest.raises(OSError, match="No space"):
            save_checkpoint(tmp_path, *_fake_state(step), keep=2)
        assert _snapshot(tmp_path) == before  # untouched, and no temporary directory left
    tensors, meta, where = load_checkpoint(tmp_path)
    assert meta["step"] == 2 and torch.equal(tensors["model.w"], torch.full((4,), 2.0))

    # What a SIGKILLed writer leaves (a hidden, partial directory) is never listed or resumed ...
    stale = tmp_path / "checkpoints" / ".step-000003.x1y2"
    stale.mkdir()
    (stale / "state.json").write_text('{"step": 3')
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert load_checkpoint(tmp_path)[1]["step"] == 2
    # ... and is cleared by the next save; keep=1 then leaves only the newest.
    monkeypatch.undo()
    save_checkpoint(tmp_path, *_fake_state(3), keep=1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000003"]


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    for step in (999_999, 1_000_000, 5):  # a seventh digit must not sort before the sixth
        save_checkpoint(tmp_path, *_fake_state(step), keep=5)
    assert load_checkpoint(tmp_path)[1]["step"] == 1_000_000


def test_disk_full_during_a_run_is_one_error_line_and_keeps_the_checkpoints(tiny, tmp_path, monkeypatch, capsys):
    real, calls = dpo.checkpointing.save_file, []

    def full_on_third(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(dpo.checkpointing, "save_file", full_on_third)
    out = tmp_path / "run"
    assert main(cli(tiny, out, "--save-every", "1")) == 2
    line = error_line(capsys)
    assert "No space left on device" in line and "step-000002" in line and f"--resume {out}" in line
    assert [p.name for p in list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert load_checkpoint(out)[1]["step"] == 2


def test_unreadable_or_foreign_checkpoints_are_clear_errors(tiny, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    save_checkpoint(tmp_path / "run", *_fake_state(1))
    (ckpt / "state.json").write_text('{"step": 1}')  # not what DPOTrainer saves
    with pytest.raises(CheckpointLoadError, match="not a training checkpoint"):
        load_checkpoint(ckpt)
    (ckpt / "state.json").write_text("{not json")
    assert main(["--resume", str(tmp_path / "run")]) == 2
    assert "state.json: unreadable" in error_line(capsys)
    (ckpt / "state.json").write_text(json.dumps(_fake_state(1)[1]))
    (ckpt / "state.safetensors").write_bytes((ckpt / "state.safetensors").read_bytes()[:50])
    assert main(["--resume", str(ckpt)]) == 2
    assert "state.safetensors: corrupt or truncated" in error_line(capsys)


# ====================================================================== 3. signals (in-process)
def test_sigterm_or_ctrl_c_before_training_exits_cleanly_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    """Before the training loop there is nothing to save: a clean exit, and no output directory."""
    out = tmp_path / "run"
    monkeypatch.setattr(dpo.train, "prepare_data", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    assert main(cli(tiny, out)) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().endswith("interrupted (SIGTERM); no checkpoint was saved")

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dpo.train, "prepare_data", ctrl_c)
    assert main(cli(tiny, out)) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted (SIGINT); no checkpoint was saved")
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main put the handlers back


def test_second_ctrl_c_stops_at_once_and_names_the_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    real = DPOTrainer.compute_loss
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job

    def impatient(self, pairs):
        if self.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, then save and stop
            os.kill(os.getpid(), signal.SIGINT)  # the second: stop now
        return real(self, pairs)

    monkeypatch.setattr(DPOTrainer, "compute_loss", impatient)
    out = tmp_path / "run"
    assert main(cli(tiny, out, "--save-every", "1")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SIGINT received: finishing this step" in err
    latest = out / "checkpoints" / "step-000001"
    assert err.strip().endswith(f"interrupted (SIGINT); the latest checkpoint is {latest}; "
                                f"continue with: python -m dpo.train --resume {out}")
    assert [p.name for p in list_checkpoints(out)] == ["step-000001"]
    assert signal.getsignal(signal.SIGINT) is before  # the run put the handler back


# ====================================================================== 4. non-finite steps
def _poison(monkeypatch, at_step: int, *, grad_only: bool = False) -> list[list[str]]:
    """Make the batch of optimizer step `at_step` (1-based) give a NaN loss, or only a NaN gradient."""
    real, seen = DPOTrainer.compute_loss, []

    def compute_loss(self, pairs):
        losses, stats = real(self, pairs)
        if self.step + 1 == at_step:
            seen.append([p.source for p in pairs])
            if grad_only:
                weight = self.policy.model.layers[-1].mlp.down_proj.weight  # trainable in every setting
                handle = weight.register_hook(lambda g: (handle.remove(), torch.full_like(g, float("nan")))[1])
            else:
                losses = losses * float("nan")
        return losses, stats

    monkeypatch.setattr(DPOTrainer, "compute_loss", compute_loss)
    return seen


@pytest.mark.parametrize("grad_only", [False, True], ids=["nan-loss", "nan-gradient"])
def test_nonfinite_step_stops_naming_step_and_pairs(tiny, tmp_path, monkeypatch, capsys, grad_only):
    seen = _poison(monkeypatch, at_step=3, grad_only=grad_only)
    out = tmp_path / "run"
    assert main(cli(tiny, out, "--save-every", "1")) == 2
    line = error_line(capsys)
    what = "loss=nan" if not grad_only else "grad_norm=nan"
    assert line.startswith("error: non-finite ") and what in line and "at step 3;" in line
    [sources] = seen
    assert all(s in line for s in sources) and len(sources) == 2  # the batch's pairs, by file:line
    assert re.search(r"pairs\.jsonl:\d+", sources[0])
    assert f"the latest checkpoint is {out / 'checkpoints' / 'step-000002'}" in line
    assert "--skip-nonfinite" in line
    assert [p.name for p in list_checkpoints(out)] == ["step-000001", "step-000002"]  # the last good ones
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    if not grad_only:  # the way on that the message suggests: resume from step 2, skipping the batch
        assert f"python -m dpo.train --resume {out} --skip-nonfinite" in line
        assert main(["--resume", str(out), "--skip-nonfinite", "--no-progress"]) == 0
        assert json.loads((out / "eval.json").read_text())["skipped_nonfinite"] == 1


def test_skip_nonfinite_skips_and_counts(tiny, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, at_step=3)
    out = tmp_path / "run"
    result = run(small_run(tiny, out, skip_nonfinite=True, save_every=1, keep_checkpoints=5))
    assert result["skipped_nonfinite"] == 1 and result["steps"] == 4
    assert "skipped 1 step(s) with a non-finite loss" in capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["skipped_nonfinite"] is True and rows[2]["step"] == 3 and len(rows[2]["pairs"]) == 2
    # the skipped step changed nothing: the weights after step 3 are those after step 2
    w2, w3 = (load_checkpoint(out / "checkpoints" / f"step-00000{s}")[0] for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2 if k.startswith(("model.", "optim.")))
    assert json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())["skipped_nonfinite"] == 1


# ====================================================================== 5. bad data
HH = f"{HUMAN} How do I bake bread?{ASSISTANT}"
GOOD = {"prompt": HH, "chosen": " Knead, rest, bake.", "rejected": " No."}

BAD_DATA = {  # name: (line 2 of the file as bytes, what the error must say besides the file and "line 2")
    "malformed-json": (b'{"prompt": "x", "chosen": ', ["malformed JSON"]),
    "missing-field": (json.dumps({"prompt": HH, "chosen": " a"}).encode(), ["field 'rejected'", "missing"]),
    "not-a-string": (json.dumps({**GOOD, "chosen": 5}).encode(),
                     ["field 'chosen'", "expected a string (or a list of chat messages), got int"]),
    "mixed-formats": (json.dumps({**GOOD, "chosen": [{"role": "assistant", "content": "a"}]}).encode(),
                      ["field 'prompt'", "expected a list of chat messages like the other fields, got str"]),
    "no-assistant-turn": (json.dumps({"chosen": f"{HUMAN} hi", "rejected": f"{HUMAN} yo"}).encode(),
                          ["field 'chosen'", "no '\\n\\nAssistant:' turn"]),
    "invalid-utf8": (b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}', ["invalid UTF-8 at byte 15"]),
    "lone-surrogate": (b'{"prompt": "x\\ud800", "chosen": " a", "rejected": " b"}',
                       ["field 'prompt'", "surrogate"]),
    "gigantic-line": (b'{"prompt": "' + b"x" * 1_100_000 + b'"}', ["1,100,014 bytes", "max_line_bytes=1,000,000"]),
    "deeply-nested": (b"[" * 50_000, ["malformed JSON", "nested too deeply"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_record_is_one_clear_error_and_no_output_dir(tiny, tmp_path, capsys, never_load_model, case):
    raw, expected = BAD_DATA[case]
    data = write_rows(tmp_path / "data.jsonl", [GOOD, GOOD], raw_lines={1: raw})
    out = tmp_path / "run"
    assert main(cli(tiny, out, data=data)) == 2
    line = error_line(capsys)
    assert f"{data}: line 2: " in line, line
    assert all(e in line for e in expected), line
    assert len(line) < 1000
    assert not out.exists()  # nothing was written


def test_skip_bad_records_skips_and_counts(tiny, tmp_path, capsys):
    rows = [row(p) for p in make_synthetic_pairs(8, seed=3)]
    data = write_rows(tmp_path / "data.jsonl", rows, raw_lines={2: b"{oops", 5: b"\xff\xfe", 7: b"[1, 2]"})
    config = small_run(tiny, tmp_path / "run", data=[str(data)], skip_bad_records=True, eval_pairs=1)
    tokenizer = load_tokenizer(tiny / "model")
    train, evals, info = prepare_data(config, tokenizer, SmolLMConfig.from_json(tiny / "model" / "config.json"))
    assert info["loaded"] == 8 and len(train) + len(evals) == 8
    err = capsys.readouterr().err
    assert "skipped 3" in err
    assert re.search(r"bad_utf8\s+1", err) and re.search(r"bad_json\s+1", err) and re.search(r"bad_shape\s+1", err)
    assert f"{data}: line 3: malformed JSON" in err  # the first skipped ones are shown, located


def test_unusable_rows_are_skipped_and_reported(tiny, tmp_path, capsys):
    """dpo.train skips rows with no usable preference (real HH-RLHF has some) and says how many."""
    rows = [row(p) for p in make_synthetic_pairs(6, seed=4)]
    rows += [{**GOOD, "chosen": "   "}, {**GOOD, "rejected": GOOD["chosen"]},
             {"chosen": f"{HUMAN} a{ASSISTANT} x", "rejected": f"{HUMAN} b{ASSISTANT} y"}]
    data = write_rows(tmp_path / "data.jsonl", rows)
    config = small_run(tiny, tmp_path / "run", data=[str(data)], eval_pairs=1)
    tokenizer = load_tokenizer(tiny / "model")
    train, evals, info = prepare_data(config, tokenizer, SmolLMConfig.from_json(tiny / "model" / "config.json"))
    assert info["loaded"] == 6
    err = capsys.readouterr().err
    for reason in ("empty", "identical", "prompt_mismatch"):
        assert re.search(rf"{reason}\s+1", err), err


def test_all_rows_unusable_is_an_error_that_says_so(tiny, tmp_path, capsys, never_load_model):
    data = write_rows(tmp_path / "data.jsonl", [{**GOOD, "chosen": ""}, {**GOOD, "rejected": GOOD["chosen"]}])
    out = tmp_path / "run"
    assert main(cli(tiny, out, data=data)) == 2
    line = error_line(capsys)
    assert "no preference pairs loaded" in line and "every one of its 2 records was skipped" in line
    assert "empty 1" in line and "identical 1" in line and f"{data}: line 1" in line
    assert not out.exists()


def test_empty_file_is_an_error(tiny, tmp_path, capsys, never_load_model):
    data = tmp_path / "data.jsonl"
    data.write_text("\n\n")
    assert main(cli(tiny, tmp_path / "run", data=data)) == 2
    assert "holds no records" in error_line(capsys)


def test_prompt_longer_than_max_length_is_cut_from_the_left_and_the_pair_kept(tiny, tmp_path, capsys):
    """Documented behaviour (dpo/tokenization.py): the prompt loses its oldest tokens; the pair stays."""
    long_prompt = HUMAN + " tell me more." * 60 + ASSISTANT
    rows = [row(p) for p in make_synthetic_pairs(4, seed=5)] + [{**GOOD, "prompt": long_prompt}]
    data = write_rows(tmp_path / "data.jsonl", rows)
    config = small_run(tiny, tmp_path / "run", data=[str(data)], eval_pairs=1, max_length=32)
    tokenizer = load_tokenizer(tiny / "model")
    train, evals, _ = prepare_data(config, tokenizer, SmolLMConfig.from_json(tiny / "model" / "config.json"))
    [long] = [p for p in train + evals if p.source.endswith(":5")]
    assert long.prompt_truncated and not long.response_truncated
    assert max(len(long.chosen_ids), len(long.rejected_ids)) <= 32
    tail = tokenizer.encode_ids(long_prompt)[-long.prompt_len:]
    assert long.chosen_ids[:long.prompt_len] == tail  # the latest prompt tokens, "...Assistant:"
    assert "1 prompt-truncated" in capsys.readouterr().err


def test_filter_that_keeps_nothing_says_so_and_suggests_no_filter(tiny, tmp_path, capsys, never_load_model):
    out = tmp_path / "run"
    args = ["--filter" if a == "--no-filter" else a for a in cli(tiny, out)]  # the synthetic answers are too short
    assert main(args) == 2
    line = error_line(capsys)
    assert "the strong-preference filter kept only 0 of 24 pairs" in line and "--no-filter" in line
    assert not out.exists()


def test_resumed_run_with_changed_data_is_refused_and_left_as_it_was(tiny, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes((tiny / "pairs.jsonl").read_bytes())
    out = tmp_path / "run"
    assert main(cli(tiny, out, "--save-every", "1", "--max-steps", "1", data=data)) == 0
    before = _snapshot(out)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same pairs, another order
    monkeypatch.setattr(dpo.train, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["--resume", str(out), "--max-steps", "3"]) == 2
    assert "the data differs from the run being resumed" in error_line(capsys)
    assert _snapshot(out) == before


# ====================================================================== 9. no pickle
PACKAGES = ("smollm", "dpo")


def _sources():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_nothing_in_the_packages_can_unpickle():
    """torch.load only with weights_only=True, and no pickle-based module imported at all.

    tests/test_checkpoint.py::test_pickle_checkpoint_is_never_loaded shows that load_pretrained
    refuses a pytorch_model.bin (a pickle that would run code) without opening it.
    """
    pickle_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    problems = []
    for path, tree in _sources():
        where = lambda node: f"{path.relative_to(REPO)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [where(node) for a in node.names if a.name.split(".")[0] in pickle_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in pickle_modules:
                problems.append(where(node))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = ast.unparse(node.func.value)
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if owner == "torch" and not safe:
                    problems.append(f"{where(node)} torch.load without weights_only=True")
                if owner in ("np", "numpy") and any(k.arg == "allow_pickle" for k in node.keywords):
                    problems.append(f"{where(node)} numpy.load(allow_pickle=...)")
    assert not problems, problems
