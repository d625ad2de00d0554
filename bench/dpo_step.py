"""One DPO optimizer step: this project's `dpo.trainer.DPOTrainer` vs `trl.DPOTrainer`.

    python -m bench.dpo_step                       # CPU, fp32, 3 reps, the last 5 blocks train
    python -m bench.dpo_step --mode full           # full fine-tuning on both sides
    python -m bench.dpo_step --mode lora           # LoRA r=16 on every linear of every block (TRL + peft)
    python -m bench.dpo_step --reps 1 --layers 8 --max-length 128   # a quick check
    python -m bench.dpo_step --device cuda         # bf16 autocast, tokens/s and TFLOP/s

Both sides get identical inputs: the same saved random SmolLM-135M checkpoint (random
weights at the real config, written by `smollm.save_pretrained`), the same real HH-RLHF
pairs tokenized by `dpo.tokenization` (TRL receives those token ids as its
prompt_ids/chosen_ids/rejected_ids, so its collator builds the very same padded batch; the
parent checks it), beta 0.8, lr 1e-4, weight decay 1e-2, batch 8 pairs, max length 512.

Trainable sets (they differ, by construction of each library):
* ours: the last 5 of 30 blocks + final norm + LM head. `dpo.freeze` unties the head from
  the embedding first, so the embedding stays frozen and the head trains on its own copy.
* TRL: requires_grad=False on the embedding and the first 25 blocks. The head stays TIED to
  the (frozen) embedding, so TRL trains the last 5 blocks + final norm and NOT the head
  (17.7M trainable parameters against our 46.0M). `--trl-train-head` unties TRL's head as
  we do, for an equal trainable set.

--mode full trains everything on both sides (ours: every block, the final norm and the head,
which `dpo.freeze` keeps tied to the embedding, so the embedding trains too, as in TRL); each
side keeps a frozen copy of the starting model as its reference. --mode lora adds LoRA
adapters (r=16, alpha=32, no dropout) to q/k/v/o/gate/up/down in every block: ours with
`smollm.lora` and the policy with its adapters off as the reference, TRL with a peft
`LoraConfig`, whose reference is likewise the adapter-disabled model (`ref_model` None). The
children report whether a second copy of the model exists (`reference_copy_params`).

Each repetition runs each side in its own fresh process (ours, trl, ours, trl, ...), which
builds everything, runs `--warmup` steps, then times `--steps` steps. Peak memory is that
process's ru_maxrss (everything: imports, model loading, both models, optimizer state),
and on CUDA also torch.cuda.max_memory_allocated. Times are medians over repetitions.

How a step is timed:
* ours: `DPOTrainer.train_step()` around a perf_counter (collation, forward, backward,
  clipping, optimizer step; the trainer synchronises CUDA before returning).
* TRL: `trainer.train()` with max_steps = warmup + steps and a callback that stamps
  on_step_begin and on_step_end (training_step = forward + backward, grad clipping,
  optimizer.step, scheduler, zero_grad; the batch was collated just before
  on_step_begin). Everything else is left at DPOConfig's defaults, including
  gradient_checkpointing=True (`--trl-gradient-checkpointing false` turns it off).

Model FLOPs per step (for TFLOP/s), counted the usual way on the real (non-padding)
tokens, so the count is the same whatever a side skips: 2*N FLOPs/token for each forward
(policy and reference: N = all matmul parameters, blocks + head) and 4*N_trainable for the
backward of the trainable part.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import (DEFAULT_WORKDIR, emit, load_average, machine, median, peak_rss_mb, random_checkpoint,
                   real_pairs, rss_mb, run_child)

SETTINGS = dict(beta=0.8, lr=1e-4, weight_decay=1e-2)


# ------------------------------------------------------------------ the parent
def prepare(args) -> Path:
    """Write the checkpoint and the batch's token ids once; check TRL would collate the same batch."""
    import torch

    from dpo.tokenization import collate_pairs

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = random_checkpoint(workdir, args.layers)
    pairs, tok = real_pairs(args.batch_size, args.max_length)
    spec = {
        "checkpoint": str(ckpt), "max_length": args.max_length, "batch_size": args.batch_size,
        "train_last_n": args.train_last_n, "mode": args.mode, "lora_r": args.lora_r, "device": args.device, "warmup": args.warmup, "steps": args.steps,
        "pad_token_id": tok.pad_token_id, "dtype": args.dtype,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "trl_train_head": args.trl_train_head,
        "ours_code": args.ours_code, "ours_ablation": [a for a in args.ours_ablation.split(",") if a],
        "pairs": [{"prompt_ids": p.chosen_ids[:p.prompt_len], "chosen_ids": p.chosen_ids[p.prompt_len:],
                   "rejected_ids": p.rejected_ids[p.prompt_len:], "source": p.source} for p in pairs],
    }
    batch = collate_pairs(pairs, tok.pad_token_id)
    spec["tokens_padded"] = int(batch["input_ids"].numel())
    spec["tokens_real"] = int(batch["attention_mask"].sum())
    spec["tokens_response"] = int(batch["response_mask"].sum())
    spec["longest"] = int(batch["input_ids"].shape[1])
    try:  # the batch TRL's collator builds from these ids must be ours
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=args.max_length)(spec["pairs"])
        assert torch.equal(theirs["input_ids"], batch["input_ids"]), "TRL input_ids differ"
        assert torch.equal(theirs["attention_mask"], batch["attention_mask"]), "TRL attention_mask differs"
        assert torch.equal(theirs["completion_mask"], batch["response_mask"]), "TRL completion_mask differs"
        spec["inputs_checked"] = True
    except ImportError:
        spec["inputs_checked"] = False
    path = workdir / f"dpo_step_spec_L{args.layers or 30}_T{args.max_length}_B{args.batch_size}_{args.mode}.json"
    path.write_text(json.dumps(spec))
    return path


