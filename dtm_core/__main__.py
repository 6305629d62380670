"""``python -m dtm_core``: the command line (one module per command in :mod:`dtm_core.cli`)."""
import sys

from dtm_core import cli
from dtm_core.cli import options


def main(argv=None) -> int:
    """The command line as a program: the process ends with the command, so a pair compressed in
    place for it need not be restored (``dtm_core.cli.main`` called from Python restores it)."""
    before, options.PROCESS_ENDS = options.PROCESS_ENDS, True
    try:
        return cli.main(argv)
    finally:
        options.PROCESS_ENDS = before


if __name__ == "__main__":
    sys.exit(main())
