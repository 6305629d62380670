"""The command line: the same engine as the app, headless, through :mod:`dtm_core.jobs`.

    python -m dtm_core divergence --model default --compress int4:g128 --components '*.*' \
        --prompts prompts.txt --new-tokens 32 [--chat] --out out.csv

One module per command (``NAME``, ``add_parser(sub)``, ``run(args)``), listed in
:data:`COMMAND_MODULES` in the order ``--help`` shows them; the options they share are in
:mod:`.options`. Errors exit non-zero with one sentence on stderr and no traceback.
"""
from __future__ import annotations

import argparse
import sys

from dtm_core.cli import (checkpoint, divergence, evaluate, explain, intactkv, kld, kvgrid,
                          plan, sweep)
from dtm_core.errors import DTMError

COMMAND_MODULES = (divergence, evaluate, kld, sweep, kvgrid, plan, explain, checkpoint,
                   intactkv)
COMMANDS = {m.NAME: m.run for m in COMMAND_MODULES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dtm_core",
                                     description="Divergent token metrics of compressed LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")   # libraries' own bars (compressed-tensors)
    from dtm_core.plugins import load_plugins
    try:
        load_plugins()   # before the parser: registered methods appear in --help
    except DTMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        return COMMANDS[args.command](args)
    except DTMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI promises one sentence, never a traceback
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: unexpected {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