def summarize(results: dict[str, list[dict]], spec: dict) -> dict:
    out = {}
    for side, runs in results.items():
        step_s = [median(r["step_s"]) for r in runs]
        out[side] = {
            "step_s": median(step_s), "step_s_all": step_s,
            "tokens_per_s": spec["tokens_real"] / median(step_s),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
            "peak_rss_mb_all": [r["peak_rss_mb"] for r in runs],
            "rss_before_steps_mb": median([r["rss_before_steps_mb"] for r in runs]),
            "trainable": runs[0]["trainable"], "flops_per_step": runs[0]["flops_per_step"],
            "reference_copy_params": runs[0].get("reference_copy_params"),
            "tflops": runs[0]["flops_per_step"] / median(step_s) / 1e12,
            "losses": runs[0]["losses"],
            "load_avg": [round(r["load_before"], 2) for r in runs],
        }
        if runs[0].get("saved_for_backward_mb") is not None:
            out[side]["saved_for_backward_mb"] = runs[0]["saved_for_backward_mb"]
        if runs[0].get("cuda_peak_mb") is not None:
            out[side]["cuda_peak_mb"] = median([r["cuda_peak_mb"] for r in runs])
    if "ours" in out and "trl" in out:
        out["ratio"] = {"step_time": out["ours"]["step_s"] / out["trl"]["step_s"],
                        "peak_rss": out["ours"]["peak_rss_mb"] / out["trl"]["peak_rss_mb"]}
        if "cuda_peak_mb" in out["ours"] and "cuda_peak_mb" in out["trl"]:
            out["ratio"]["cuda_peak"] = out["ours"]["cuda_peak_mb"] / out["trl"]["cuda_peak_mb"]
    return out


