"""Command line: the same engine as the app, headless.

    python -m dtm_core divergence --model default --compress int4:g128 --components '*.*' \
        --prompts prompts.txt --new-tokens 32 [--chat] --out out.csv

Errors exit non-zero with one sentence on stderr and no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import DTMError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default', a local transformers folder, a .gguf file or a hub id "
                        "(from the local Hugging Face cache)")
    side = p.add_argument_group("compressed side (give one)")
    side.add_argument("--compress", metavar="SPEC",
                      help="none | magnitude:S | nm:N:M | wanda:S | intB[:gG][:asym] | w8a8")
    side.add_argument("--components", default="*.*", metavar="SELECTION",
                      help="comma-separated LAYERS.KIND, e.g. '*.q,*.k,0-3.down' (default: all)")
    side.add_argument("--recipe", metavar="JSON", help="a recipe file (list of spec + components)")
    side.add_argument("--compressed-model", metavar="PATH",
                      help="a second checkpoint of the same base instead of --compress")
    p.add_argument("--calibration", metavar="FILE",
                   help="prompts for wanda's activation norms (default: the evaluated prompts)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, "
                                                    "bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code to run (off unless asked)")
    p.add_argument("--cache-dir", help="cache folder (default $XDG_CACHE_HOME/dtm-inspector)")
    p.add_argument("--batch-size", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dtm_core",
                                     description="Divergent token metrics of compressed LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    div = sub.add_parser("divergence", help="FDT/SDT/KL per prompt for one pair")
    _model_args(div)
    div.add_argument("--prompts", required=True, help=".txt, .jsonl or .csv file, or a built-in set")
    div.add_argument("--new-tokens", type=int, default=32, metavar="N")
    div.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    div.add_argument("--generate-compressed", action="store_true",
                     help="also generate the compressed model's full greedy text (slower)")
    div.add_argument("--out", help="CSV file with one row per prompt")
    div.add_argument("--json", help="write the aggregates as JSON here")
    ev = sub.add_parser("evaluate", help="a prompt set: divergence metrics and task accuracy")
    _model_args(ev)
    ev.add_argument("--prompts", required=True,
                    help="a .txt/.jsonl/.csv file or a built-in set: " + ", ".join(_builtins()))
    ev.add_argument("--new-tokens", type=int, default=32, metavar="N")
    ev.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    ev.add_argument("--out", help="CSV with one row per prompt (run configuration in a # line)")
    ev.add_argument("--json", help="JSON with configuration, summary and rows")
    return parser


def _builtins() -> list[str]:
    from .prompts import builtin_names
    return builtin_names()


def _load_pair(args, prompts: list[str]):
    from .compress import Recipe
    from .models import load_model
    from .pair import open_pair
    from .prompts import load_prompts

    kw = dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
              cache_dir=args.cache_dir)
    if args.compress is None and not args.recipe and not args.compressed_model:
        raise DTMError("Give the compressed side: --compress SPEC, --recipe FILE or "
                       "--compressed-model PATH.")
    recipe = Recipe.load(args.recipe) if args.recipe else None
    if args.compress is not None:
        from .compress import parse_spec
        parse_spec(args.compress)  # a bad spec fails before the model loads
    calibration = load_prompts(args.calibration).prompts if args.calibration else prompts
    dense = load_model(args.model, **kw)
    return open_pair(dense, compress=args.compress, components=args.components, recipe=recipe,
                     compressed_model=args.compressed_model, calibration=calibration,
                     chat=getattr(args, "chat", False), load_kwargs=kw)


def _check_common(args) -> None:
    if args.batch_size < 1:
        raise DTMError("--batch-size must be at least 1.")
    if getattr(args, "new_tokens", 1) < 1:
        raise DTMError("--new-tokens must be at least 1.")


def cmd_divergence(args) -> int:
    from .divergence import divergence
    from .prompts import load_prompts

    _check_common(args)
    pset = load_prompts(args.prompts)
    if pset.rejected:
        print("warning: " + pset.rejection_message(), file=sys.stderr)
    pair = _load_pair(args, pset.prompts)
    res = divergence(pair, pset.prompts, args.new_tokens, chat=args.chat,
                     batch_size=args.batch_size, generate_compressed=args.generate_compressed)
    if args.out:
        res.table.to_csv(args.out, index=False)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res.summary, fh, indent=2)
    _print_summary(f"pair: {pair.dense.source} vs {pair.label}   prompts: {len(pset.records)}   "
                   f"N: {args.new_tokens}", res.summary)
    return 0


def _print_summary(header: str, summary: dict) -> None:
    print(header)
    for k, v in summary.items():
        print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate
    from .prompts import load_prompts

    _check_common(args)
    pset = load_prompts(args.prompts)
    pair = _load_pair(args, pset.prompts)
    res = evaluate(pair, pset, args.new_tokens, chat=args.chat, batch_size=args.batch_size)
    if res.rejected:
        print("warning: " + pset.rejection_message() if pset.rejected == res.rejected else
              "warning: rejected " + "; ".join(f"line {n}: {r}" for n, r in res.rejected),
              file=sys.stderr)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(res.to_csv())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(res.to_json())
    _print_summary(f"pair: {pair.dense.source} vs {pair.label}   set: {pset.name} "
                   f"({len(res.table)} prompts)   N: {args.new_tokens}", res.summary)
    return 0


COMMANDS = {"divergence": cmd_divergence, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
