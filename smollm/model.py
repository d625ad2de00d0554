"""SmolLM, a Llama-architecture decoder, written top to bottom like the architecture.

    tokens -> embed -> [ RMSNorm -> attention(RoPE, GQA) -> + -> RMSNorm -> SwiGLU MLP -> + ] x L
           -> RMSNorm -> LM head -> logits

Shape legend: B batch, T new positions, S attended positions (cached + new), C hidden size,
H query heads, KV key/value heads, D head dim, V vocabulary, I MLP width, N real (non-padding)
tokens of a batch.

Two things make it lighter without changing a number, each in its own module:
* `smollm.layout`: which positions attend to which. A padded batch runs as one row of its
  real tokens (`Packing`), and rows that share leading tokens run them once.
* `smollm.autograd`: RMSNorm and the SwiGLU MLP with hand-written backwards that keep fewer
  activations than autograd would.

Parameter names equal HuggingFace's LlamaForCausalLM (`model.layers.{i}.self_attn.q_proj.weight`,
...), so a checkpoint loads by name with no renaming, and `save_pretrained` writes one that
`transformers` loads. Numerics follow HF too: RMSNorm in fp32 then cast back, rotary cos/sin
tables kept in fp32, softmax inside scaled_dot_product_attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .autograd import RMSNormFunction, SwiGLUDown, plain_linear, rms_norm
from .config import SmolLMConfig
from .layout import Layout, Packing, common_prefixes


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)  # nothing to keep for backward: no autograd.Function


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
    """Rotate queries or keys [B, heads, T, D] by their positions' angles (cos, sin [B, 1, T, D])."""
    if cos.dtype != x.dtype:  # the tables are fp32
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer for positions already seen, preallocated.

    `generate` makes one, the model writes into it: after a forward over T new positions,
    `length` grows by T and the next forward only needs the new tokens. Only the first
    `length` positions are ever read, so the buffers start uninitialised (no zero-filling).

    A left-padded prompt batch is computed packed (its real tokens only, a prefix that rows
    share once: `Packing`): `packed` hands the cache that packing, and each layer's keys and
    values then go to every row's slots [B, KV, T, D], a shared prefix's to each row that shares
    it, zeros to the padding slots (never attended to, but an uninitialised NaN there would still
    reach the output through a zero attention weight). `keep` drops finished rows.
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
                 head_dim: int, *, device=None, dtype=torch.float32):
        shape = (batch_size, num_kv_heads, max_length, head_dim)  # [B, KV, S_max, D]
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0  # positions stored (advanced by the model after its last layer)
        self.packing: Packing | None = None  # set during a packed forward: where its tokens go

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def packed(self, packing: Packing) -> None:
        """The next forward is `packing`'s packed row [1, N] of a [B, T] batch, from position 0."""
        if self.length != 0:
            raise ValueError("a packed forward fills an empty cache (a prompt), not one with positions in it")
        B, T = packing.shape
        if T > self.max_length or B != self.batch_size:
            raise ValueError(f"a packed batch of {B} rows x {T} positions does not fit a KV cache of "
                             f"{self.batch_size} x {self.max_length}")
        self.packing = packing

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v [B, KV, T, D] and return all of them so far [B, KV, S, D].

        In a packed forward k, v are [1, KV, N, D]: each row's slots get its tokens' (zeros at
        padding), and k, v come back as they are (the packed layout attends within them)."""
        if self.packing is not None:
            T = self.packing.shape[1]
            for new, store in ((k, self.keys[layer]), (v, self.values[layer])):
                slots = self.packing.unpack(new.transpose(1, 2))  # [1, N, KV, D] -> [B, T, KV, D]
                store[:, :, :T] = slots.transpose(1, 2)  # [B, KV, T, D]
            return k, v
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} positions requested, {self.max_length} allocated")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def fill(self, layer: int, rows: torch.Tensor, cols: torch.Tensor, T: int, keys: torch.Tensor,
             values: torch.Tensor) -> None:
        """Positions [0, T) of `layer` for a prompt whose keys and values were kept from an earlier
        forward (`smollm.generation.PromptPrefixes`): keys, values [N, KV, D] go to the real
        positions (rows [N], cols [N]), zeros to the padding slots."""
        for new, store in ((keys, self.keys[layer]), (values, self.values[layer])):
            slots = store[:, :, :T]  # [B, KV, T, D]
            slots.zero_()
            slots[rows, :, cols] = new

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` [B'] (in that order), e.g. the sequences still being
        generated: every later forward then costs B' rows instead of B."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                kept = t.new_empty((len(rows), *t.shape[1:]))  # [B', KV, S_max, D]
                kept[:, :, :self.length] = t[rows, :, :self.length]
                store[i] = kept


class Attention(nn.Module):
    """Causal grouped-query self-attention: H query heads share KV key/value heads.

    `fused_qkv`, set only while generating (`smollm.onednn`), computes q, k and v in one matmul.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.fused_qkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout,
                kv_cache: KVCache | None = None, layer_idx: int = 0, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; `layout` says which positions each one attends to.

        keep [n]: only these positions' outputs [1, n, C], x being one row: queries for them
        alone, keys and values for every position (what they attend to)."""
        B, T, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        if keep is not None and kv_cache is not None:
            raise ValueError("keep is for a forward without a KV cache")
        if self.fused_qkv is not None and keep is None:  # one matmul; q's and k's heads rotated in one go
            heads = self.fused_qkv(x).view(B, T, H + 2 * KV, D).transpose(1, 2)  # [B, H+2KV, T, D]
            qk = apply_rotary(heads[:, :H + KV], cos, sin)  # [B, H+KV, T, D]
            q, k, v = qk[:, :H], qk[:, H:], heads[:, H + KV:]  # [B, H, T, D], [B, KV, T, D] x 2
        else:
            xq, qcos, qsin = (x, cos, sin) if keep is None else (x[:, keep], cos[:, :, keep], sin[:, :, keep])
            q = self.q_proj(xq).view(B, xq.shape[1], H, D).transpose(1, 2)  # [B, H, T or n, D]
            k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)  # [B, KV, T, D]
            v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)  # [B, KV, T, D]
            q, k = apply_rotary(q, qcos, qsin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # [B, KV, S, D]
        y = layout.attend(q, k, v, queries=keep).transpose(1, 2)  # [B, T or n, H, D]
        y = y.reshape(B, q.shape[2], H * D)  # [B, T or n, H*D]
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

    `fused_gate_up`, set only while generating (`smollm.onednn`), computes gate and up in one matmul.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fused_gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)  # [.., I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)  # [.., I] each
        if plain_linear(self.down_proj):  # nothing but F.linear: fused, keeping less for backward
            return SwiGLUDown.apply(gate, up, self.down_proj.weight)
        return self.down_proj(F.silu(gate) * up)  # an adapter or hooked module runs as itself


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = MLP(hidden_size, intermediate_size)

    def forward(self, x, cos, sin, layout: Layout, kv_cache: KVCache | None = None, layer_idx: int = 0,
                keep: torch.Tensor | None = None):
        """x [B, T, C] -> [B, T, C]; with keep [n], one row's positions: [1, n, C], those alone
        (the others still give attention their keys and values)."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, layout, kv_cache, layer_idx, keep)
        x = (x if keep is None else x[:, keep]) + attended
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
                kv_cache: KVCache | None = None, *, pack: bool = True, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V].

        attention_mask [B, S], 1 for real tokens and 0 for padding, covers the cached positions
        too (S = kv_cache.length + T). Right or left padding both work: positions count from
        each row's first real token, and no real token attends to a padding token.
        pack: run a padded batch as its real tokens only (`smollm.layout.Packing`), and a prompt
        batch into an empty KV cache its rows' common leading tokens once (`common_prefixes`: a
        chat template's system prompt); pack=False computes every padding position too, every
        row on its own (the textbook way, same real logits).
        last_only: the logits of the last position only [B, 1, V], all that generating the next
        token needs (the LM head is a fifth of SmolLM-135M's weights; a prompt's other
        positions would each pay for it).
        """
        hidden = self.hidden_states(input_ids, attention_mask, kv_cache, pack=pack)
        return self.lm_head(hidden[:, -1:] if last_only else hidden)  # [B, T or 1, V]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None, *, pack: bool = True, start: int = 0, end: int | None = None,
                      x: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed residual stream [B, T, C] (what the LM head reads); see `forward`.

        A slice of the blocks: `end` < the number of blocks returns the stream after block end-1,
        not normed; `start` > 0 continues from `x` [B, T, C], the stream after block start-1 of the
        same input_ids and mask. Two models that share their first K blocks can so run them once
        (dpo.health's KL). With a KV cache, only the blocks to the last: the cache's blocks
        [0, start) must then already hold these positions' keys and values
        (`smollm.generation.PromptPrefixes` puts a prompt's there).
        """
        if end is not None and end != self.config.num_hidden_layers and kv_cache is not None:
            raise ValueError("a slice of the blocks that stops before the last runs without a KV cache")
        if (x is None) != (start == 0):
            raise ValueError("x, the residual stream after block start-1, is given exactly when start > 0")
        last = end is None or end == self.config.num_hidden_layers
        x = self.model.embed_tokens(input_ids) if x is None else x  # [B, T, C]
        packing = None
        prompt = kv_cache is not None and kv_cache.length == 0  # a prompt batch into a cache
        if pack and (attention_mask is not None or prompt) and (kv_cache is None or prompt):
            real = attention_mask if attention_mask is not None else torch.ones_like(input_ids)  # [B, T]
            # a prompt batch also runs the prefixes its rows share once (a chat template's system prompt)
            pairs = common_prefixes(input_ids, real) if prompt and input_ids.shape[0] > 1 else None
            if pairs or not bool(real.bool().all()):
                packing = Packing.of(real, input_ids, pairs)  # None if a row has holes: the padded path below
        if packing is not None:  # the real tokens only, as one row [1, N, C]
            self.check_positions(past=0, new=input_ids.shape[1])
            if kv_cache is not None:  # each row's keys and values go to its slots
                kv_cache.packed(packing)
            try:
                x = self.run_layers(packing.pack(x), packing.position_ids, packing.layout, start, end,
                                    kv_cache=kv_cache)
            finally:
                if kv_cache is not None:
                    kv_cache.packing = None
            if kv_cache is not None:
                kv_cache.length += input_ids.shape[1]
            return packing.unpack(self.model.norm(x) if last else x)  # [B, T, C], zeros at padding
        past = kv_cache.length if kv_cache is not None else 0
        position_ids, layout = self.positions_and_layout(input_ids, attention_mask, past)
        x = self.run_layers(x, position_ids, layout, start, end, kv_cache=kv_cache)
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        return self.model.norm(x) if last else x

    def run_layers(self, x: torch.Tensor, position_ids: torch.Tensor, layout: Layout, start: int = 0,
                   end: int | None = None, *, kv_cache: KVCache | None = None,
                   recompute: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks [start, end) on the residual stream x [B, T, C] at `position_ids` [B, T].

        Running a slice lets a frozen trunk be computed once and shared (`dpo.engine`).
        recompute (activation checkpointing): keep only each block's input for backward and
        run the block again during backward; same gradients, less memory.
        keep [n]: the positions of one row (causal or packed) whose output is read, e.g. those the
        head scores: the last block computes only theirs, [1, n, C] (the others' keys and values
        still), and skips the rest of its work at every other position.
        """
        end = self.config.num_hidden_layers if end is None else end
        if keep is not None and start >= end:
            raise ValueError(f"keep needs a last block to run: blocks [{start}, {end}) are none")
        cos, sin = self.rotary(position_ids)  # [B, 1, T, D] each
        recompute = recompute and kv_cache is None and torch.is_grad_enabled()
        for i in range(start, end):
            only = keep if i == end - 1 else None
            if recompute:
                x = checkpoint(self.model.layers[i], x, cos, sin, layout, None, i, only, use_reentrant=False)
            else:
                x = self.model.layers[i](x, cos, sin, layout, kv_cache, i, only)
        return x

    def check_positions(self, past: int, new: int) -> None:
        if past + new > self.config.max_position_embeddings:  # positions never exceed S - 1
            raise ValueError(
                f"{past + new} positions (cached {past} + new {new}) exceed max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )

    def positions_and_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             past: int = 0) -> tuple[torch.Tensor, Layout]:
        """Position ids [B, T] and the padded layout: causal, or a boolean mask [B, 1, T, S]."""
        B, T = input_ids.shape
        S = past + T
        self.check_positions(past, T)
        device = input_ids.device
        if attention_mask is None:
            position_ids = torch.arange(past, S, device=device).expand(B, T)
            if past == 0:
                return position_ids, Layout()
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
            return position_ids, Layout()
        query_pos = torch.arange(past, S, device=device)[:, None]  # [T, 1]
        key_pos = torch.arange(S, device=device)[None, :]  # [1, S]
        causal = key_pos <= query_pos  # [T, S]
        # A padding query would see no key at all (a NaN row); let every query see itself.
        allowed = causal & (real[:, None, :] | (key_pos == query_pos))  # [B, T, S]
        return position_ids, Layout(mask=allowed[:, None])  # [B, 1, T, S]

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