def report(summary: dict, spec: dict) -> str:
    lines = [f"batch: {spec['batch_size']} pairs = {2 * spec['batch_size']} rows x {spec['longest']} positions; "
             f"{spec['tokens_real']} real tokens ({spec['tokens_padded']} with padding), "
             f"{spec['tokens_response']} response tokens; device {spec['device']}",
             f"{'side':<6}{'step s':>10}{'tokens/s':>10}{'TFLOP/s':>9}{'peak RSS MB':>13}{'trainable':>12}  steps s (per rep)"]
    for side in ("ours", "trl"):
        if side in summary:
            s = summary[side]
            lines.append(f"{side:<6}{s['step_s']:>10.2f}{s['tokens_per_s']:>10.0f}{s['tflops']:>9.3f}"
                         f"{s['peak_rss_mb']:>13.0f}{s['trainable']:>12,}  "
                         + ", ".join(f"{x:.2f}" for x in s["step_s_all"]))
            if s.get("reference_copy_params") is not None:
                lines.append(f"      reference: {s['reference_copy_params']:,} parameters of its own (0: no second copy)")
            if "saved_for_backward_mb" in s:
                lines.append(f"      activations kept for backward (one policy forward): "
                             f"{s['saved_for_backward_mb']:.0f} MB")
            if "cuda_peak_mb" in s:
                lines.append(f"      cuda max_memory_allocated: {s['cuda_peak_mb']:.0f} MB")
    if "ratio" in summary:
        r = summary["ratio"]
        # the goals the issues set: last-N blocks (time and memory), full fine-tuning and LoRA (time)
        time_goal, memory_goal = {"last-n": (0.25, 0.30)}.get(spec.get("mode", "last-n"), (0.3, None))
        lines.append(f"ratio ours/trl: step time {r['step_time']:.3f} (target <= {time_goal}), "
                     f"peak RSS {r['peak_rss']:.3f}" + (f" (target <= {memory_goal:.2f})" if memory_goal else "")
                     + (f", cuda peak {r['cuda_peak']:.3f}" if "cuda_peak" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dpo_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions per side (each a fresh process)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps in each process before the timed ones")
    p.add_argument("--steps", type=int, default=1, help="timed steps in each process (their median counts)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bf16 autocast on CUDA, for both sides)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--layers", type=int, default=None, help="fewer blocks than SmolLM-135M's 30 (quick checks)")
    p.add_argument("--train-last-n", type=int, default=5, help="--mode last-n: how many blocks train")
    p.add_argument("--mode", default="last-n", choices=["last-n", "full", "lora"],
                   help="what trains: the last N blocks (+ head), everything, or LoRA adapters")
    p.add_argument("--lora-r", type=int, default=16, help="--mode lora: the adapters' rank (alpha = 2r)")
    p.add_argument("--sides", default="ours,trl", help="comma-separated: ours, trl")
    p.add_argument("--trl-gradient-checkpointing", default="true", choices=["true", "false"],
                   help="DPOConfig.gradient_checkpointing (TRL's default: true)")
    p.add_argument("--trl-train-head", action="store_true",
                   help="untie TRL's LM head and train it, as ours does (default: TRL keeps it tied and frozen)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="run BOTH sides' processes with MALLOC_MMAP_THRESHOLD_=BYTES (glibc: tensors of that "
                        "size or more are given back to the OS when freed). Default: TRL's side runs with "
                        "glibc's own setting, ours keeps freed memory for reuse as the training commands do "
                        "(smollm.heap), which a set MALLOC_ variable switches off")
    p.add_argument("--ours-code", default=None, metavar="DIR",
                   help="import smollm/ and dpo/ from DIR for our side (e.g. an older commit unpacked by "
                        "`git archive`), to measure before/after")
    p.add_argument("--ours-ablation", default="", metavar="LIST",
                   help="turn optimizations off on our side, comma-separated: "
                        + "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()))
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="where the checkpoint and inputs are cached")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        emit(run_ours(spec) if args.child == "ours" else run_trl(spec))
        return 0

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    spec_path = prepare(args)
    spec = json.loads(spec_path.read_text())
    print(f"machine: {json.dumps(machine())}", flush=True)
    print(f"inputs: {spec['batch_size']} pairs, longest {spec['longest']}, {spec['tokens_real']} real tokens; "
          f"TRL collates the same batch: {spec['inputs_checked']}; checkpoint {spec['checkpoint']}", flush=True)
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.reps):
        for side in sides:
            env = {} if args.malloc_mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
            r = run_child(["bench.dpo_step", "--child", side, "--spec", str(spec_path)], env=env)
            results[side].append(r)
            print(f"rep {rep + 1}/{args.reps} {side:<4}: step {', '.join(f'{x:.2f}' for x in r['step_s'])} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, process {r['process_wall_s']:.0f} s, "
                  f"load avg {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)
    summary = summarize(results, spec)
    print(report(summary, spec))
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": {k: v for k, v in spec.items() if k != "pairs"},
                                               "args": vars(args), "machine": machine(), "summary": summary,
                                               "runs": results}, indent=2))
    return 0


# ------------------------------------------------------------------ model FLOPs
def model_flops(tokens: int, n_forward: int, n_trainable: int) -> float:
    """Policy forward + reference forward (2N each) + backward of the trainable part (4N)."""
    return tokens * (2 * n_forward * 2 + 4 * n_trainable)


def _matmul_params(model, embedding) -> int:
    """Parameters that multiply activations: everything but the embedding lookup (a tied
    head is counted once, as the head) and the norm weights."""
    return sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and p is not embedding) + \
        embedding.numel()


# ------------------------------------------------------------------ ours, in a child
ABLATIONS = {  # --ours-ablation: each switches one optimization off, for the "what each bought" table
    "no-shared-trunk": "the textbook path: policy and reference each run the whole model over every "
                       "padded position, with full logits, so no-pack and no-head-chunk too",
    "no-pack": "run the padding too, so no-prefix-share too",
    "no-prefix-share": "run the prompt twice, in the chosen and in the rejected row",
    "no-head-chunk": "the whole [N, V] head logits kept for backward",
    "textbook-layers": "autograd RMSNorm and MLP instead of the hand-written backwards",
    "no-recompute": "keep the policy tail's activations instead of recomputing them in backward",
    "foreach-adamw": "torch's default foreach AdamW instead of the fused one",
    "ref-head-copy": "the reference keeps its own copy of the LM head instead of the frozen embedding",
}


