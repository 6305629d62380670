"""``python -m dtm_core``: the command line (one module per command in :mod:`dtm_core.cli`)."""
import sys

from dtm_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
