"""`python -m smollm`: the generation command line (`smollm.cli`)."""
from smollm.cli import main

raise SystemExit(main())