def _ablate(names: list[str]) -> None:
    """Switch off the optimizations that live in smollm/ and dpo/ code (monkeypatching)."""
    import torch
    import torch.nn.functional as F

    import dpo.engine as engine
    from smollm.layout import Packing
    from smollm.model import MLP, RMSNorm

    unknown = set(names) - set(ABLATIONS)
    if unknown:
        raise SystemExit(f"unknown --ours-ablation {sorted(unknown)}; known: {', '.join(ABLATIONS)}")
    if "no-pack" in names:  # no Packing is ever made: every call runs the padded batch
        Packing.of = classmethod(lambda cls, *args, **kwargs: None)
    if "no-head-chunk" in names:
        def whole_logits(lm_head, h, targets):
            logits = lm_head(h).float()  # [N, V], kept for backward
            return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
        engine._head_token_logps = whole_logits
    if "textbook-layers" in names:
        def norm(self, x):
            dtype = x.dtype
            x = x.float()
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        RMSNorm.forward = norm
        MLP.forward = lambda self, x: self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def saved_for_backward_mb(trainer, pairs) -> float:
    """MB of activations autograd keeps for backward in one policy forward (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for m in (trainer.policy, trainer.reference) for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses, _ = trainer.compute_loss(pairs)
    del losses
    return sum(seen.values()) / 1e6


def run_ours(spec: dict) -> dict:
    if spec.get("ours_code"):
        sys.path.insert(0, spec["ours_code"])
    import torch

    from dpo.config import TrainConfig
    from dpo.freeze import freeze_all_but_last, frozen_reference
    from dpo.tokenization import TokenizedPair
    from dpo.trainer import DPOTrainer
    from smollm import load_pretrained

    if spec.get("ours_ablation"):
        _ablate(spec["ours_ablation"])
    try:  # what the training commands do (smollm.heap); older code (--ours-code) may not have it
        from smollm.heap import keep_freed_memory
        heap = keep_freed_memory()
    except ImportError:
        heap = "not in this code"
    device = torch.device(spec["device"])
    pairs = [TokenizedPair(index=i, source=p["source"], chosen_ids=p["prompt_ids"] + p["chosen_ids"],
                           chosen_mask=[0] * len(p["prompt_ids"]) + [1] * len(p["chosen_ids"]),
                           rejected_ids=p["prompt_ids"] + p["rejected_ids"],
                           rejected_mask=[0] * len(p["prompt_ids"]) + [1] * len(p["rejected_ids"]),
                           prompt_len=len(p["prompt_ids"])) for i, p in enumerate(spec["pairs"])]
    n_steps = spec["warmup"] + spec["steps"]
    policy = load_pretrained(spec["checkpoint"], device=device)
    n_forward = _matmul_params(policy, policy.model.embed_tokens.weight)
    mode = spec.get("mode", "last-n")
    if mode == "lora":
        from dpo.policy import make_reference, make_trainable
        from smollm.lora import TARGETS, LoRAConfig

        lora = LoRAConfig(r=spec["lora_r"], alpha=2.0 * spec["lora_r"], targets=list(TARGETS[:-1]))
        report = make_trainable(policy, lora, train_last_n=0, train_head=False)
        reference = make_reference(policy, lora)
    else:
        n_train = policy.config.num_hidden_layers if mode == "full" else spec["train_last_n"]
        report = freeze_all_but_last(policy, n_train)
        reference = frozen_reference(policy)
    ours_params = {id(p) for p in policy.parameters()}
    reference_copy = sum(p.numel() for p in reference.parameters() if id(p) not in ours_params)
    ablation = spec.get("ours_ablation") or []
    if "ref-head-copy" in ablation and reference.tied:
        reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone(), requires_grad=False)
    options = {}  # TrainConfig switches (only named when used, so an older --ours-code still runs)
    if "no-shared-trunk" in ablation:
        options["shared_trunk"] = False
    # The policy tail recomputed unless ablated, as section 2 of docs/benchmarks.md measured it (its rows
    # 5-8); `python -m dpo.train` keeps the activations by default since (row 8a, section 10).
    if "recompute_tail" in {f.name for f in dataclasses.fields(TrainConfig)}:
        options["recompute_tail"] = "no-recompute" not in ablation
    config = TrainConfig(batch_size=spec["batch_size"], max_length=spec["max_length"], epochs=n_steps,
                         max_steps=n_steps, device=spec["device"], dtype=spec["dtype"], progress=False,
                         **SETTINGS, **options)
    trainer = DPOTrainer(policy, reference, pairs, config, pad_token_id=spec["pad_token_id"], device=device)
    if "no-shared-trunk" in ablation:
        trainer.textbook = True  # today's code: the textbook path (older code: shared_trunk=False was it)
    engine = getattr(trainer, "engine", None) or getattr(trainer, "shared_trunk", None)  # older code: shared_trunk
    if ("no-prefix-share" in ablation or "no-pack" in ablation) and engine is not None:
        engine.share_prefixes = False
    if "foreach-adamw" in ablation:
        trainer.optimizer = torch.optim.AdamW(trainer.trainable, lr=config.lr, weight_decay=config.weight_decay,
                                              foreach=True)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = rss_mb()
    times, losses = [], []
    for i in range(n_steps):
        start = time.perf_counter()
        m = trainer.train_step()
        elapsed = time.perf_counter() - start
        losses.append(m["loss"])
        if i >= spec["warmup"]:
            times.append(elapsed)
    peak = peak_rss_mb()  # before the measurement below, which keeps a graph of its own
    saved = saved_for_backward_mb(trainer, pairs)
    return {"side": "ours", "step_s": times, "losses": losses, "peak_rss_mb": peak, "saved_for_backward_mb": saved,
            "code": sys.modules["smollm"].__file__, "ablation": spec.get("ours_ablation"),
            "rss_before_steps_mb": rss_before, "trainable": report.trainable, "reference_copy_params": reference_copy,
            "flops_per_step": model_flops(spec["tokens_real"], n_forward, report.trainable),
            "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "freed_memory": heap}


# ------------------------------------------------------------------ TRL, in a child
def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    bf16 = (spec["dtype"] or ("bfloat16" if cuda else "float32")) == "bfloat16"
    ckpt = spec["checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    embedding = model.get_input_embeddings().weight
    n_forward = _matmul_params(model, embedding)
    mode = spec.get("mode", "last-n")
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], task_type="CAUSAL_LM")
    elif mode == "last-n":
        split = model.config.num_hidden_layers - spec["train_last_n"]
        if spec["trl_train_head"]:  # an own, trainable copy of the head, as dpo.freeze does
            model.lm_head.weight = torch.nn.Parameter(embedding.detach().clone())
            model.config.tie_word_embeddings = False
        embedding.requires_grad_(False)
        for layer in model.model.layers[:split]:
            layer.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    n_steps = spec["warmup"] + spec["steps"]
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    config = DPOConfig(
        output_dir=out_dir, beta=SETTINGS["beta"], learning_rate=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"],
        per_device_train_batch_size=spec["batch_size"], max_length=spec["max_length"], max_steps=n_steps,
        precompute_ref_log_probs=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, bf16=bf16, use_cpu=not cuda, seed=0,
        gradient_checkpointing=spec["trl_gradient_checkpointing"] == "true", dataloader_num_workers=0)
    # TRL tokenizes text itself; build it on a tiny text set, then give it our exact token ids.
    text = Dataset.from_list([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}] * spec["batch_size"])
    trainer = DPOTrainer(model=model, args=config, train_dataset=text, processing_class=tokenizer,
                         peft_config=peft_config)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    policy_params = {id(p) for p in trainer.model.parameters()}
    reference_copy = (0 if trainer.ref_model is None else
                      sum(p.numel() for p in trainer.ref_model.parameters() if id(p) not in policy_params))
    trainer.train_dataset = Dataset.from_list(
        [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in spec["pairs"]])

    stamps: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            stamps.append((self.start, time.perf_counter()))

    trainer.add_callback(StepTimer())
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = rss_mb()
    result = trainer.train()
    times = [end - start for start, end in stamps][spec["warmup"]:]
    assert len(stamps) == n_steps, f"timed {len(stamps)} steps, expected {n_steps}"
    return {"side": "trl", "step_s": times, "losses": [result.training_loss], "peak_rss_mb": peak_rss_mb(),
            "rss_before_steps_mb": rss_before, "trainable": trainable,
            "flops_per_step": model_flops(spec["tokens_real"], n_forward, trainable),
            "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 1e6 if cuda else None,
            "threads": torch.get_num_threads(), "ref_model_separate": trainer.ref_model is not None,
            "reference_copy_params": reference_copy}


if __name__ == "__main__":
    sys.exit(main())
