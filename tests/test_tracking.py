"""--report-to (dpo.tracking): what a run logs to TensorBoard, wandb and trackio, read back with each
backend's own reader.

* the names: TRL's (its DPOTrainer's source and transformers' `rewrite_logs` are the oracle);
* each backend, fed a few rows, an evaluation, the samples and a summary, then read back:
  TensorBoard with its EventAccumulator, wandb's offline transaction log with its own protobuf
  records, trackio with its SQLiteStorage (in a subprocess, because trackio fixes its folder at import);
* a tiny `python -m dpo.train` and `python -m dpo.sft` run each, whose TensorBoard scalars equal
  metrics.jsonl and eval.json;
* a 2-rank torchrun job: rank 0 alone writes, the reduced rows;
* a missing package or a bad combination: one line, exit code 2, before any work.

The backends are optional packages (`pip install "smollm-dpo[tracking]"`); a test whose backend is
not installed skips, saying which package it needs.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

import dpo.sft
import dpo.train
from dpo.config import ConfigError, SFTConfig, TrainConfig, build_parser, config_from_args
from dpo.tracking import (TRAIN_NAMES, check_report_to, eval_metrics, open_tracker, row_evaluation,
                          summary_metrics, train_metrics)

from model_utils import tiny_run_inputs

REPO = Path(__file__).resolve().parents[1]

# A metrics.jsonl row of dpo.train at a step it evaluated after, and the record of an evaluation.
ROW = {"step": 2, "epoch": 0.5, "loss": 0.6, "reward_accuracy": 0.75, "chosen_reward": 0.2, "rejected_reward": -0.1,
       "margin": 0.3, "policy_chosen_logp": -1.5, "policy_rejected_logp": -2.0, "grad_norm": 3.0, "lr": 1e-4,
       "pairs": 8, "tokens": 400, "seconds": 0.5, "tokens_per_s": 800.0,
       "eval_num_pairs": 16, "eval_reward_accuracy": 0.625, "eval_policy_accuracy": 0.5,
       "health_kl_policy_reference": 0.01, "health_policy_sample_empty_share": 0.0}
RECORD = {"step": 0, "num_pairs": 16, "reference_accuracy": 0.5, "policy_accuracy": 0.5, "reward_accuracy": 0.0,
          "mean_margin": 0.0, "policy_chosen_logp": -1.9, "policy_rejected_logp": -2.1,
          "reference_chosen_logp": -1.9, "reference_rejected_logp": -2.1, "healthy": True, "problems": [],
          "health": {"logp_reduction": "mean", "kl_policy_reference": 0.0, "policy_sample_distinct_2": 0.9}}
SAMPLES = [{"prompt": "<|im_start|>user\nHi | there<|im_end|>\n", "reference": "Hello!\nHow can I help?",
            "policy": "", "prompt_ids": [1, 2], "reference_ids": [3], "policy_ids": [],
            "reference_stopped": True, "policy_stopped": False}]


def needs(package: str):
    """Skip when an optional backend is not installed, saying which (CI installs them all)."""
    try:
        __import__(package)
    except ImportError:
        pytest.skip(f"--report-to {package} needs the optional package {package} (pip install {package})")


def feed(tracker) -> None:
    """What a run sends: the evaluation before training, two steps (the second carrying an
    evaluation), the final evaluation of that step again (logged once), samples, summary."""
    tracker.log_evaluation(RECORD)
    tracker.log_row({**{k: v for k, v in ROW.items() if not k.startswith(("eval_", "health_"))}, "step": 1})
    tracker.log_row(ROW)
    tracker.log_evaluation({**RECORD, "step": 2, "reward_accuracy": 0.99})  # step 2's came with its row
    tracker.log_samples(SAMPLES, 2)
    tracker.log_summary({"steps": 2, "best": {"step": 2, "policy_accuracy": 0.5, "dir": "best"},
                         "history": [RECORD], "collapsed": False}, 2)
    tracker.close()


# ----------------------------------------------------------------------- names and flags
def test_names_are_trls():
    trl_source = (Path(pytest.importorskip("trl").__file__).parent / "trainer" / "dpo_trainer.py").read_text()
    rewrite_logs = pytest.importorskip("transformers.integrations.integration_utils").rewrite_logs
    train = train_metrics(ROW)
    evaluation = eval_metrics(row_evaluation(ROW))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert f'"{name}"' in trl_source  # what TRL's DPOTrainer logs ...
        assert rewrite_logs({name: 0.0}) == {f"train/{name}": 0.0}  # ... as transformers names it for the trackers
        assert f"train/{name}" in train
    assert set(rewrite_logs({"loss": 0, "learning_rate": 0, "grad_norm": 0, "epoch": 0})) <= set(train)
    assert rewrite_logs({"eval_rewards/accuracies": 0.0}) == {"eval/rewards/accuracies": 0.0}
    assert train["train/rewards/chosen"] == 0.2 and train["train/rewards/margins"] == 0.3
    assert train["train/learning_rate"] == 1e-4 and train["train/logps/rejected"] == -2.0
    assert train["train/tokens_per_second"] == 800.0 and train["train/step_seconds"] == 0.5
    assert not any(k.startswith("train/eval") or k.startswith("train/health") for k in train)
    assert evaluation == {"eval/num_pairs": 16.0, "eval/rewards/accuracies": 0.625,
                          "eval/preference_accuracy/policy": 0.5, "eval/health/kl_policy_reference": 0.01,
                          "eval/health/policy_sample_empty_share": 0.0}
    full = eval_metrics(RECORD)
    assert full["eval/logps/chosen"] == -1.9 and full["eval/ref_logps/rejected"] == -2.1
    assert full["eval/healthy"] == 1.0 and full["eval/health/problems"] == 0.0
    assert full["eval/health/policy_sample_distinct_2"] == 0.9 and "eval/health/logp_reduction" not in full
    assert eval_metrics({"step": 4, "nll": 2.5, "perplexity": 12.2})["eval/loss"] == 2.5  # dpo.sft's
    assert set(TRAIN_NAMES) >= {"loss", "lr", "grad_norm", "chosen_reward", "margin", "policy_chosen_logp"}
    summary = summary_metrics({"steps": 2, "best": {"step": 2, "dir": "best"}, "history": [1], "health": {"x": 1}})
    assert summary == {"steps": 2.0, "best/step": 2.0}


@pytest.mark.parametrize("cls", [TrainConfig, SFTConfig])
def test_report_to_flag(cls):
    parse = lambda *a: config_from_args(build_parser(cls=cls).parse_args(list(a)), cls)  # noqa: E731
    assert parse().report_to == ["none"]
    assert parse("--report-to", "tensorboard", "wandb", "trackio").check().report_to == ["tensorboard", "wandb",
                                                                                         "trackio"]
    with pytest.raises(ConfigError, match="--report-to: 'none' cannot be combined with wandb"):
        parse("--report-to", "none", "wandb").check()
    with pytest.raises(SystemExit):  # argparse: invalid choice
        parse("--report-to", "mlflow")
    with pytest.raises(ConfigError, match="--report-to: unknown 'mlflow'"):
        cls(report_to=["mlflow"]).check()
    assert cls(report_to="wandb").check().report_to == ["wandb"]  # a notebook's string
    assert check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]


def test_a_missing_backend_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a package that cannot be imported
    out = tmp_path / "run"
    code = dpo.train.main(["--model", str(tmp_path / "no-model"), "--output-dir", str(out), "--report-to", "wandb"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == ('error: --report-to wandb needs the wandb package: pip install wandb '
                                            '(or pip install "smollm-dpo[wandb]")')
    assert not out.exists()  # refused before the model, the data or the output directory


def test_the_backends_are_imported_only_when_asked_for():
    code = ("import sys, dpo.train, dpo.sft, dpo.inspect, dpo.tracking; "
            "print(sorted(m for m in ('tensorboard', 'wandb', 'trackio') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


def test_other_ranks_log_nothing(tmp_path):
    needs("tensorboard")
    tracker = open_tracker(["tensorboard"], tmp_path, config={}, command="dpo.train", is_main=False)
    feed(tracker)
    assert not tracker.enabled and list(tmp_path.iterdir()) == []
    assert not open_tracker(["none"], tmp_path, config={}, command="dpo.train").enabled


# ----------------------------------------------------------------------- each backend, read back
def read_tensorboard(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    """({tag: [(step, value)]}, {text tag: [(step, text)]}) of run_dir/tensorboard, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
                                                 for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return scalars, texts


