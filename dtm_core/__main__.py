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
    kl = sub.add_parser("kld", help="llama.cpp-style KL-divergence statistics on a text")
    _model_args(kl)
    kl.add_argument("--text", required=True, help="a UTF-8 text file")
    kl.add_argument("--ctx", type=int, default=512, help="chunk size in tokens (default 512)")
    kl.add_argument("--json", help="write the statistics as JSON here")
    for name, helptext in (("sweep", "compress one LAYER.KIND at a time (sensitivity map)"),
                           ("plan", "sweep, then the largest set of components within a budget")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--model", default="default")
        sp.add_argument("--compress", required=True, metavar="SPEC")
        sp.add_argument("--prompts", required=True)
        sp.add_argument("--new-tokens", type=int, default=32, metavar="N")
        sp.add_argument("--chat", action="store_true")
        sp.add_argument("--layers", help="layer range(s), e.g. 0-3 or 0,5,10-12")
        sp.add_argument("--kinds", help="comma-separated kinds, e.g. q,k")
        sp.add_argument("--device", default="auto")
        sp.add_argument("--dtype", default="auto")
        sp.add_argument("--trust-remote-code", action="store_true")
        sp.add_argument("--cache-dir", help="where cells are stored (default "
                                            "$XDG_CACHE_HOME/dtm-inspector)")
        sp.add_argument("--batch-size", type=int, default=16)
        if name == "sweep":
            sp.add_argument("--out", help="CSV with one row per component")
        else:
            sp.add_argument("--budget", type=float, default=0.9,
                            help="keep mean FDT of the combined compression >= BUDGET x N")
            sp.add_argument("--out", help="plan JSON (a recipe the CLI and the app load)")
            sp.add_argument("--save", metavar="DIR", help="save the compressed model here "
                                                          "(save_pretrained, safetensors)")
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
    res = evaluate(pair, pset, args.new_tokens, chat=args.chat, batch_size=args.batch_size,
                   progress=stderr_progress)
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


def stderr_progress(frac: float, message: str) -> None:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""
    if sys.stderr.isatty():
        bar = "#" * int(30 * frac)
        print(f"\r[{bar:<30}] {100 * frac:5.1f}% {message[:60]:<60}", end="", file=sys.stderr,
              flush=True)
        if frac >= 1:
            print(file=sys.stderr)


def cmd_kld(args) -> int:
    from .kld import format_report, score_text
    from .prompts import read_text_file

    _check_common(args)
    text = read_text_file(args.text)
    pair = _load_pair(args, [line for line in text.splitlines() if line.strip()][:64])
    stats, _ = score_text(pair, text, args.ctx, progress=stderr_progress)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2)
    print(f"pair: {pair.dense.source} vs {pair.label}   ctx: {args.ctx}")
    print(format_report(stats))
    return 0


def _sweep_setup(args):
    import os

    from .compress import parse_spec
    from .generation import encode_prompts
    from .models import load_model
    from .prompts import load_prompts

    _check_common(args)
    parse_spec(args.compress)
    pset = load_prompts(args.prompts)
    dense = load_model(args.model, device=args.device, dtype=args.dtype,
                       trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir)
    ids = encode_prompts(dense.tokenizer, pset.prompts, chat=args.chat)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # torchrun: share the cores between the ranks
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    return dense, ids, rank, world


def cmd_sweep(args) -> int:
    from .sweep import sweep

    dense, ids, rank, world = _sweep_setup(args)
    res = sweep(dense, args.compress, ids, args.new_tokens, layers=args.layers, kinds=args.kinds,
                cache_dir=args.cache_dir, batch_size=args.batch_size, rank=rank, world=world,
                progress=stderr_progress if rank == 0 else None)
    if rank != 0:
        return 0
    if args.out:
        res.table.to_csv(args.out, index=False)
    print(f"sweep {args.compress} on {dense.source}: {len(res.table)} components "
          f"({res.computed} computed here, {res.reused} from the store {res.folder}"
          f"{f', {world} ranks' if world > 1 else ''})")
    cols = ["component", "params", "fdt_mean", "sdt_mean", "kl_mean"]
    print(res.table[cols].sort_values("fdt_mean").head(10).to_string(index=False))
    return 0


def cmd_plan(args) -> int:
    from .plan import make_plan, save_compressed
    from .sweep import prepare, sweep

    dense, ids, rank, world = _sweep_setup(args)
    ctx = prepare(dense, ids, args.new_tokens, args.batch_size)
    res = sweep(dense, args.compress, ids, args.new_tokens, layers=args.layers, kinds=args.kinds,
                cache_dir=args.cache_dir, batch_size=args.batch_size, rank=rank, world=world,
                ctx=ctx)
    if rank != 0:
        return 0
    plan = make_plan(dense, res.table, args.compress, ids, ctx.references, args.new_tokens,
                     args.budget)
    if args.out:
        plan.save(args.out)
    if args.save:
        save_compressed(dense, plan.recipe, args.save)
    print(f"plan {plan.spec}: {len(plan.components)} of {len(res.table)} components, "
          f"{plan.share_params:.1%} of all component parameters compressed; "
          f"mean FDT {plan.fdt_mean:.2f} (budget {plan.budget_fdt:.2f})")
    print(plan.curve.to_string(index=False))
    return 0


COMMANDS = {"divergence": cmd_divergence, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
            "plan": cmd_plan, "kld": cmd_kld}


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
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


if __name__ == "__main__":
    sys.exit(main())
