"""`python -m smollm.generate`: the generation command line (see smollm.generation.main).

The `generate` function itself lives in smollm.generation and is exported as smollm.generate.
"""
from smollm.generation import main

if __name__ == "__main__":
    raise SystemExit(main())