def test_tensorboard_read_back(tmp_path):
    needs("tensorboard")
    feed(open_tracker(["tensorboard"], tmp_path, config={"lr": 1e-4}, command="dpo.train", log=lambda m: None))
    scalars, texts = read_tensorboard(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["train/rewards/margins"][1] == (2, pytest.approx(0.3))
    assert [(s, round(v)) for s, v in scalars["train/num_tokens"]] == [(1, 400), (2, 800)]  # tokens so far
    assert scalars["eval/rewards/accuracies"] == [(0, 0.0), (2, 0.625)]  # step 2 once: the row's, not 0.99
    assert scalars["eval/health/kl_policy_reference"][1] == (2, pytest.approx(0.01))
    table = texts["eval/samples"][0]
    assert table[0] == 2 and table[1].splitlines()[0] == "| prompt | reference | policy | reference_stopped | " \
                                                        "policy_stopped |"
    assert "Hi \\| there" in table[1] and "Hello!⏎How can I help?" in table[1]
    assert '"lr": 0.0001' in texts["config"][0][1] and '"best/step": 2.0' in texts["summary"][0][1]


def read_wandb_log(path: Path) -> list:
    """The records of a .wandb transaction log, parsed with wandb's own protobuf `Record`. The
    framing is LevelDB's log format (wandb's header ":W&B", then 32 KiB blocks of records with a
    7-byte header: CRC-32 of type + data, length, type FULL/FIRST/MIDDLE/LAST), which wandb 0.2x
    read in Python (wandb/sdk/internal/datastore.py) and wandb-core now reads in Go."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pending, i, block = [], b"", 7, 32768
    while i + 7 <= len(data):
        if block - i % block < 7:  # a block's tail too short for a header is padding
            i += block - i % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[i:i + 7])
        if i + 7 + length > len(data):  # a record still being written
            break
        chunk = data[i + 7:i + 7 + length]
        i += 7 + length
        if kind == 0:
            continue
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"{path}: bad checksum at {i}"
        pending += chunk
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_items(items) -> dict:
    """History or summary items as a dict; an item with a nested key (a table's fields) nests."""
    out: dict = {}
    for item in items:
        *path, last = [item.key] if item.key else list(item.nested_key)
        where = out
        for name in path:
            where = where.setdefault(name, {})
        where[last] = json.loads(item.value_json)
    return out


def read_wandb(run_dir: Path) -> tuple[list[dict], dict, dict, Path]:
    """(history rows by step, config, summary, the offline run's folder) of the one run in run_dir/wandb."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    log_file = next(runs[0].glob("run-*.wandb"))
    # wandb-core writes the log in its own process and may finish it just after run.finish() returns
    # (before the Python process exits, which waits for it): wait for the run's exit record
    deadline = time.monotonic() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in read_wandb_log(log_file)):
        assert time.monotonic() < deadline, f"{log_file} holds no exit record after 30 s"
        time.sleep(0.1)
    history: dict[int, dict] = {}
    config, summary = {}, {}
    for record in read_wandb_log(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = wandb_items(record.history.item)
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            summary.update(wandb_items(record.summary.update))
    return [history[s] for s in sorted(history)], config, summary, runs[0]


def test_wandb_offline_read_back(tmp_path, monkeypatch):
    needs("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    said = []
    feed(open_tracker(["wandb"], tmp_path, config={"lr": 1e-4}, command="dpo.train", log=said.append))
    assert os.environ["WANDB_MODE"] == "offline" and "sets it to offline" in said[0]  # set by us, and said
    rows, config, summary, run = read_wandb(tmp_path)
    assert [r["_step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/rewards/accuracies"] == 0.0 and "train/loss" not in rows[0]
    assert rows[2]["train/loss"] == 0.6 and rows[2]["train/rewards/chosen"] == 0.2
    assert rows[2]["train/learning_rate"] == 1e-4 and rows[2]["train/num_tokens"] == 800
    assert rows[2]["eval/rewards/accuracies"] == 0.625 and rows[2]["eval/health/kl_policy_reference"] == 0.01
    assert config["lr"] == 1e-4 and config["command"] == "dpo.train"
    assert summary["best/step"] == 2 and summary["steps"] == 2
    table = rows[2]["eval/samples"]  # a table logged at step 2: its file is in the run folder
    assert table["_type"] == "table-file" and table["nrows"] == 1
    content = json.loads((run / "files" / table["path"]).read_text())
    assert content["columns"] == ["prompt", "reference", "policy", "reference_stopped", "policy_stopped"]
    assert content["data"] == [[SAMPLES[0]["prompt"], "Hello!\nHow can I help?", "", True, False]]


def test_wandb_mode_set_by_the_user_is_kept(tmp_path, monkeypatch):
    needs("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    said = []
    tracker = open_tracker(["wandb"], tmp_path, config={}, command="dpo.sft", log=said.append)
    tracker.log_row({"step": 1, "loss": 1.0})
    tracker.close()
    assert os.environ["WANDB_MODE"] == "disabled" and said[-1].endswith("(mode disabled)")
    assert not any("sets it to offline" in s for s in said)


TRACKIO_SCRIPT = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from test_tracking import feed
from dpo.tracking import open_tracker
feed(open_tracker(["trackio"], sys.argv[2], config={"lr": 1e-4}, command="dpo.train", log=lambda m: None))
from trackio.sqlite_storage import SQLiteStorage
runs = SQLiteStorage.get_runs("smollm-dpo")
print("READ BACK " + json.dumps({"runs": runs, "logs": SQLiteStorage.get_logs("smollm-dpo", runs[0]),
                  "config": SQLiteStorage.get_run_config("smollm-dpo", runs[0])}, default=str), flush=True)
"""


def test_trackio_local_read_back(tmp_path):
    needs("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_PROJECT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(REPO), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("READ BACK "))[10:])
    assert len(got["runs"]) == 1 and got["runs"][0].startswith("run-")
    assert (tmp_path / "trackio" / "smollm-dpo.db").is_file()  # its local store, nothing uploaded
    by_step: dict[int, dict] = {}
    for row in got["logs"]:
        by_step.setdefault(row["step"], {}).update(row)
    assert by_step[0]["eval/rewards/accuracies"] == 0.0
    assert by_step[2]["train/loss"] == 0.6 and by_step[2]["train/logps/chosen"] == -1.5
    assert by_step[2]["eval/rewards/accuracies"] == 0.625 and by_step[2]["summary/best/step"] == 2
    table = by_step[2]["eval/samples"]
    assert table["_type"] == "trackio.table"
    assert table["_value"] == [{"prompt": SAMPLES[0]["prompt"], "reference": "Hello!\nHow can I help?", "policy": "",
                                "reference_stopped": True, "policy_stopped": False}]
    assert got["config"]["lr"] == 1e-4


# ----------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_json) -> Path:
    return tiny_run_inputs(tmp_path_factory.mktemp("tiny"), tokenizer_json, 40, seed=3)


def common_args(tiny: Path, out: Path) -> list[str]:
    return ["--model", str(tiny / "model"), "--data", str(tiny / "pairs.jsonl"), "--output-dir", str(out),
            "--no-filter", "--batch-size", "4", "--num-pairs", "16", "--eval-pairs", "8", "--max-steps", "4",
            "--no-progress", "--max-length", "64", "--report-to", "tensorboard"]


def test_dpo_train_logs_what_metrics_and_eval_hold(tiny, tmp_path, capsys):
    needs("tensorboard")
    out = tmp_path / "dpo"
    code = dpo.train.main(common_args(tiny, out) + ["--train-last-n", "1", "--eval-every", "2", "--sample-prompts",
                                                    "2", "--sample-tokens", "4", "--stop-when-unhealthy", "0"])
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((out / "eval.json").read_text())
    scalars, texts = read_tensorboard(out)
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert scalars["train/rewards/accuracies"] == [(r["step"], pytest.approx(r["reward_accuracy"])) for r in rows]
    assert scalars["train/logps/chosen"] == [(r["step"], pytest.approx(r["policy_chosen_logp"])) for r in rows]
    assert scalars["train/learning_rate"] == [(r["step"], pytest.approx(r["lr"])) for r in rows]
    # every evaluation (before, step 2 from its row, the end), as eval.json's history has it
    assert [s for s, _ in scalars["eval/preference_accuracy/policy"]] == [e["step"] for e in ev["history"]] == [0, 2, 4]
    assert scalars["eval/rewards/margins"] == [(e["step"], pytest.approx(e["mean_margin"])) for e in ev["history"]]
    assert scalars["eval/health/kl_policy_reference"][-1][1] == pytest.approx(ev["health"]["kl_policy_reference"])
    step, table = texts["eval/samples"][0]
    assert step == 4 and len(table.splitlines()) == 2 + 2  # header, rule, two prompts
    assert '"steps": 4.0' in texts["summary"][0][1]


def test_dpo_sft_logs_what_metrics_and_eval_hold(tiny, tmp_path, capsys):
    needs("tensorboard")
    out = tmp_path / "sft"
    assert dpo.sft.main(common_args(tiny, out) + ["--train-last-n", "1"]) == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((out / "eval.json").read_text())
    scalars, _ = read_tensorboard(out)
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert scalars["train/response_tokens"] == [(r["step"], r["response_tokens"]) for r in rows]
    assert scalars["eval/loss"] == [(0, pytest.approx(ev["before"]["nll"])), (4, pytest.approx(ev["after"]["nll"]))]
    assert scalars["eval/perplexity"][1] == (4, pytest.approx(ev["after"]["perplexity"]))


def test_a_resumed_run_continues_its_curves_and_overwrite_starts_afresh(tiny, tmp_path, capsys):
    needs("tensorboard")
    out = tmp_path / "sft"
    args = common_args(tiny, out) + ["--train-last-n", "1", "--save-every", "1"]
    assert dpo.sft.main(args + ["--max-steps", "2"]) == 0
    # the interrupted run had logged steps 3 and 4 after the checkpoint at step 2: the resumed run hides them
    tracker = open_tracker(["tensorboard"], out, config={}, command="dpo.sft", start_step=0, log=lambda m: None)
    tracker.log_row({"step": 3, "loss": 99.0, "tokens": 1})
    tracker.close()
    assert dpo.sft.main(["--resume", str(out), "--no-progress", "--max-steps", "4", "--report-to", "tensorboard"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars, _ = read_tensorboard(out)
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]  # 99.0 is gone
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/num_tokens"]] == pytest.approx(  # counted on from metrics.jsonl
        [sum(r["tokens"] for r in rows[:k + 1]) for k in range(4)])
    assert dpo.sft.main(args + ["--max-steps", "1", "--overwrite"]) == 0, capsys.readouterr().err[-2000:]
    scalars, _ = read_tensorboard(out)
    assert [s for s, _ in scalars["train/loss"]] == [1]  # the previous run's event files went with it


@pytest.mark.slow
def test_torchrun_rank_0_alone_logs_the_reduced_rows(tiny, tmp_path):
    needs("tensorboard")
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dpo.train", *common_args(tiny, out), "--train-last-n", "1", "--eval-every", "0",
                           "--sample-prompts", "0", "--max-steps", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars, _ = read_tensorboard(out)
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [v for _, v in scalars["train/pairs"]] == [4.0, 4.0]  # the whole step's, not a rank's share
    assert proc.stderr.count("tensorboard: logging to") == 1
