"""Text generation with a KV cache (the command line is `smollm.cli`).

The prompt runs through the model once, filling the cache; every new token then costs
one position. Temperature 0 is greedy decoding; otherwise tokens are sampled after
optional top-k and top-p (nucleus) filtering.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .compiled import CompiledDecoder
from .model import SmolLM
from .onednn import onednn_linears


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit [B, V] outside the top-k and outside the top-p probability mass."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # [B, V]
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class StreamRecorder:
    """The residual stream entering given blocks at every position a `generate` call runs.

    `generate(..., record=StreamRecorder([K, L]))` leaves in `states[K]` [B, T + N, C] the
    stream after block K-1 (what block K reads; K = L, the number of blocks, is the stream the
    final norm reads) at every position the model ran: each prompt's real tokens and every new
    token fed back. A row's last new token is never fed back, so its column stays zero, as do the
    padding and whatever a row would have been fed after it left the batch. Blocks [K, L) can run
    again from it without blocks [0, K) (`SmolLM.hidden_states(..., start=K, x=...)`): the
    health checks score a model's own answers this way (`dpo.health`), the trunk the policy shares
    with its reference not run a second time. The states are what the decoding computed, one
    position at a time; a forward over the whole sequence sums in another order, so they may
    differ from its states in the last bits.
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = sorted(set(int(k) for k in layers))
        if not self.layers or self.layers[0] < 1:
            raise ValueError(f"StreamRecorder records after a block: layers must be >= 1, got {list(layers)}")
        self.states: dict[int, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None  # the rows of the batch still being decoded (None: all)

    def start(self, model: SmolLM, B: int, S: int) -> list:
        """Allocate [B, S, C] per layer and hook the blocks; returns the hooks' handles."""
        L = model.config.num_hidden_layers
        if self.layers[-1] > L:
            raise ValueError(f"StreamRecorder: the model has {L} blocks, no stream after block {self.layers[-1] - 1}")
        weight = model.model.embed_tokens.weight
        self.states = {k: torch.zeros(B, S, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
                       for k in self.layers}
        self.rows = None
        return [model.model.layers[k - 1].register_forward_hook(self._hook(k)) for k in self.layers]

    def _hook(self, k: int):
        def keep(block, args, x):  # x [1, N, C] (a packed prompt) or [b, T', C]
            cache = args[4] if len(args) > 4 else None  # Block.forward(x, cos, sin, layout, kv_cache, i)
            states = self.states[k]
            if cache is not None and cache.packing is not None:  # a packed prompt: [B, T, C], 0 at padding
                states[:, :cache.packing.shape[1]] = cache.packing.unpack(x).to(states.dtype)
                return
            at = cache.length if cache is not None else 0
            cols = slice(at, at + x.shape[1])
            if self.rows is None:
                states[:, cols] = x.to(states.dtype)
            else:
                states[self.rows, cols] = x.to(states.dtype)
        return keep


class PromptPrefixes:
    """Blocks [0, depth) of prompt batches, kept so that the next `generate` on the same prompts skips them.

    The health checks answer the same held-out prompts at every evaluation of a run, with a
    policy whose first blocks are the reference's very tensors, frozen (`dpo.health`): the keys and
    values of those blocks over the prompts, and the stream they hand to block `depth`, come out
    the same every time. `generate(..., prefixes=PromptPrefixes(depth))` keeps them at the first
    call on a prompt batch, and a later call on the same batch (the same tokens and attention mask)
    by a model with the same tensors in those blocks (the same objects, not modified since), under
    the same autocast, copies them into its cache and runs only blocks [depth, L) over the prompt.
    The same tensors from the same inputs: the tokens are the same as without it. (A
    `StreamRecorder` of a stream below `depth` would miss the skipped blocks: with one, the prefixes
    are neither used nor kept.)

    Memory: per prompt token, depth x 2 x KV x D values and one stream of C (about 40 KB for
    SmolLM-135M at depth 25 in fp32: 150 MB for the default run's 32 prompts of 3,779 tokens).
    """

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"PromptPrefixes keeps blocks [0, depth): depth must be >= 1, got {depth}")
        self.depth = depth
        self._kept: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}
        self._pinned: dict[int, torch.Tensor] = {}  # the tensors whose ids are in a key, kept alive: no id reused
        self.hits = 0

    def key(self, model: SmolLM, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """What the kept blocks' output depends on: the prompts, the tensors of blocks [0, depth) (by
        identity and in-place version) and the autocast dtype."""
        if self.depth > model.config.num_hidden_layers:
            raise ValueError(f"PromptPrefixes: depth {self.depth} is more than the model's "
                             f"{model.config.num_hidden_layers} blocks")
        device = input_ids.device.type
        tensors = [*model.model.embed_tokens.parameters(), *model.model.layers[:self.depth].parameters()]
        self._pinned.update((id(t), t) for t in tensors)
        return (input_ids.cpu().numpy().tobytes(), attention_mask.bool().cpu().numpy().tobytes(),
                tuple(input_ids.shape), tuple((id(t), t._version) for t in tensors),
                str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None)

    def get(self, key: tuple):
        kept = self._kept.get(key)
        self.hits += kept is not None
        return kept

    def keep(self, key: tuple, keys: list[torch.Tensor], values: list[torch.Tensor], stream: torch.Tensor) -> None:
        """keys, values: per block [0, depth) [N, KV, D] at the prompts' real positions (row-major);
        stream: [N, C], the stream entering block depth there."""
        self._kept[key] = (keys, values, stream)


def generate(model: SmolLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             record: StreamRecorder | None = None, prefixes: PromptPrefixes | None = None,
             decoder: CompiledDecoder | None = None) -> torch.Tensor:
    """Continue `input_ids` [B, T] by up to `max_new_tokens`; returns prompt + new tokens [B, T + N].

    attention_mask [B, T] allows left-padded batches of prompts. `eos_token_id` is one id or
    several (as transformers' `generation_config.eos_token_id`: an Instruct model ends its turn
    on `<|im_end|>`, a base model on `<|endoftext|>`). A row that has produced any of them is
    finished: it keeps receiving the first of them (as padding) until every row is done, and
    generation stops early when all are. `on_token(tokens [B])` is called after each step
    (for streaming). `record` keeps the residual stream entering some blocks (`StreamRecorder`);
    `prefixes` keeps the prompts' first blocks for the next call on them (`PromptPrefixes`).
    `decoder`, a `smollm.compiled.CompiledDecoder` of this model, runs every step after the prompt
    compiled (on a CPU, in fp32; the same tokens, faster once compiled); finished rows then stay in
    the batch (a new batch size would compile again), and `record` cannot be used with it.

    What makes it fast (docs/benchmarks.md, section 9): inference mode; a padded prompt batch
    computed as its real tokens only, the leading tokens its rows share (a chat template's system
    prompt) once; the prompt's LM head at its last position only; buffers
    for the tokens and the attention mask allocated once; greedy rows dropped from the batch
    once they have finished; and on a CPU, oneDNN's matmul for the Linear layers
    (`smollm.onednn`).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, T = input_ids.shape
    if decoder is not None:
        decoder.check(model)
        if record is not None:
            raise ValueError("record (a StreamRecorder) hooks the eager blocks, which a CompiledDecoder does not run")
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    device = input_ids.device
    stop_ids = torch.tensor(list(eos_token_id or []), dtype=torch.long, device=device)  # [S]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    limit = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, limit - T)
    prefix_key = prefixes.key(model, input_ids, attention_mask) if prefixes is not None else None
    hooks = record.start(model, B, T + max(max_new_tokens, 0)) if record is not None else []
    if max_new_tokens <= 0:
        for h in hooks:
            h.remove()
        return input_ids
    # Every token and mask column this call will need, allocated once: step t writes column
    # T + t, and the model reads the mask's first S columns (no concatenation per step).
    out = torch.empty(B, T + max_new_tokens, dtype=input_ids.dtype, device=device)  # [B, T + N]
    out[:, :T] = input_ids
    mask = torch.ones(B, T + max_new_tokens, dtype=attention_mask.dtype, device=device)  # [B, T + N]
    mask[:, :T] = attention_mask
    was_training = model.training
    model.eval()
    try:
        # (the compiled steps read the model's own Linear layers: none is swapped while they run)
        with torch.inference_mode(), onednn_linears(model, batch_size=B, enabled=decoder is None):
            steps = _decode(model, out, mask, T, max_new_tokens, temperature, top_k, top_p, stop_ids,
                            generator, on_token, record, prefixes, prefix_key, decoder)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out[:, :T + steps]


def _decode(model: SmolLM, out: torch.Tensor, mask: torch.Tensor, T: int, max_new_tokens: int,
            temperature: float, top_k: int | None, top_p: float | None, stop_ids: torch.Tensor,
            generator: torch.Generator | None, on_token: Callable[[torch.Tensor], None] | None,
            record: StreamRecorder | None = None, prefixes: PromptPrefixes | None = None,
            prefix_key: tuple | None = None, decoder: CompiledDecoder | None = None) -> int:
    """The decoding loop of `generate`: fills out[:, T:], returns how many tokens it made.

    Greedy decoding with stop ids drops the rows that have finished from the batch (`KVCache.keep`)
    once they are a quarter of it: a batch of answers of mixed lengths then costs about as many
    rows as are still being written, not B rows until the longest ends. A dropped row's columns
    hold the first stop id, as they would have. (Sampling keeps every row: the generator's draws
    depend on the batch's shape, and a seeded run must give the same tokens as before. A compiled
    `decoder` keeps every row too: a new batch size would compile the step again.)
    """
    B = out.shape[0]
    cache = model.new_kv_cache(B, T + max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=out.device)  # [b] of the rows in the batch
    compact = temperature == 0.0 and len(stop_ids) > 0 and B > 1 and decoder is None
    if decoder is not None:
        visible = mask.bool()  # [B, T + N]: the prompts' real tokens and every new column
        first = mask[:, :T].sum(1)  # [B] the position of each row's first new token
    if compact:
        out[:, T:] = stop_ids[0]  # what a finished row receives from then on
    rows = None  # [b] the rows of `out` still in the batch; None: all of them
    tokens = out[:, :T]  # the prompt first; then only the new token goes through the model
    for step in range(max_new_tokens):
        S = T + step
        if step == 0 and prefixes is not None and (record is None or record.layers[0] >= prefixes.depth):
            logits = _prefill(model, tokens, mask[:, :T], cache, prefixes, prefix_key, record)  # [B, V]
        elif decoder is not None and step > 0:  # the new token of each row, at its position, compiled
            logits = decoder(tokens[:, 0], first + (step - 1), cache, visible)  # [B, V]
        else:
            logits = model(tokens, mask[:, :S], kv_cache=cache, last_only=True)[:, -1, :].float()  # [b, V]
        if temperature == 0.0:
            next_token = logits.argmax(-1)  # [b]
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [b]
        if len(stop_ids):
            next_token = next_token.masked_fill(finished, int(stop_ids[0]))
            finished |= torch.isin(next_token, stop_ids)
        if rows is None:
            out[:, S] = next_token
        else:
            out[rows, S] = next_token
        if on_token is not None:
            on_token(out[:, S])
        done = int(finished.sum())  # rows in the batch that have finished (0 without stop ids)
        if len(stop_ids) and done == len(finished):
            return step + 1
        tokens = next_token[:, None]  # [b, 1]
        if compact and 4 * done >= len(finished):
            keep = (~finished).nonzero().squeeze(1)  # [b'] positions in the batch of the rows still going
            cache.keep(keep)
            rows = keep if rows is None else rows[keep]
            if record is not None:
                record.rows = rows
            tokens, mask, finished = tokens[keep], mask[keep], finished[keep]
    return max_new_tokens


def _prefill(model: SmolLM, prompt: torch.Tensor, mask: torch.Tensor, cache, prefixes: PromptPrefixes, key: tuple,
             record: StreamRecorder | None) -> torch.Tensor:
    """The prompt's forward [B, T] into an empty cache, blocks [0, depth) from `prefixes` when it
    has them (else computed and kept there): the last position's logits [B, V]."""
    K = prefixes.depth
    rows, cols = mask.bool().nonzero(as_tuple=True)  # [N] each: the real positions, row-major
    kept = prefixes.get(key)
    if kept is None:
        seen = {}

        def keep(block, args, x):  # x [1, N, C] packed (cache.packing) or [B, T, C]
            seen.update(x=x if cache.packing is None else cache.packing.unpack(x))  # [B, T, C]
        hook = model.model.layers[K - 1].register_forward_hook(keep)
        try:
            logits = model(prompt, mask, kv_cache=cache, last_only=True)[:, -1, :].float()
        finally:
            hook.remove()
        stream = seen["x"][rows, cols]  # [N, C]
        prefixes.keep(key, [cache.keys[i][rows, :, cols].clone() for i in range(K)],  # [N, KV, D] each
                      [cache.values[i][rows, :, cols].clone() for i in range(K)], stream.clone())  # [N, C]
        return logits
    keys, values, stream = kept
    for i in range(K):
        cache.fill(i, rows, cols, mask.shape[1], keys[i], values[i])
    x = stream.new_zeros(*mask.shape, stream.shape[-1])  # [B, T, C]
    x[rows, cols] = stream
    if record is not None and K in record.states:  # the recorder's hook on block K-1 does not run
        record.states[K][rows, cols] = stream.to(record.states[K].dtype)
    hidden = model.hidden_states(prompt, mask, cache, start=K, x=x)  # [B, T, C]
    return model.lm_head(hidden[:, -1:])[:, -1, :].float()
