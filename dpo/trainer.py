"""The trainer: one class for every way of training (DPO and its variants, SFT), setup -> step -> state.

What a step computes is decided by an objective object (dpo.objectives): `PreferenceObjective`
for preference pairs, `SFTObjective` for prompt + response sequences. Everything else is the
trainer's, the same for both: the length-grouped data order, gradient accumulation, clipping,
the non-finite guard, AdamW and its schedule, and the exact resumable state.

A notebook drives it one step at a time:

    trainer = DPOTrainer(policy, reference, train_pairs, config, pad_token_id=tok.pad_token_id)
    metrics = trainer.train_step()          # one optimizer step, returns a dict
    result = trainer.evaluate(eval_pairs)   # reference vs policy accuracy

and everything needed to continue a run exactly (trainable weights, optimizer and scheduler
state, RNG states, position in the data order, step) comes out of `state_dict()` as tensors
plus JSON, and goes back in with `load_state_dict()` (see dpo.checkpointing).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from smollm import SmolLM

from . import distributed
from .distributed import Distributed, full_tensor, grad_norm_and_clip, is_sharded, like
from .engine import LogProbEngine
from .frozen_memo import FrozenMemo
from .evaluate import EvalResult, HeldOutCache
from .objectives import PreferenceObjective
from .precision import autocast_context, autocast_dtype_for
from .tokenization import TokenizedPair, length_grouped_order


class NonFiniteError(FloatingPointError):
    """A loss or gradient that is NaN or infinite; names the step and the pairs."""


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
          device: torch.device, fused: bool = True) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU since torch 2.4, CUDA): one kernel over all
    tensors, ~4x faster on CPU than the foreach default and without its temporary copy of every
    trainable tensor (docs/benchmarks.md, section 2). FSDP's sharded parameters take the
    default (foreach) implementation."""
    fused = fused and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class Trainer:
    """Trains `policy`'s trainable parameters on `train_items` with `objective` (see dpo.objectives).

    config: any config with the run's optimisation settings (batch_size, grad_accum, epochs,
    max_steps, lr, weight_decay, warmup_steps, max_grad_norm, skip_nonfinite, seed, dtype):
    `TrainConfig` or `SFTConfig` (dpo.config).
    dist: this process's place in a torchrun job (default: `dpo.distributed.current()`, a single
    process unless the job was joined): each rank computes its shard of every micro-batch and
    the gradients are summed over the ranks, so the step is the single process's step.
    """

    def __init__(self, policy: SmolLM, train_items: list, config: Any, objective, *,
                 device: torch.device | str | None = None, dist: Distributed | None = None):
        if not train_items:
            raise ValueError(f"{type(self).__name__} needs at least one training item")
        self.policy, self.config, self.objective = policy, config.check(), objective
        self.dist = dist if dist is not None else distributed.current()
        self.train_items = train_items
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
        self.autocast_dtype = autocast_dtype_for(config, self.device)
        self.trainable = [p for p in policy.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the policy has no trainable parameters")
        self.sharded = any(is_sharded(p) for p in self.trainable)  # FSDP (dpo.distributed.shard_blocks)
        self.optimizer = adamw(self.trainable, config.lr, config.weight_decay, self.device, fused=not self.sharded)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        # Progress through the data: epoch, and micro-batches of that epoch already used.
        self.step = 0
        self.epoch = 0
        self.cursor = 0
        self.skipped_nonfinite = 0
        self._order_cache: tuple[int, list[list[int]]] | None = None

    # ------------------------------------------------------------------ data order
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Micro-batches (indices into train_items) of `epoch`: a length-grouped random order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            lengths = [self.objective.length(item) for item in self.train_items]
            order = length_grouped_order(lengths, self.config.batch_size, self.config.seed + epoch)
            bs = self.config.batch_size
            self._order_cache = (epoch, [order[i:i + bs] for i in range(0, len(order), bs)])
        return self._order_cache[1]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.train_items) / self.config.batch_size) / self.config.grad_accum)

    @property
    def total_steps(self) -> int:
        steps = self.steps_per_epoch * self.config.epochs
        return min(steps, self.config.max_steps) if self.config.max_steps else steps

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def _next_micro_batches(self) -> list[list]:
        """The micro-batches of the next optimizer step, advancing epoch/cursor."""
        batches = self.epoch_batches(self.epoch)
        take = batches[self.cursor:self.cursor + self.config.grad_accum]
        self.cursor += len(take)
        if self.cursor >= len(batches):
            self.epoch, self.cursor = self.epoch + 1, 0
        return [[self.train_items[i] for i in b] for b in take]

    # ------------------------------------------------------------------ one step
    def compute_loss(self, items: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the objective's loss summed over its units [], per-item statistics) of one micro-batch."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.objective.collate(items).items()}
        with autocast_context(self.device, self.autocast_dtype):
            return self.objective(batch)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's metrics.

        The loss is the objective's mean over the whole step: the sum of its micro-batches'
        losses over the sum of their `objective.count` (pairs, or response tokens), so cutting
        a step into micro-batches, or its micro-batches across ranks, changes nothing but memory.
        """
        if self.done:
            raise RuntimeError(f"training is finished ({self.step} of {self.total_steps} steps)")
        start = time.perf_counter()
        self.policy.train()
        micro_batches = self._next_micro_batches()  # the global step: every rank knows all of it
        n_items = sum(len(b) for b in micro_batches)
        n_units = sum(self.objective.count(b) for b in micro_batches)
        totals: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=self.device)
        for items in micro_batches:
            mine = self.dist.shard(items)
            if not mine and self.sharded:
                # FSDP gathers each block's weights in forward and reduces its gradients in backward,
                # with every rank taking part: a rank without items runs one with zero weight.
                loss, _ = self.compute_loss(items[:1])
                (loss * 0).backward()
                continue
            if not mine:
                continue
            loss, stats = self.compute_loss(mine)
            (loss / n_units).backward()
            loss_sum += loss.detach()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v.sum()
        if self.dist.enabled:
            self.dist.sum_gradients(self.trainable)
            loss_sum, totals = self._reduce(loss_sum, totals)
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = grad_norm_and_clip(self.trainable, max_norm)
        loss = (loss_sum / max(n_units, 1)).item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss={loss}, grad_norm={grad_norm.item()}"
            sources = [getattr(p, "source", None) or f"item #{getattr(p, 'index', '?')}"
                       for b in micro_batches for p in b]
            if not self.config.skip_nonfinite:
                raise NonFiniteError(f"non-finite {what} at step {self.step + 1}; pairs: {sources}")
            self.skipped_nonfinite += 1
            self.step += 1
            return {"step": self.step, "skipped_nonfinite": True, "detail": what, "pairs": sources}
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        metrics = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": loss}
        for k, v in totals.items():
            if k != "tokens":
                metrics[k] = v.item() / n_items
        tokens = int(totals["tokens"])
        metrics.update({"grad_norm": grad_norm.item(), "lr": lr, self.objective.unit: n_units, "tokens": tokens,
                        "seconds": seconds, "tokens_per_s": tokens / seconds})
        return metrics

    def _reduce(self, loss_sum: torch.Tensor, totals: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss sum and statistics summed over the ranks (one all-reduce). Every rank
        has the same keys: the objective's stats, whether or not its shard was empty."""
        keys = self.dist.broadcast_json(sorted(totals))  # rank 0's: a rank may have had no items
        values = torch.stack([loss_sum.float(), *[torch.as_tensor(totals.get(k, 0.0), device=self.device).float()
                                                  for k in keys]])
        self.dist.all_reduce(values)
        return values[0], dict(zip(keys, values[1:]))

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by HF name (what a checkpoint must store of the model), whole
        even when FSDP shards them (then every rank must call this)."""
        return {n: full_tensor(p.detach()) for n, p in self.policy.named_parameters() if p.requires_grad}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, json_state): everything to resume exactly, with whole tensors, so any number of
        ranks can resume it (under FSDP every rank must call this). No pickle anywhere."""
        tensors = {f"model.{n}": t for n, t in self.trainable_state().items()}
        opt = self.optimizer.state_dict()
        names = {id(p): n for n, p in self.policy.named_parameters() if p.requires_grad}
        param_order = [names[id(p)] for p in self.trainable]
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"optim.{param_order[idx]}.{key}"] = full_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        meta = {
            "step": self.step, "epoch": self.epoch, "cursor": self.cursor,
            "skipped_nonfinite": self.skipped_nonfinite,
            "param_order": param_order,
            "optimizer_param_groups": opt["param_groups"],
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.to_dict(),
        }
        return tensors, meta

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state_dict` saved. A checkpoint of another model or freezing raises
        ValueError before anything is changed."""
        params = dict(self.policy.named_parameters())
        trainable = self.trainable_state()
        for name, p in trainable.items():  # (whole: FSDP's shards gathered)
            key = f"model.{name}"
            if key not in tensors:
                raise ValueError(f"checkpoint has no tensor {key}; was it written for another --train-last-n?")
            if tensors[key].shape != p.shape:
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(tensors[key].shape)}, "
                                 f"the model's is {tuple(p.shape)}: it was written for another model")
        order = meta["param_order"]
        names = {id(p): n for n, p in self.policy.named_parameters() if p.requires_grad}
        if order != [names[id(p)] for p in self.trainable]:
            raise ValueError("checkpoint's trainable parameters differ from this run's")
        for name in trainable:
            params[name].copy_(like(tensors[f"model.{name}"], params[name]))  # this rank's shard under FSDP
        state: dict[int, dict[str, torch.Tensor]] = {}
        for idx, name in enumerate(order):
            prefix = f"optim.{name}."
            entry = {k[len(prefix):]: v if v.shape != trainable[name].shape else like(v, params[name])
                     for k, v in tensors.items() if k.startswith(prefix)}  # exp_avg, exp_avg_sq: as the weight
            if entry:
                state[idx] = entry
        # the saved hyperparameters, with this run's implementation (fused or not: FSDP's sharded
        # parameters take the foreach one, so a checkpoint may come from the other kind of run)
        how = {k: v for k, v in self.optimizer.param_groups[0].items() if k in ("fused", "foreach")}
        groups = [{**g, **how} for g in meta["optimizer_param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.epoch, self.cursor = meta["step"], meta["epoch"], meta["cursor"]
        self.skipped_nonfinite = meta.get("skipped_nonfinite", 0)
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])


def check_reference_is_apart(policy: SmolLM, reference: SmolLM) -> None:
    """The "same weights" pitfall: a reference that shares a TRAINABLE tensor with the policy (e.g.
    `reference = policy`) moves with it, so every loss stays ln 2 while the weights drift with no
    anchor, and every shortcut that reads "equal weights" as "not trained yet" hides it. Sharing
    the frozen tensors is what `make_reference` does on purpose; sharing a trainable one is refused."""
    trainable = {id(p): name for name, p in policy.named_parameters() if p.requires_grad}
    shared = [trainable[id(p)] for p in reference.parameters() if id(p) in trainable]
    if shared:
        raise ValueError(f"the reference shares {len(shared)} trainable tensors with the policy "
                         f"({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}): it would train with "
                         "the policy, the loss would stay ln 2 while the weights drift. Build the reference with "
                         "dpo.policy.make_reference (or dpo.freeze.frozen_reference) after freezing")


class DPOTrainer(Trainer):
    """The trainer with the DPO objective, and the held-out evaluation of reference vs policy.

    textbook: compute the log-probs by the textbook path (`dpo.engine.plain_logps`) instead of
    the engine: the oracle the engine is tested against, not a way to train.
    allow_shared_reference: skip `check_reference_is_apart` (only to show the pitfall, as
    notebooks/04_reflection_questions.ipynb does).
    frozen_memo: a `dpo.frozen_memo.FrozenMemo` that the runs of a sweep from the same reference
    share: a batch an earlier run trained on reuses its trunk output and reference log-probs.
    """

    def __init__(self, policy: SmolLM, reference: SmolLM | None, train_pairs: list[TokenizedPair],
                 config: Any, *, pad_token_id: int, device: torch.device | str | None = None,
                 textbook: bool = False, allow_shared_reference: bool = False, dist: Distributed | None = None,
                 frozen_memo: FrozenMemo | None = None):
        config.check()
        if reference is not None and not allow_shared_reference:
            check_reference_is_apart(policy, reference)
        if config.needs_reference and reference is None:
            raise ValueError(f"loss_type {' '.join(config.loss_type)} needs a reference model; got None")
        if not config.needs_reference and reference is not None:
            raise ValueError(f"loss_type {' '.join(config.loss_type)} needs no reference model: pass "
                             "reference=None (none is built or run; evaluations compare with the starting "
                             "model's log-probs, measured once)")
        self.reference, self.pad_token_id = reference, pad_token_id
        self.engine = LogProbEngine(policy, reference, share_trunk=config.shared_trunk,
                                    recompute=config.recompute_tail, memo=frozen_memo)
        objective = PreferenceObjective(self.engine, config, pad_token_id=pad_token_id, textbook=textbook)
        super().__init__(policy, train_pairs, config, objective, device=device, dist=dist)
        self.eval_cache: HeldOutCache | None = None  # made by the first evaluate

    @property
    def train_pairs(self) -> list[TokenizedPair]:
        return self.train_items

    @property
    def textbook(self) -> bool:
        return self.objective.textbook

    @textbook.setter
    def textbook(self, value: bool) -> None:
        self.objective.textbook = value

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, pairs: list[TokenizedPair], batch_size: int | None = None,
                 start_model: SmolLM | None = None) -> EvalResult:
        """Reference vs policy preference accuracy on held-out `pairs`.

        The first call on a list of pairs keeps the shared trunk's output (if any) and the
        reference's log-probs (`HeldOutCache`, in `eval_cache`), and later calls on the same list
        run only the policy's tail: the same numbers as `evaluate_pairs`. Another list, or the
        same list with other tokens, builds a new cache; `eval_cache = None` frees it.

        Without a reference (a reference-free loss), the reference column is the starting
        model's, measured when the cache is built: by the policy before the first step, or
        afterwards (a resumed run) by `start_model`, the starting weights loaded again.
        """
        settings = dict(pad_token_id=self.pad_token_id, reduction=self.config.logp_reduction,
                        batch_size=batch_size or self.config.batch_size, device=self.device,
                        autocast_dtype=self.autocast_dtype)
        if self.eval_cache is None or not self.eval_cache.fits(pairs, **settings):
            self.eval_cache = None  # free the old one before building the new one
            if self.reference is None and start_model is None and self.step > 0:
                raise ValueError("a reference-free run compares the policy with the starting model, whose "
                                 "held-out log-probs are measured before the first step; after it, pass "
                                 "start_model= (the starting weights)")
            self.eval_cache = HeldOutCache(self.engine, pairs, **settings, start_model=start_model)
        return self.eval_cache.evaluate(self.config.beta)
