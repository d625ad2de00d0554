"""`python -m smollm.convert SRC DST`: HuggingFace folder <-> GGUF file, either way.

    python -m smollm.convert runs/dpo/final aligned.gguf --type q8_0   # for llama.cpp, ollama, llm
    python -m smollm.convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf/  # dequantized to fp32

The direction follows from the names: a `.gguf` DST writes GGUF (the model, its tokenizer and
its chat template, in llama.cpp's layout), a `.gguf` SRC writes a HuggingFace folder
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that `smollm` and
`transformers` load. `--type` picks the GGUF tensor type of the 2-D weights: f32 is exact,
f16/bf16 round each weight, q8_0 stores blocks of 32 int8 values with one f16 scale
(~8.5 bits a weight). Norms are always written in f32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smollm.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a checkpoint directory (or hub id) to export, or a .gguf file to convert")
    p.add_argument("dst", help="the .gguf file to write, or the directory for the HuggingFace folder")
    p.add_argument("--type", default="f32", choices=GGUF_TYPES,
                   help="GGUF tensor type of the 2-D weights when writing GGUF (default: f32, exact)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or its directory, when SRC has none beside it")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def convert(src: str, dst: str, *, type: str = "f32", tokenizer: str | None = None,
            overwrite: bool = False) -> Path:
    """Convert SRC to DST (see the module docstring); returns the path written."""
    from .checkpoint import CheckpointError, read_checkpoint, save_pretrained
    from .gguf_io import write_gguf
    from .sources import is_gguf, load_tokenizer, resolve_checkpoint_dir

    out = Path(dst).expanduser()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists already; pass --overwrite to replace it")
    if is_gguf(src) and is_gguf(dst):
        raise CheckpointError("both SRC and DST are .gguf files; one side must be a HuggingFace folder")
    folder = resolve_checkpoint_dir(src)  # a .gguf SRC is dequantized into the cache here
    model = read_checkpoint(folder)
    if tokenizer is None and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; pass --tokenizer")
    tok = load_tokenizer(tokenizer or folder)
    if is_gguf(out):
        write_gguf(model, tok, out, type=type)
    else:
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"{out} is a file; DST must be a directory or a .gguf file")
        save_pretrained(model, out, tokenizer=tok)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a bad input is one `error: ...` line on stderr and exit code 2."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .sources import HubError
    from .tokenizer import TokenizerError

    args = _parser().parse_args(argv)
    try:
        out = convert(args.src, args.dst, type=args.type, tokenizer=args.tokenizer, overwrite=args.overwrite)
    except (CheckpointError, ConfigError, TokenizerError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
