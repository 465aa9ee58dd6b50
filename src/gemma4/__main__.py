"""`python -m gemma4 ...` is the `gemma4` command (what `torchrun -m gemma4 ...` runs)."""

import sys

from gemma4.cli import main

if __name__ == "__main__":
    sys.exit(main())
