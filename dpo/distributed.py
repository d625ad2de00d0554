"""Training on several processes with PyTorch's own `torch.distributed`, launched by `torchrun`.

    torchrun --nproc_per_node 2 -m dpo.train ...           # 2 processes on this machine
    torchrun --nproc_per_node 2 -m dpo.train --fsdp ...    # the same, the trained blocks sharded

A single process (no WORLD_SIZE in the environment, or 1) runs exactly as before: every helper
here is then a no-op, and the trainer's arithmetic is unchanged.

**How a step is split across R ranks.** Every rank computes the same length-grouped order of
micro-batches (it is seeded), and rank r takes its contiguous shard of each micro-batch
(`Distributed.shard`). Its loss is its items' summed loss over the *global* count of the step
(pairs, or response tokens), so the ranks' gradients add up to the single process's gradient:
the global batch, its order and the update are those of one process, whatever R is. Metrics
are sums reduced across ranks; the non-finite decision follows from the reduced loss and
gradient norm (equal on every rank), and a stop signal on any rank stops all of them.

**Why not `DistributedDataParallel`.** DDP's reducer is armed by calling the wrapped module's
`forward`; the engine (dpo.engine) never calls the policy as a whole: it runs the shared frozen
trunk once, then the policy's and the reference's tails, and the head only at scored
positions. So the trainer sums exactly the trainable gradients itself after backward
(`sum_gradients`: one flat buffer per dtype, one all-reduce, as DDP's buckets do). What DDP
would add is overlapping that all-reduce with backward, which pays on GPUs with big models;
on the models and CPUs here the all-reduce is a few percent of a step (docs/benchmarks.md).

**FSDP** (`--fsdp`, `shard_blocks`): every transformer block is sharded with PyTorch's FSDP2
(`fully_shard`), each rank holding 1/R of its weights, gradients and AdamW state, gathered
block by block for its forward and backward (and again for a recomputed forward). The
embedding, the final norm and the head stay whole on every rank: the engine calls them
outside any block, and the head is tied to the embedding; when they train, their gradients
are summed like DDP's. The frozen trunk that policy and reference share is sharded too, as one
module for both (it has no gradients, so sharding it only saves memory), and the engine still
runs it once. A checkpoint or a saved model holds whole tensors (`full_tensor`, `gathered`), so
every checkpoint resumes with any number of ranks, with or without FSDP.

Only rank 0 reads and filters the data (`from_main` sends the pairs to the others as JSON),
writes files, logs and shows the progress bar. Evaluations run on every rank, with the held-out
log-probs split over the ranks (dpo.evaluate.HeldOutCache), so every rank reaches the same
decisions (early stopping, best/).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import torch

from smollm import SmolLM


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank of world_size (1: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" (CPU) or "nccl" (CUDA); None for a single process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collectives' tensors live: NCCL works on CUDA tensors, gloo on CPU tensors."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ data
    def shard(self, items: list) -> list:
        """This rank's contiguous share of one micro-batch: ceil(n / R) items (the last ranks may get
        fewer, or none). Concatenated in rank order, the shares are the micro-batch."""
        if not self.enabled:
            return items
        per = math.ceil(len(items) / self.world_size)
        return items[self.rank * per:(self.rank + 1) * per]

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` summed (or maxed) over the ranks, in place; returned for chaining."""
        if self.enabled:
            import torch.distributed as dist

            moved = tensor.to(self.comm_device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (e.g. a stop signal received by one of them)."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce(torch.tensor([int(flag)], device=self.comm_device), "max").item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_json(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank, sent as JSON text (never pickle)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        data = json.dumps(obj).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(size, src=0)
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.comm_device) if self.is_main
                  else torch.empty(int(size.item()), dtype=torch.uint8, device=self.comm_device))
        dist.broadcast(buffer, src=0)
        return obj if self.is_main else json.loads(buffer.cpu().numpy().tobytes().decode())

    def from_main(self, work: Callable[[], Any], encode: Callable[[Any], Any] = lambda x: x,
                  decode: Callable[[Any], Any] = lambda x: x) -> Any:
        """`work()` run on rank 0 only, its result sent to every rank (encode/decode: to and from
        JSON-able values). An error on rank 0 stops the others too, with `FollowerStop`."""
        if not self.enabled:
            return work()
        if self.is_main:
            try:
                result = work()
            except BaseException as error:
                self.broadcast_json({"error": f"{type(error).__name__}: {error}"})
                raise
            self.broadcast_json({"result": encode(result)})
            return result
        message = self.broadcast_json()
        if "error" in message:
            raise FollowerStop(f"rank 0 stopped: {message['error']}")
        return decode(message["result"])

    # ------------------------------------------------------------------ gradients
    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the ranks, in place: one all-reduce per dtype over
        a flat buffer. A parameter without a gradient on this rank (its shard was empty) counts
        as zeros. Sharded (FSDP) parameters are skipped: FSDP has reduced them already."""
        if not self.enabled:
            return
        plain = [p for p in params if not is_sharded(p)]
        # A parameter no rank has a gradient for stays without one (AdamW then skips it, as one process would).
        have = self.all_reduce(torch.tensor([int(p.grad is not None) for p in plain], dtype=torch.int32), "max")
        plain = [p for p, h in zip(plain, have.tolist()) if h]
        for dtype in sorted({p.dtype for p in plain}, key=str):
            group = [p for p in plain if p.dtype == dtype]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            self.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone()
                offset += n


class FollowerStop(RuntimeError):
    """A rank other than 0 stops because rank 0 did (rank 0 reports why)."""


_CURRENT = Distributed()


def current() -> Distributed:
    """The job this process belongs to (a single process unless `init_from_env` set one up)."""
    return _CURRENT


def init_from_env(device_type: str) -> Distributed:
    """Join the job torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT): gloo on CPU, NCCL on CUDA (and this process's GPU is cuda:LOCAL_RANK).
    Without WORLD_SIZE (not launched by torchrun) nothing is set up. A job of 1 process joins
    its group too (FSDP then runs over one rank), and otherwise runs as a single process."""
    global _CURRENT
    if "WORLD_SIZE" not in os.environ or _CURRENT.backend is not None:
        return _CURRENT
    world = int(os.environ["WORLD_SIZE"])
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    _CURRENT = Distributed(rank, world, local_rank, backend)
    return _CURRENT


def shutdown() -> None:
    """Leave the job (a no-op for a single process)."""
    global _CURRENT
    if _CURRENT.backend is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _CURRENT = Distributed()


# ---------------------------------------------------------------------------- FSDP
def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_blocks(policy: SmolLM, reference: SmolLM | None, device: torch.device) -> int:
    """Shard every block of the policy, and of the reference where it has blocks of its own,
    with FSDP2 over all ranks; returns how many blocks were sharded. Gradients are summed over
    the ranks, not averaged, as `Distributed.sum_gradients` does for the rest.

    A reference block that shares every tensor with the policy's block, frozen (the trunk
    `make_reference` shares), becomes the policy's very module first, so both stay one module
    after sharding and the engine still finds the trunk they share. Call it before the trainer
    is built: the optimizer must see the sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    d = current()
    if d.backend is None:
        raise ValueError("--fsdp shards the model over the ranks of a torchrun job; this process was not "
                         "launched by torchrun (torchrun --nproc_per_node N -m ...)")
    if reference is not None:
        for i, (mine, theirs) in enumerate(zip(policy.model.layers, reference.model.layers)):
            a, b = list(mine.parameters()), list(theirs.parameters())
            if len(a) == len(b) and all(p is q and not p.requires_grad for p, q in zip(a, b)):
                reference.model.layers[i] = mine  # [i]: the same tensors already, now the same module
    mesh = init_device_mesh(device.type, (d.world_size,))
    done: dict[int, torch.nn.Module] = {}
    for model in (policy, reference):
        for block in (model.model.layers if model is not None else []):
            if id(block) not in done:
                fully_shard(block, mesh=mesh)
                block.set_gradient_divide_factor(1.0)  # a sum, as the trainer's global normalisation wants
                block.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
                # Each block is its own FSDP root (the engine calls the blocks, never the whole model), and
                # a root keeps its weights gathered after forward unless told otherwise: then every block
                # would be whole at once by the end of the forward, and sharding would save nothing.
                block.set_reshard_after_forward(True)
                done[id(block)] = block
    return len(done)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every rank must call it), or `t` itself."""
    return t.full_tensor() if is_sharded(t) else t


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same tensor or hold equal values, sharded or not (gathered:
    every rank decides alike, so every rank must call it)."""
    return a is b or (a.shape == b.shape and torch.equal(full_tensor(a), full_tensor(b)))


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `target` is: this rank's shard when `target` is sharded (no
    communication: every rank holds `full`), else `full` itself."""
    if not is_sharded(target):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                             src_data_rank=None)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every sharded tensor gathered whole (on every rank)."""
    return {name: full_tensor(t) for name, t in model.state_dict().items()}


