"""`python -m smollm.generate`: the generation command line, as `python -m smollm` (`smollm.cli`).

Only for running. Imported, a module of this name would replace the `smollm.generate`
function on the package, so importing it is refused; the command line is `smollm.cli.main`.
"""
if __name__ != "__main__":
    raise ImportError("smollm.generate is the generate() function; the command line is smollm.cli "
                      "(python -m smollm.generate runs it)")

from smollm.cli import main  # noqa: E402

raise SystemExit(main())
