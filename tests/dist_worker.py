"""A few training steps per setting, by the trainer itself: in one process, or on every rank of a
torchrun job. tests/test_distributed.py compares the two.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR SETTING [SETTING ...]

joins the job (gloo), runs each setting, and rank 0 writes OUT_DIR/SETTING.safetensors: the
trainable tensors after the last step (whole, gathered when sharded), the steps' metrics (as a
tensor per metric) and a held-out evaluation's log-probs; and OUT_DIR/SETTING-final/, the policy
saved by `save_policy`. `train(setting)` in one process is the reference.

The data are cut so that the ranks' shares are uneven: 26 pairs in micro-batches of 5 (ranks
take 3 and 2), the last micro-batch a single pair (rank 1 gets none), 2 micro-batches a step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when launched by torchrun
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo import distributed  # noqa: E402
from dpo.config import SFTConfig, TrainConfig  # noqa: E402
from dpo.engine import LogProbEngine  # noqa: E402
from dpo.objectives import SFTObjective  # noqa: E402
from dpo.policy import make_reference, make_trainable, save_policy  # noqa: E402
from dpo.tokenization import TokenizedSequence  # noqa: E402
from dpo.trainer import DPOTrainer, Trainer  # noqa: E402
from smollm.lora import LoRAConfig  # noqa: E402

from model_utils import crafted_pairs, random_model, small_config  # noqa: E402

LORA = LoRAConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
# what trains (last blocks, head, LoRA), whether FSDP shards the blocks, and the objective
SETTINGS = {
    "ddp": dict(train_last_n=1),  # the frozen trunk shared by policy and reference
    "fsdp": dict(train_last_n=1, fsdp=True),
    "full-fsdp": dict(train_last_n=3, head=True, fsdp=True),  # embedding and tied head whole, blocks sharded
    "lora-ddp": dict(lora=LORA),
    "lora-fsdp": dict(lora=LORA, fsdp=True),
    "lora-last-fsdp": dict(lora=LoRAConfig(r=4, alpha=8.0, layers=[2]), fsdp=True),  # a shared trunk too
    "sft-ddp": dict(sft=True, train_last_n=2),
    "sft-fsdp": dict(sft=True, train_last_n=3, head=True, fsdp=True),
}
STEPS = 3


def train(setting: str, final_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The trainable tensors (whole) after STEPS steps of `setting`, and "metric.<name>" [STEPS];
    with final_dir, the policy is also saved there as `python -m dpo.train` saves final/."""
    s = SETTINGS[setting]
    shard = s.get("fsdp", False) and distributed.current().enabled  # one process: the plain reference run
    policy = random_model(small_config(num_hidden_layers=3), seed=0).train()
    torch.manual_seed(0)  # LoRA's initialisation
    make_trainable(policy, s.get("lora"), train_last_n=s.get("train_last_n", 0), train_head=s.get("head", False))
    pairs = crafted_pairs(26, seed=3, share_first_token=True)
    settings = dict(batch_size=5, grad_accum=2, max_steps=STEPS, lr=1e-3, dtype="float32", max_grad_norm=1.0,
                    seed=0, fsdp=shard)
    if s.get("sft"):
        sequences = [TokenizedSequence(p.chosen_ids, p.chosen_mask, p.prompt_len) for p in pairs]
        if shard:
            distributed.shard_blocks(policy, None, torch.device("cpu"))
        objective = SFTObjective(LogProbEngine(policy), pad_token_id=0)
        trainer = Trainer(policy, sequences, SFTConfig(**settings), objective)
    else:
        reference = make_reference(policy, s.get("lora"))
        if shard:
            distributed.shard_blocks(policy, reference, torch.device("cpu"))
        trainer = DPOTrainer(policy, reference, pairs, TrainConfig(**settings), pad_token_id=0)
    rows = [trainer.train_step() for _ in range(STEPS)]
    held_out = {}
    if not s.get("sft"):  # the held-out evaluation: batches split over the ranks (all of them under FSDP)
        result = trainer.evaluate(crafted_pairs(11, seed=9))  # batches of 5, 5 and 1
        held_out = {"eval.policy_logps": trainer.eval_cache.policy_logps(),
                    "eval.reference_logps": trainer.eval_cache.reference_logps,
                    "eval.accuracy": torch.tensor([result.policy_accuracy, result.reference_accuracy]),
                    "batches_run": torch.tensor([len(trainer.eval_cache.batches)])}  # of 3, by this rank
    if final_dir is not None:
        save_policy(policy, final_dir, lora=s.get("lora"), base_model="random")  # gathered under FSDP
    out = {f"weight.{name}": t.detach().clone() for name, t in trainer.trainable_state().items()} | held_out
    for key in ("loss", "grad_norm", "tokens", *(k for k in rows[0] if k.endswith(("reward", "accuracy", "margin")))):
        out[f"metric.{key}"] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
    return out


def main(out_dir: str, settings: list[str]) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    d = distributed.init_from_env("cpu")
    try:
        for setting in settings:
            result = train(setting, Path(out_dir) / f"{setting}-final")
            if d.is_main:
                save_file({k: v.contiguous() for k, v in result.items()}, str(Path(out_dir) / f"{setting}.safetensors"))
        d.barrier()  # the ranks leave together, once rank 0 has written its last file (as dpo.cli.main does)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
