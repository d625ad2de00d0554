"""torchrun on this CPU: 2 processes (gloo) train as one process does, and a run moves between
rank counts through its checkpoints.

* The trainer itself (tests/dist_worker.py): for data parallelism (DDP-style), FSDP (frozen
  blocks with the shared trunk, full fine-tuning, LoRA on all blocks and on the last one) and
  SFT, 2 ranks give the same losses, metrics, updated weights and held-out evaluation as one
  process (1e-5), with uneven shares (a rank with no pair in a micro-batch included).
* The commands (`torchrun -m dpo.train`): a 2-rank run killed with SIGKILL and resumed on 1
  rank, and a 1-rank run killed and resumed on 2 ranks with FSDP (its checkpoints and final/
  gathered from the shards), each end where an uninterrupted single-process run ends (1e-5),
  and only rank 0 writes and prints.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker
from dpo.checkpointing import list_checkpoints
from smollm import load_tokenizer

from model_utils import save_random_checkpoint, small_config, tiny_run_inputs
from test_resume import checkpoint_past, finish, metrics_rows, wait_until

REPO = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


def env() -> dict[str, str]:
    # one thread a process (2 processes on 2 cores), the checkout's packages, and no stray job settings
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    return {**clean, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


# ----------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Every setting trained on 2 ranks, in one torchrun job."""
    out = tmp_path_factory.mktemp("two_ranks")
    proc = subprocess.run(torchrun(2, str(REPO / "tests" / "dist_worker.py"), str(out), *dist_worker.SETTINGS),
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(dist_worker.SETTINGS))
def test_two_ranks_train_as_one_process(two_ranks, setting, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        one = dist_worker.train(setting, tmp_path / "final")
    finally:
        torch.set_num_threads(threads)
    # the saved policy (a HF folder, or peft's with LoRA), gathered from the shards under FSDP
    name = "adapter_model.safetensors" if "lora" in setting else "model.safetensors"
    saved_one, saved_two = load_file(tmp_path / "final" / name), load_file(two_ranks / f"{setting}-final" / name)
    assert saved_one.keys() == saved_two.keys()
    for key in saved_one:
        torch.testing.assert_close(saved_two[key], saved_one[key], **TOL, msg=lambda m: f"final/{key}: {m}")
    two = load_file(two_ranks / f"{setting}.safetensors")
    assert one.keys() == two.keys()
    assert any(k.startswith("weight.") for k in one)
    assert ("eval.policy_logps" in one) == ("sft" not in setting)
    if "sft" not in setting:  # rank 0 ran batches 0 and 2 of the held-out set (rank 1 batch 1); all 3 under FSDP
        assert int(one.pop("batches_run")) == 3 and int(two.pop("batches_run")) == (3 if "fsdp" in setting else 2)
    for key in sorted(one):
        # the gradient norm sums the squares of every gradient, each summed over the ranks in another
        # order: it moved by 1.0e-5 of itself (74% of TOL) on an Intel host, so it gets 10x the room
        tol = dict(rtol=1e-4, atol=1e-5) if key == "metric.grad_norm" else TOL
        torch.testing.assert_close(two[key], one[key].to(two[key].dtype), **tol, msg=lambda m: f"{key}: {m}")
    assert one["metric.tokens"].sum() > 0
    # the weights did move: the comparison is not of two untouched models
    start = dist_worker.random_model(dist_worker.small_config(num_hidden_layers=3), seed=0).state_dict()
    moved = [k for k in one if k.startswith("weight.") and k[7:] in start and not torch.equal(one[k], start[k[7:]])]
    assert moved or "lora" in setting


EXIT_WORKER = """
import os, sys, time
from pathlib import Path
from dpo import cli, distributed
from dpo.config import TrainConfig

out = Path(sys.argv[1])


def run(config):  # rank 0 writes its last file 2 s after the others are done
    d = distributed.init_from_env("cpu")
    if d.is_main:
        time.sleep(2)
        (out / "rank0-wrote").write_text(repr(time.time()))


code = cli.main(run, TrainConfig, "dpo.train", "a run that ends well", argv=["--no-progress"])
(out / f"rank{os.environ['RANK']}-left").write_text(repr(time.time()))
sys.exit(code)
"""


def test_after_a_run_that_ended_well_no_rank_leaves_before_rank_0_has_written(tmp_path):
    """A follower that is done waits at cli.main's barrier until rank 0 has written its last files,
    so that its exit (or a crash on the way out, which makes torchrun stop every rank) cannot cut
    them short."""
    worker = tmp_path / "exit_worker.py"
    worker.write_text(EXIT_WORKER)
    proc = subprocess.run(torchrun(2, str(worker), str(tmp_path)), env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wrote = float((tmp_path / "rank0-wrote").read_text())
    assert float((tmp_path / "rank1-left").read_text()) >= wrote
    assert float((tmp_path / "rank0-left").read_text()) >= wrote


def test_a_rank_share_of_a_micro_batch():
    from dpo.distributed import Distributed

    items = list(range(5))
    shares = [Distributed(rank=r, world_size=2).shard(items) for r in range(2)]
    assert shares == [[0, 1, 2], [3, 4]]
    assert [Distributed(rank=r, world_size=2).shard([7]) for r in range(2)] == [[7], []]
    assert sum((Distributed(rank=r, world_size=3).shard(items) for r in range(3)), []) == items
    assert Distributed().shard(items) is items  # a single process takes the whole micro-batch


def test_fsdp_outside_a_torchrun_job_is_refused_naming_the_flag(tmp_path, tokenizer_json):
    from dpo.train import main

    save_random_checkpoint(tmp_path / "model", small_config(), tokenizer=load_tokenizer(tokenizer_json))
    assert main(["--model", str(tmp_path / "model"), "--fsdp", "--output-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- the commands
STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_json) -> Path:
    return tiny_run_inputs(tmp_path_factory.mktemp("tiny_dist"), tokenizer_json, 40, seed=2, config=small_config(num_hidden_layers=3))


def train_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "dpo.train", "--model", str(tiny / "model"), "--data", str(tiny / "pairs.jsonl"),
            "--output-dir", str(out), "--no-filter", "--train-last-n", "2", "--no-freeze-head", "--batch-size", "5",
            "--num-pairs", "32", "--eval-pairs", "4", "--max-steps", str(STEPS), "--eval-every", "0",
            "--sample-prompts", "2", "--sample-tokens", "6", "--dtype", "float32", "--no-progress", *extra]


def launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers run in sessions of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields: state, ppid, ...
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, _, err = finish(launch([sys.executable, *train_args(tiny, out)]))
    assert code == 0, err[-3000:]
    return out


def assert_ends_like(run: Path, reference: Path) -> None:
    a, b = load_file(run / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m: f"{k}: {m}")
    rows, ref_rows = metrics_rows(run), metrics_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, q in zip(rows, ref_rows):
        for key in ("loss", "grad_norm", "margin", "reward_accuracy", "tokens"):
            assert r[key] == pytest.approx(q[key], rel=1e-5, abs=1e-5), (r["step"], key)
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (run, reference))
    for key in ("policy_accuracy", "reference_accuracy", "mean_margin"):
        assert ea[key] == pytest.approx(eb[key], abs=1e-5), key


def kill_at_checkpoint(proc: subprocess.Popen, run: Path, step: int) -> None:
    wait_until(checkpoint_past(run, step), proc, f"a checkpoint at step {step}", timeout=180)
    for pid in [*children(proc.pid), proc.pid]:  # every rank, then the launcher: as a machine going down
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (run / "final").exists()
    assert int(list_checkpoints(run)[-1].name[5:]) < STEPS  # killed mid-run: there is training left


@pytest.mark.slow
def test_two_ranks_killed_resume_on_one(tiny, tmp_path, uninterrupted):
    run = tmp_path / "run"
    victim = launch(torchrun(2, *train_args(tiny, run, "--save-every", "1")))
    kill_at_checkpoint(victim, run, 2)
    code, out, err = finish(launch([sys.executable, "-m", "dpo.train", "--resume", str(run), "--no-progress"]),
                            timeout=180)
    assert code == 0, err[-3000:]
    assert "resuming from" in err
    assert_ends_like(run, uninterrupted)


@pytest.mark.slow
def test_one_rank_killed_resume_on_two(tiny, tmp_path, uninterrupted):
    run = tmp_path / "run"
    victim = launch([sys.executable, *train_args(tiny, run, "--save-every", "1")])
    kill_at_checkpoint(victim, run, 2)
    saved = list_checkpoints(run)[-1]
    code, out, err = finish(launch(torchrun(2, "-m", "dpo.train", "--resume", str(run), "--fsdp", "--no-progress")),
                            timeout=180)
    assert code == 0, err[-3000:]
    assert_ends_like(run, uninterrupted)
    # rank 0 alone logged, printed and wrote: one line of each, and no file of another rank
    assert err.count("resuming from") == 1 and err.count("torchrun job: 2 processes (gloo)") == 1
    assert out.count("wrote ") == 1
    assert len(metrics_rows(run)) == STEPS
    assert int(saved.name[5:]) >= 2 and list_checkpoints(run)[-1].name == f"step-{STEPS:06d}"
    shutil.rmtree(run)