def gathered(policy: SmolLM, rebuild: Callable[[SmolLM], None] | None = None) -> SmolLM | None:
    """The policy with whole tensors, to save: the policy itself when nothing is sharded; else a
    plain copy on rank 0 (None on the others), built from `full_state` (every rank must call
    this). `rebuild(model)` gives the fresh model the policy's structure first (e.g. adapters)."""
    if not any(is_sharded(p) for p in policy.parameters()):
        return policy
    state = full_state(policy)
    if not current().is_main:
        return None
    copy = SmolLM(policy.config, init_weights=False)  # every weight is overwritten below
    # (an untied head unties the config too: dpo.freeze.untie_lm_head)
    if rebuild is not None:
        rebuild(copy)
    copy.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    return copy.to(next(iter(state.values())).dtype)


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients of `params` (sharded ones included), clipped to
    `max_norm` in place like `torch.nn.utils.clip_grad_norm_`, which it is when nothing is
    sharded. Sharded gradients add their shards' squares across the ranks; whole ones (equal
    on every rank after `sum_gradients`) count once."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sharded = [g.to_local() for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    device = sharded[0].device
    squares = torch.stack([g.float().pow(2).sum() for g in sharded]).sum()
    current().all_reduce(squares)
    if whole:
        squares = squares + torch.stack([g.float().pow(2).sum() for g in whole]).sum().to(device)
    norm = squares.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in sharded + whole:
        g.mul_(coef.to(g.dtype))
    return norm
