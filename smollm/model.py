"""SmolLM, a Llama-architecture decoder, written top to bottom like the architecture.

    tokens -> embed -> [ RMSNorm -> attention(RoPE, GQA) -> + -> RMSNorm -> SwiGLU MLP -> + ] x L
           -> RMSNorm -> LM head -> logits

Shape legend: B batch, T new positions, S attended positions (cached + new), C hidden size,
H query heads, KV key/value heads, D head dim, V vocabulary, I MLP width, N real (non-padding)
tokens of a batch.

Two things make training lighter without changing a number (tests/test_batch_logps.py):
* Padding costs nothing: a padded batch without a KV cache runs as one row of its N real
  tokens (`Packing`), since every layer but attention treats tokens one by one, and
  attention runs causally within each sequence. Padding positions come out as zero hidden
  states. Rows named as sharing a prefix (DPO's chosen and rejected answers to one prompt)
  run their common leading tokens once.
* RMSNorm and the SwiGLU MLP have hand-written backwards (`RMSNormFunction`, `SwiGLUDown`)
  that keep fewer activations for backward than autograd would, and recompute the cheap
  elementwise rest.

Parameter names equal HuggingFace's LlamaForCausalLM (`model.layers.{i}.self_attn.q_proj.weight`,
...), so a checkpoint loads by name with no renaming, and `save_pretrained` writes one that
`transformers` loads. Numerics follow HF too: RMSNorm in fp32 then cast back, rotary cos/sin
tables kept in fp32, softmax inside scaled_dot_product_attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import SmolLMConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """The norm with a hand-written backward, to keep less for it.

    Autograd would keep x and the normalised x (two [.., C] tensors); this keeps x and the
    per-row 1/rms [.., 1], and recomputes the normalised x in backward. Forward is the same
    arithmetic as HF's LlamaRMSNorm, so outputs are bit-identical.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # [.., 1] fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd  # [.., C] fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()  # d loss / d normed
            # d normed / d x = rstd * (I - normed normed^T / C)
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables, in HF's split-halves (`rotate_half`) convention.

    Dimension i of the first half of a head is rotated together with dimension i of the
    second half (not interleaved pairs), so HF checkpoints need no q/k permutation.
    cos/sin are fp32, non-persistent buffers of shape [max_positions, D].
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)  # [D/2]
        positions = torch.arange(self.max_positions, device=device).float()
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, D]: both halves share a frequency
        return angles.cos(), angles.sin()

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would cast the tables and `to_empty` would leave them
        # uninitialised: rebuild them, in fp32, on whatever device the module moved to.
        super()._apply(fn, recurse)
        self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, 1, T, D] (broadcast over heads)."""
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension, split into halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys [B, heads, T, D] by their positions' angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer for positions already seen, preallocated.

    `generate` makes one, the model writes into it: after a forward over T new positions,
    `length` grows by T and the next forward only needs the new tokens.
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
                 head_dim: int, *, device=None, dtype=torch.float32):
        shape = (batch_size, num_kv_heads, max_length, head_dim)  # [B, KV, S_max, D]
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0  # positions stored (advanced by the model after its last layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v [B, KV, T, D] and return all of them so far [B, KV, S, D]."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} positions requested, {self.max_length} allocated")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@dataclass(frozen=True, eq=False)  # eq=False: never compare the mask tensors
class Segment:
    """One row's tokens in a packed row: packed positions [start, start + length).

    They attend causally to themselves and, before that, to all of `prefix_length` tokens at
    [prefix_start, prefix_start + prefix_length): the leading tokens this row shares with
    another row, computed once there. `mask` [length, prefix_length + length] is the boolean
    mask of that (None when there is no prefix: plain causal).
    """
    start: int
    length: int
    prefix_start: int = 0
    prefix_length: int = 0
    mask: torch.Tensor | None = None


class Packing:
    """Where the real tokens of a padded batch are, to run them as one row [1, N, ...].

    Each row's real tokens must be one contiguous run (right or left padding); `of` returns
    None otherwise. Rows are packed one after another, each one a `Segment`.

    Shared prefixes: for a pair of rows (a, b) given to `of`, the tokens b has in common with
    a from the start (e.g. the prompt both DPO answers continue) are computed once, in a's
    segment; b's segment holds only its tokens after them and attends to a's copy of the
    prefix. Exact: a position's hidden state depends only on the tokens up to it, so the
    prefix's states are the same in both rows. `unpack` gives both rows their prefix states.
    """

    def __init__(self, index: torch.Tensor, position_ids: torch.Tensor, segments: list[Segment],
                 gather: torch.Tensor, shape: tuple[int, int]):
        self.index = index  # [N] flat indices into [B*T] of the packed tokens, in order
        self.position_ids = position_ids  # [1, N] each packed token's position in its own row
        self.segments = segments  # one per row with tokens of its own, covering [0, N) in order
        self.gather = gather  # [B*T] packed position of every (row, position); N for padding
        self.shape = shape  # (B, T)

    @classmethod
    def of(cls, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
           shared_prefixes: list[tuple[int, int]] | None = None) -> "Packing | None":
        """The packing of a [B, T] mask; None when a row's real tokens are not contiguous.

        shared_prefixes: pairs of rows (a, b), each row in at most one pair, whose common
        leading tokens (by `input_ids`) are computed once, in row a.
        """
        device = attention_mask.device
        real = attention_mask.bool().cpu()  # [B, T]: index bookkeeping is done on the CPU
        B, T = real.shape
        counts = real.sum(-1)  # [B]
        first = real.long().argmax(-1)  # [B] first real position (0 for an empty row)
        inside = torch.arange(T)[None, :] - first[:, None]  # [B, T]
        if not bool((real == ((inside >= 0) & (inside < counts[:, None]))).all()):
            return None  # a row with a hole in it: keep the padded path
        counts, first = counts.tolist(), first.tolist()
        partner: dict[int, int] = {}  # row b -> row a whose prefix it reuses
        shared = [0] * B  # b's leading tokens equal to a's
        if shared_prefixes:
            if input_ids is None:
                raise ValueError("shared_prefixes needs input_ids, to find the common prefixes")
            ids = input_ids.cpu()
            for a, b in shared_prefixes:
                if not (0 <= a < B and 0 <= b < B) or a == b or {a, b} & (partner.keys() | set(partner.values())):
                    raise ValueError(f"shared_prefixes: ({a}, {b}) must be two different rows of {B}, "
                                     "each in at most one pair")
                n = min(counts[a], counts[b])
                differs = (ids[a, first[a]:first[a] + n] != ids[b, first[b]:first[b] + n]).nonzero()
                partner[b], shared[b] = a, int(differs[0]) if len(differs) else n
        # Layout: first the rows that own all their tokens, then the rest of each row that
        # reuses a prefix (DPO: the chosen rows, then what each rejected row adds to its prompt).
        start = [0] * B  # packed position of each owning row's first real token
        cursor = 0
        for r in range(B):
            if r not in partner:
                start[r], cursor = cursor, cursor + counts[r]
        own_start = {}  # packed position of the first token after a reusing row's shared prefix
        for r in sorted(partner):
            own_start[r], cursor = cursor, cursor + counts[r] - shared[r]
        # gather: [B, T] -> packed position; a row's j-th real token is at start + j, except the
        # second row of a pair, whose first `shared` tokens are its partner's.
        gather = torch.full((B, T), cursor, dtype=torch.long)  # padding -> N (a zero row)
        index = torch.empty(cursor, dtype=torch.long)
        positions = torch.empty(cursor, dtype=torch.long)  # positions count a row's real tokens
        segments = []
        for r in range(B):
            j = torch.arange(counts[r])  # [n] real token number
            if r in partner:
                a, L = partner[r], shared[r]
                gather[r, first[r]:first[r] + counts[r]] = torch.where(j < L, start[a] + j, own_start[r] + j - L)
                index[own_start[r]:own_start[r] + counts[r] - L] = r * T + first[r] + j[L:]
                positions[own_start[r]:own_start[r] + counts[r] - L] = j[L:]
                if counts[r] > L:
                    n = counts[r] - L  # query i (position L + i) sees prefix keys and own keys <= i
                    mask = torch.ones(n, L + n, dtype=torch.bool).tril(diagonal=L)
                    segments.append(Segment(own_start[r], n, start[a], L, mask.to(device) if L else None))
            else:
                gather[r, first[r]:first[r] + counts[r]] = start[r] + j
                index[start[r]:start[r] + counts[r]] = r * T + first[r] + j
                positions[start[r]:start[r] + counts[r]] = j
                if counts[r]:
                    segments.append(Segment(start[r], counts[r]))
        segments.sort(key=lambda seg: seg.start)
        return cls(index.to(device), positions[None].to(device), segments, gather.flatten().to(device), (B, T))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [1, N, ...]: the packed positions, segment after segment."""
        return x.flatten(0, 1)[self.index].unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> [B, T, ...], zeros at padding positions; a shared prefix goes to both rows."""
        rows = torch.cat([x[0], x.new_zeros((1, *x.shape[2:]))])  # [N + 1, ...]: the last for padding
        return rows[self.gather].view(*self.shape, *x.shape[2:])


class Attention(nn.Module):
    """Causal grouped-query self-attention: H query heads share KV key/value heads."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None, layer_idx: int = 0):
        """mask: None (plain causal), a boolean [B, 1, T, S] tensor, or the `Packing.segments`
        when x [1, N, C] holds several sequences packed one after another (each attends
        causally to itself, and to its shared prefix if it has one)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # [B, KV, S, D]
        # Grouped-query attention: each KV head serves H // KV query heads (enable_gqa: without
        # copying k and v H // KV times).
        if mask is None:  # no padding, no cache: the plain causal mask, fastest kernels
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
        elif isinstance(mask, list):  # packed sequences: each one attends within itself
            y = torch.cat([self._attend_segment(q, k, v, seg) for seg in mask], dim=2).transpose(1, 2)  # [1, N, H, D]
        else:  # mask [B, 1, T, S]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
        y = y.reshape(B, T, self.num_heads * self.head_dim)  # [B, T, H*D]
        return self.o_proj(y)

    @staticmethod
    def _attend_segment(q, k, v, seg: Segment) -> torch.Tensor:
        """Attention of one packed segment: q [1, H, N, D], k, v [1, KV, N, D] -> [1, H, n, D]."""
        own = slice(seg.start, seg.start + seg.length)
        if seg.prefix_length == 0:
            return F.scaled_dot_product_attention(q[:, :, own], k[:, :, own], v[:, :, own], is_causal=True,
                                                  enable_gqa=True)
        prefix = slice(seg.prefix_start, seg.prefix_start + seg.prefix_length)
        keys = torch.cat([k[:, :, prefix], k[:, :, own]], dim=2)  # [1, KV, L + n, D]
        values = torch.cat([v[:, :, prefix], v[:, :, own]], dim=2)  # [1, KV, L + n, D]
        return F.scaled_dot_product_attention(q[:, :, own], keys, values, attn_mask=seg.mask, enable_gqa=True)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)


class SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) with a hand-written backward, to keep less for it.

    Autograd would keep gate, silu(gate), up and their product: four [.., I] tensors, the
    largest activations of a block. This keeps gate and up and recomputes the other two
    (elementwise, cheap) in backward, with the same kernels, so gradients are bit-identical.
    Under autocast it computes in the autocast dtype, as F.linear would.
    """

    @staticmethod
    def forward(ctx, gate, up, weight):
        device = gate.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        ctx.save_for_backward(gate, up, weight)
        ctx.dtype = dtype
        with torch.autocast(device, enabled=False):
            return F.linear((F.silu(gate) * up).to(dtype), weight.to(dtype))  # [.., C]

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        with torch.autocast(gate.device.type, enabled=False):
            silu = F.silu(gate)
            grad = grad.to(ctx.dtype)
            grad_weight = None
            if ctx.needs_input_grad[2]:
                hidden = (silu * up).to(ctx.dtype)  # [.., I], as in forward
                grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1]))
                grad_weight = grad_weight.to(weight.dtype)  # [C, I]
            grad_hidden = (grad @ weight.to(ctx.dtype)).to(silu.dtype)  # [.., I]
            grad_up = grad_hidden * silu
            grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
        return grad_gate, grad_up, grad_weight


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = MLP(hidden_size, intermediate_size)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None, layer_idx: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class SmolLM(nn.Module):
    """The whole decoder. `model(input_ids, attention_mask)` -> logits [B, T, V]."""

    def __init__(self, config: SmolLMConfig, *, init_weights: bool = True):
        super().__init__()
        self.config = config
        c = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.hidden_size),
            layers=nn.ModuleList(
                Block(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                      c.head_dim, c.rms_norm_eps)
                for _ in range(c.num_hidden_layers)
            ),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps),
        ))
        self.rotary = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if init_weights:  # load_pretrained skips this: every weight is overwritten anyway
            self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings, make the LM head the very same tensor as the embedding."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    @property
    def tied(self) -> bool:
        """Whether the LM head is the very same tensor as the input embedding."""
        return self.lm_head.weight is self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, *, pack: bool = True) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V].

        attention_mask [B, S], 1 for real tokens and 0 for padding, covers the cached positions
        too (S = kv_cache.length + T). Right or left padding both work: positions count from
        each row's first real token, and no real token attends to a padding token.
        pack: run a padded batch as its real tokens only (see the module docstring);
        pack=False computes every padding position too (the textbook way, same real logits).
        """
        hidden = self.hidden_states(input_ids, attention_mask, kv_cache, pack=pack)
        return self.lm_head(hidden)  # [B, T, V]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None, *, start_layer: int = 0,
                      end_layer: int | None = None, hidden: torch.Tensor | None = None,
                      final_norm: bool = True, pack: bool = True, recompute: bool = False,
                      packing: Packing | None = None) -> torch.Tensor:
        """The residual stream [B, T, C] after blocks [start_layer, end_layer), then the final norm.

        The defaults run the whole trunk. `start_layer`/`end_layer`/`hidden` run a slice of it
        (used to share a frozen trunk between policy and reference); `final_norm=False` skips
        model.norm, e.g. when more blocks follow. `pack`: see `forward`. `recompute`
        (activation checkpointing): keep only each block's input for backward and run the
        block again during backward; same gradients, less memory, one more forward of the blocks.
        `packing`: the batch's `Packing` to run by, e.g. one with shared prefixes, made once
        for several calls on the same batch (default: made here from `attention_mask` when
        `pack` and the batch has padding). With shared prefixes and `hidden`, a reusing row's
        states at its shared positions are not read: its partner's stand for them (equal when
        both come from the same tokens, as in a shared trunk).
        """
        end_layer = self.config.num_hidden_layers if end_layer is None else end_layer
        past = kv_cache.length if kv_cache is not None else 0
        x = self.model.embed_tokens(input_ids) if hidden is None else hidden  # [B, T, C]
        if (packing is None and pack and kv_cache is None and attention_mask is not None
                and not bool(attention_mask.bool().all())):
            packing = Packing.of(attention_mask)  # None if a row has holes: the padded path below
        if packing is not None:  # run the real tokens only, each shared prefix once
            if kv_cache is not None or packing.shape != tuple(input_ids.shape):
                raise ValueError(f"a Packing of shape {packing.shape} cannot run input_ids of shape "
                                 f"{tuple(input_ids.shape)}{' with a KV cache' if kv_cache is not None else ''}")
            self._check_positions(past=0, new=input_ids.shape[1])
            x = packing.pack(x)  # [1, N, C]
            position_ids, mask = packing.position_ids, packing.segments  # [1, N], a Segment per row
        else:
            position_ids, mask = self._positions_and_mask(input_ids, attention_mask, past)
        cos, sin = self.rotary(position_ids)  # [B, 1, T, D] each
        recompute = recompute and kv_cache is None and torch.is_grad_enabled()
        for i in range(start_layer, end_layer):
            if recompute:
                x = checkpoint(self.model.layers[i], x, cos, sin, mask, use_reentrant=False)
            else:
                x = self.model.layers[i](x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None and end_layer == self.config.num_hidden_layers:
            kv_cache.length += input_ids.shape[1]
        x = self.model.norm(x) if final_norm else x
        return packing.unpack(x) if packing is not None else x  # [B, T, C]

    def _check_positions(self, past: int, new: int) -> None:
        if past + new > self.config.max_position_embeddings:  # positions never exceed S - 1
            raise ValueError(
                f"{past + new} positions (cached {past} + new {new}) exceed max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )

    def _positions_and_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            past: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids [B, T] and a boolean attention mask [B, 1, T, S] (None: plain causal)."""
        B, T = input_ids.shape
        S = past + T
        self._check_positions(past, T)
        device = input_ids.device
        if attention_mask is None:
            position_ids = torch.arange(past, S, device=device).expand(B, T)
            if past == 0:
                return position_ids, None
            attention_mask = torch.ones(B, S, dtype=torch.long, device=device)
        if attention_mask.shape != (B, S):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                f"(batch, cached {past} + new {T} positions)"
            )
        real = attention_mask.bool()  # [B, S]
        # Positions count real tokens only, so left padding shifts nothing.
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B, T]
        if past == 0 and bool(real.all()):
            return position_ids, None
        query_pos = torch.arange(past, S, device=device)[:, None]  # [T, 1]
        key_pos = torch.arange(S, device=device)[None, :]  # [1, S]
        causal = key_pos <= query_pos  # [T, S]
        # A padding query would see no key at all (a NaN row); let every query see itself.
        allowed = causal & (real[:, None, :] | (key_pos == query_pos))  # [B, T, S]
        return position_ids, allowed[:, None]  # [B, 1, T, S]

    def new_kv_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_length` positions."""
        weight = self.model.embed_tokens.weight
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, max_length, c.num_key_value_heads, c.head_dim,
                       device=weight.device, dtype=weight.dtype)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count, shared (tied) tensors counted once."""
        seen = {}
        for p in self.parameters():
            if not trainable_only or p.requires_grad:
                seen[id(p)] = p.numel()
        return sum(seen.values())
