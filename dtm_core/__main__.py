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
    side.add_argument("--compress", metavar="SPEC", help=_spec_help())
    side.add_argument("--components", default="*.*", metavar="SELECTION",
                      help="comma-separated LAYERS.KIND, e.g. '*.q,*.k,0-3.down' (default: all)")
    side.add_argument("--recipe", metavar="JSON", help="a recipe file (list of spec + components)")
    side.add_argument("--compressed-model", metavar="PATH",
                      help="a second checkpoint of the same base instead of --compress")
    _calibration_arg(p)
    p.add_argument("--sequential", action="store_true",
                   help="a whole-model recipe gathers each layer's calibration statistics on the "
                        "outputs of the layers before it as already compressed (full-model "
                        "GPTQ); default: every component sees the dense model's inputs")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, "
                                                    "bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model's own Python code to run (off unless asked)")
    p.add_argument("--cache-dir", help="cache folder (default $XDG_CACHE_HOME/dtm-inspector)")
    p.add_argument("--batch-size", type=int, default=16)
    _gpus_arg(p)


def _gpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus-per-rank", type=int, default=0, metavar="K",
                   help="under torchrun with CUDA: place each rank's models over K of its "
                        "node's GPUs (rank r of the node gets GPUs rK .. rK+K-1), e.g. 2 ranks "
                        "x 4 GPUs on an 8-GPU node")


def _spec_help() -> str:
    from .methods import METHODS
    return "; ".join(f"{' | '.join(c.forms)}: {c.summary}" for c in METHODS.values())


def _calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="FILE",
                   help="prompts (a prompt file, a plain text or a built-in set) for the "
                        "statistics a method needs (wanda, gptq, sparsegpt, awq) and for "
                        "calibrated IntactKV; default: the evaluated prompts")
    p.add_argument("--calib-ctx", type=int, metavar="T",
                   help="cut the calibration text into chunks of T tokens (default: one "
                        "sequence per prompt)")
    p.add_argument("--calib-samples", type=int, metavar="M",
                   help="use the first M calibration sequences (prompts or chunks); default all")


def _calibration(args):
    from .jobs import CalibrationSetting
    return CalibrationSetting.of(getattr(args, "calibration", None),
                                 getattr(args, "calib_ctx", None),
                                 getattr(args, "calib_samples", None))


def _intactkv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("IntactKV (the compressed model uses the dense KV of pivot tokens)")
    g.add_argument("--intactkv", metavar="K|prefix",
                   help="keep the dense model's KV cache for the first K input tokens, or for "
                        "the chat template's system prefix ('prefix', needs --chat); "
                        "default off. Runs are compared with the plain compressed model.")
    g.add_argument("--intactkv-calibrated", action="store_true",
                   help="use calibrated pivot KV (trained on the prompts, or on --calibration; "
                        "cached, so a second run reuses it)")
    g.add_argument("--calib-steps", type=int, default=50, metavar="S",
                   help="calibration steps (default 50)")
    g.add_argument("--calib-lr", type=float, default=1e-2, help="calibration learning rate")


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
    div.add_argument("--out", help="one row per prompt: a plain CSV, or Parquet when the name "
                                   "ends in .parquet; the configuration goes to NAME.json "
                                   "beside it")
    div.add_argument("--json", help="write the aggregates as JSON here")
    _intactkv_args(div)
    ev = sub.add_parser("evaluate", help="a prompt set: divergence metrics and task accuracy")
    _model_args(ev)
    ev.add_argument("--prompts", required=True,
                    help="a .txt/.jsonl/.csv file or a built-in set: " + ", ".join(_builtins()))
    ev.add_argument("--new-tokens", type=int, default=32, metavar="N")
    ev.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    ev.add_argument("--out", help="one row per prompt: a plain CSV, or Parquet when the name ends "
                                  "in .parquet; the configuration goes to NAME.json beside it")
    ev.add_argument("--json", help="JSON with configuration, summary, rows and the worst prompts")
    ev.add_argument("--worst", type=int, default=5, metavar="K",
                    help="print the K prompts with the lowest FDT and the K with the highest KL, "
                         "with the text around each first divergent token (default 5; 0: none)")
    _intactkv_args(ev)
    kl = sub.add_parser("kld", help="llama.cpp-style KL-divergence statistics on a text")
    _model_args(kl)
    kl.add_argument("--text", required=True, help="a UTF-8 text file")
    kl.add_argument("--ctx", type=int, default=512, help="chunk size in tokens (default 512)")
    kl.add_argument("--json", help="write the statistics as JSON here")
    kl.add_argument("--out", help="the statistics as a CSV (statistic,value), or Parquet when the "
                                  "name ends in .parquet; the configuration in NAME.json beside")
    for name, helptext in (("sweep", "compress one LAYER.KIND at a time (sensitivity map)"),
                           ("plan", "sweep, then the largest set of components within a budget")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--model", default="default")
        sp.add_argument("--compress", required=name == "sweep", metavar="SPEC",
                        help=_spec_help())
        sp.add_argument("--prompts", required=True)
        _calibration_arg(sp)
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
        _gpus_arg(sp)
        sp.add_argument("--lost-after", type=float, default=30.0, metavar="S",
                        help="under torchrun: a rank silent this many seconds is taken as lost "
                             "and its unfinished cells go to the others (default 30)")
        if name == "sweep":
            sp.add_argument("--out", help="one row per component: a plain CSV, or Parquet when "
                                          "the name ends in .parquet (configuration in "
                                          "NAME.json beside it)")
            sp.add_argument("--intactkv", metavar="K|prefix",
                            help="run every cell with the dense model's KV for the first K "
                                 "tokens or the chat prefix (stored apart from plain sweeps)")
            sp.add_argument("--whole", action="store_true",
                            help="also measure every selected component compressed at once "
                                 "and set the sum over cells against it (with from:PATH: the "
                                 "whole checkpoint); holds a second copy of their weights")
        else:
            sp.add_argument("--budget", type=float, default=0.9,
                            help="with --compress: keep mean FDT of the combined compression "
                                 ">= BUDGET x N")
            g = sp.add_argument_group(
                "mixed plans: one spec per component under a budget, proven on held-out prompts")
            g.add_argument("--specs", metavar="SPEC,SPEC,...",
                           help="candidate specs, e.g. int8,int4:g64,int3:g64 or "
                                "magnitude:0.3,magnitude:0.5 (any registered methods mixed)")
            g.add_argument("--budget-bits", type=float, metavar="B",
                           help="average bits per weight over the compressible components "
                                "(untouched weights count the working dtype's bits; scales and "
                                "zero points count per group)")
            g.add_argument("--budget-sparsity", type=float, metavar="S",
                           help="share of the components' weights set to zero, at least")
            g.add_argument("--budget-bytes", type=float, metavar="N",
                           help="size of the whole model in bytes, at most")
            g.add_argument("--target-fdt", type=float, metavar="T",
                           help="mean FDT >= T x N on the fit prompts: alone, the smallest plan "
                                "that reaches it; with a budget, a plan below it is repaired")
            g.add_argument("--holdout", type=float, default=0.3, metavar="SHARE",
                           help="share of the prompts held out for the comparison table "
                                "(default 0.3; 0: none)")
            g.add_argument("--seed", type=int, default=0, help="seed of the split and the "
                                                                 "random baseline (default 0)")
            g.add_argument("--planner", choices=["auto", "fdt", "dtm"], default="auto",
                           help="fdt: exact knapsack on FDT lost; dtm: the DTM paper's "
                                "FDT-threshold procedure; auto (default): both and the "
                                "KL-ranked knapsack, each verified on the fit prompts, the best "
                                "kept")
            g.add_argument("--max-evals", type=int, default=8, metavar="K",
                           help="real evaluations of whole plans allowed for verification "
                                "and repair (default 8)")
            g.add_argument("--export", nargs=2, action="append", metavar=("KIND", "DIR"),
                           help="write the plan for llama.cpp, llmcompressor, torchao or "
                                "recipe into DIR (repeatable)")
            sp.add_argument("--out", help="plan JSON (a recipe the CLI and the app load)")
            sp.add_argument("--save", metavar="DIR", help="save the compressed model here "
                                                          "(save_pretrained, safetensors)")
    ex = sub.add_parser("explain", help="why a token diverged: logit lens and component "
                                        "patching at the first divergent token (or --position)")
    _model_args(ex)
    ex.add_argument("--prompt", required=True, help="the prompt text")
    ex.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ex.add_argument("--new-tokens", type=int, default=32, metavar="N")
    ex.add_argument("--position", type=int, metavar="T",
                    help="the position of the dense continuation to explain (0-based; default: "
                         "the first divergent token)")
    ex.add_argument("--scope", choices=["all", "position"], default="all",
                    help="patch every position up to T (default) or T only (the direct effect)")
    ex.add_argument("--granularity", choices=["component", "layer", "model"],
                    default="component", help="patch one component, a whole layer's "
                                              "components, or all at once")
    ex.add_argument("--patch", default="*", metavar="SELECTION",
                    help="the components to patch (default: every one, and the recipe's own "
                         "slices or experts)")
    ex.add_argument("--no-reverse", action="store_true",
                    help="skip the reverse (the dense model with one compressed component)")
    ex.add_argument("--out", help="one row per component: component, layer, kind, "
                                  "restored_logp, restores_argmax, kl_after_patch, ... (CSV, or "
                                  "Parquet for .parquet; configuration in NAME.json)")
    ex.add_argument("--json", help="the position's tokens, the lens per layer, the patching map "
                                   "and the ranking as JSON")
    ck = sub.add_parser("checkpoint", help="what a compressed checkpoint is: format, scheme per "
                                           "group of layers, what is kept, size on disk")
    ck.add_argument("path", help="a checkpoint folder (llm-compressor, GPTQ, AWQ, bitsandbytes, "
                                 "torchao) or a .gguf file")
    ck.add_argument("--base", metavar="MODEL",
                    help="the base model: compare sizes, and check (by loading both) that the "
                         "checkpoint is a compression of it")
    ck.add_argument("--json", help="write the description as JSON here")
    ck.add_argument("--device", default="cpu")
    cal = sub.add_parser("intactkv-calibrate",
                         help="train the pivot KV (IntactKV+Cal) and compare FDT with plain "
                              "and uncalibrated IntactKV")
    _model_args(cal)
    cal.add_argument("--prompts", required=True,
                     help="calibration prompts (a file or a built-in set)")
    cal.add_argument("--eval-prompts", help="prompts to measure FDT on (default: --prompts)")
    cal.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    cal.add_argument("--intactkv", metavar="K|prefix",
                     help="pivot tokens (default: 'prefix' with --chat, else 1)")
    cal.add_argument("--steps", type=int, default=50)
    cal.add_argument("--lr", type=float, default=1e-2)
    cal.add_argument("--new-tokens", type=int, default=32, metavar="N")
    cal.add_argument("--out", help="also write the calibrated KV here (.safetensors)")
    cal.add_argument("--json", help="write the comparison as JSON here")
    return parser


def _builtins() -> list[str]:
    from .prompts import builtin_names
    return builtin_names()


def _pair_request(args):
    """The pair the arguments describe, checked before any model loads."""
    from .compress import Recipe
    from .jobs import PairRequest

    if args.compress is None and not args.recipe and not args.compressed_model:
        raise DTMError("Give the compressed side: --compress SPEC, --recipe FILE or "
                       "--compressed-model PATH.")
    req = PairRequest(model=args.model, compress=args.compress, components=args.components,
                      recipe=Recipe.load(args.recipe) if args.recipe else None,
                      compressed_model=args.compressed_model,
                      calibration=_calibration(args),
                      chat=getattr(args, "chat", False),
                      sequential=getattr(args, "sequential", False))
    req.validate()
    return req


def _cache(args):
    from .distributed import rank_gpus
    from .jobs import PairCache

    gpus = rank_gpus(getattr(args, "gpus_per_rank", 0))
    return PairCache(max_pairs=1, device=args.device, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
                     **({"gpus": gpus} if gpus else {}))


def _load_pair(args, prompts: list[str]):
    """The pair of a command; ``prompts`` are the evaluated prompts (the default calibration)."""
    from .jobs import calibration_note

    pair = _cache(args).open(_pair_request(args), prompts)
    if pair.calibration is not None:
        print(calibration_note(pair), file=sys.stderr)
    if "checkpoint" in pair.config:
        from .checkpoints import CheckpointInfo
        print(CheckpointInfo(**pair.config["checkpoint"]).text(), file=sys.stderr)
    return pair


def _check_common(args) -> None:
    if args.batch_size < 1:
        raise DTMError("--batch-size must be at least 1.")
    if getattr(args, "new_tokens", 1) < 1:
        raise DTMError("--new-tokens must be at least 1.")


def cmd_divergence(args) -> int:
    from .jobs import compare_variants
    from .prompts import load_prompts

    _check_common(args)
    pset = load_prompts(args.prompts)
    if pset.rejected:
        print("warning: " + pset.rejection_message(), file=sys.stderr)
    pair = _load_pair(args, pset.prompts)
    ikv = _intactkv(args, pair, pset.prompts)
    from .generation import encode_prompts
    ids = encode_prompts(pair.tokenizer, pset.prompts, chat=args.chat)
    variants = {"plain": None} if ikv is None else {"plain": None, "intactkv": ikv}
    cmp = compare_variants(pair, ids, args.new_tokens, variants, batch_size=args.batch_size,
                           generate_compressed=args.generate_compressed)
    res = cmp.runs["plain"]
    header = (f"pair: {pair.dense.source} vs {pair.label}   prompts: {len(pset.records)}   "
              f"N: {args.new_tokens}")
    if ikv is None:
        table, summary = res.table, res.summary
        _print_summary(header, summary)
    else:
        intact = cmp.runs["intactkv"]
        # the IntactKV run is the primary table here; the plain run's columns are *_plain
        table = cmp.wide("intactkv", ["fdt", "sdt", "kl_mean", "compressed_text"])
        summary = {"plain": res.summary, "intactkv": intact.summary, "intactkv_setting": ikv.label}
        _print_comparison(header + f"   IntactKV: {ikv.label}", res.summary, intact.summary)
    if args.out:
        from .exports import write_table
        write_table(table, args.out, {
            "command": "divergence", "model": pair.dense.source, "pair": pair.label,
            "prompts": args.prompts, "prompt_count": len(pset.records),
            "new_tokens": args.new_tokens, "chat": args.chat,
            "intactkv": None if ikv is None else ikv.label,
            "calibration": None if pair.calibration is None else pair.calibration.label})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return 0


def _print_comparison(header: str, plain: dict, intact: dict) -> None:
    print(header)
    print(f"{'':>24}  {'plain':>10}  {'IntactKV':>10}  {'delta':>10}")
    for k, v in plain.items():
        if isinstance(v, float) and isinstance(intact.get(k), float):
            print(f"{k:>24}: {v:10.4g}  {intact[k]:10.4g}  {intact[k] - v:+10.4g}")


def _intactkv(args, pair, prompts: list[str]):
    """The IntactKV setting of a command (None when off), calibrated when asked."""
    from .jobs import IntactKVSetting, resolve_intactkv

    setting = IntactKVSetting(pivots=getattr(args, "intactkv", None),
                              calibrated=getattr(args, "intactkv_calibrated", False),
                              steps=getattr(args, "calib_steps", 50),
                              lr=getattr(args, "calib_lr", 1e-2))
    if setting.calibrated and setting.parse() is None:
        raise DTMError("--intactkv-calibrated needs --intactkv K or --intactkv prefix.")
    ikv = resolve_intactkv(setting, pair, prompts, chat=getattr(args, "chat", False),
                           calibration=_calibration(args),
                           cache_dir=args.cache_dir, progress=stderr_progress)
    if ikv is not None and ikv.calibrated is not None:
        cal = ikv.calibrated
        print(f"calibrated pivot KV: loss {cal.loss_before:.4g} -> {cal.loss_after:.4g}",
              file=sys.stderr)
    return ikv


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
    ikv = _intactkv(args, pair, pset.prompts)
    store, rank = _join(pair)
    res = evaluate(pair, pset, args.new_tokens, chat=args.chat, batch_size=args.batch_size,
                   progress=stderr_progress, intactkv=ikv, store=store)
    if rank != 0:       # torchrun: rank 0 reports the merged result
        return 0
    if res.rejected:
        print("warning: " + pset.rejection_message() if pset.rejected == res.rejected else
              "warning: rejected " + "; ".join(f"line {n}: {r}" for n, r in res.rejected),
              file=sys.stderr)
    if args.out:
        res.write(args.out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(res.to_json())
    _print_summary(f"pair: {pair.dense.source} vs {pair.label}   set: {pset.name} "
                   f"({len(res.table)} prompts)   N: {args.new_tokens}", res.summary)
    if args.worst > 0:
        _print_worst(res, args.worst)
    if res.comparison is not None:
        print(f"\nplain vs IntactKV ({ikv.label}):")
        print(res.comparison.drop(columns="key").to_string(index=False))
    return 0


def _print_worst(res, k: int) -> None:
    for by, title in (("fdt", "lowest FDT"), ("kl", "highest mean KL")):
        print(f"\nworst prompts by {title}:")
        for _, w in res.worst(k, by).iterrows():
            head = " ".join(str(w.prompt).split())
            head = head if len(head) <= 60 else head[:57] + "..."
            print(f"  #{w.prompt_index} (line {w.line}) FDT {w.fdt}, KL {w.kl_mean:.3g}: {head!r}")
            if w.dense_token or w.compressed_token:
                print(f"      ...{w.before!r} then dense {w.dense_token!r} / compressed "
                      f"{w.compressed_token!r}, dense goes on {w.dense_after!r}")


def stderr_progress(frac: float, message: str) -> None:
    """The engine's progress line on stderr, rewritten in place (only when stderr is a terminal;
    sweeps and prompt sets say done/total, time left and rate: :mod:`dtm_core.progress`)."""
    if sys.stderr.isatty():
        print(f"\r{message[:110]:<110}", end="", file=sys.stderr, flush=True)
        if frac >= 1:
            print(file=sys.stderr)


def cmd_kld(args) -> int:
    from .kld import format_report, score_text
    from .prompts import read_text_file

    _check_common(args)
    text = read_text_file(args.text)
    pair = _load_pair(args, [line for line in text.splitlines() if line.strip()][:64])
    store, rank = _join(pair)
    stats, _ = score_text(pair, text, args.ctx, progress=stderr_progress, store=store)
    if rank != 0:       # torchrun: rank 0 reports the merged result
        return 0
    if args.out:
        from .exports import write_table
        from .kld import statistics_table
        write_table(statistics_table(stats), args.out,
                    {"command": "kld", "model": pair.dense.source, "pair": pair.label,
                     "text": args.text, "ctx": args.ctx})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2)
    print(f"pair: {pair.dense.source} vs {pair.label}   ctx: {args.ctx}")
    print(format_report(stats))
    return 0


def _join(pair) -> tuple:
    """Under torchrun: (the process group's c10d store, this rank); alone: (None, 0)."""
    import os

    from .distributed import init, world

    rank, size = world()
    if size <= 1:
        return None, 0
    import torch
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // size))
    return init(str(next(pair.dense.model.parameters()).device.type)), rank


def _sweep_setup(args):
    import os

    from .compress import parse_spec
    from .generation import encode_prompts
    from .prompts import load_prompts

    _check_common(args)
    parse_spec(args.compress)
    pset = load_prompts(args.prompts)
    dense = _cache(args).dense(args.model)
    ids = encode_prompts(dense.tokenizer, pset.prompts, chat=args.chat)
    from .distributed import init, world as world_of

    rank, world = world_of()
    args.store = None
    if world > 1:  # torchrun: share the cores between the ranks, join the process group
        import torch
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        args.store = init(str(next(dense.model.parameters()).device.type))
    return dense, ids, rank, world


def _sweep_kw(args, rank, world) -> dict:
    return dict(layers=args.layers, kinds=args.kinds, cache_dir=args.cache_dir,
                batch_size=args.batch_size, rank=rank, world=world, chat=args.chat,
                calibration=_calibration(args), store=getattr(args, "store", None),
                lost_after_s=getattr(args, "lost_after", 30.0))


def cmd_sweep(args) -> int:
    from .intactkv import IntactKV
    from .jobs import sweep_variants

    dense, ids, rank, world = _sweep_setup(args)
    ikv = IntactKV.parse(args.intactkv)
    both = sweep_variants(dense, args.compress, ids, args.new_tokens, **_sweep_kw(args, rank, world),
                          progress=stderr_progress if rank == 0 else None, intactkv=ikv,
                          whole=args.whole)
    res = both.main
    if rank != 0:
        return 0
    if args.out:
        from .exports import write_table
        write_table(res.table, args.out, {
            "command": "sweep", "model": dense.source, "spec": args.compress,
            "prompts": args.prompts, "prompt_count": len(ids), "new_tokens": args.new_tokens,
            "chat": args.chat, "intactkv": None if ikv is None else ikv.label,
            "cell_store": str(res.folder), "whole": res.additivity()})
    print(f"sweep {args.compress}{f' IntactKV {ikv.label}' if ikv else ''} on {dense.source}: "
          f"{len(res.table)} components "
          f"({res.computed} computed here, {res.reused} from the store {res.folder}"
          f"{f', {world} ranks' if world > 1 else ''})")
    cols = ["component", "params", "fdt_mean", "sdt_mean", "kl_mean", "weight_error"]
    print(res.table[cols].sort_values(["fdt_mean", "kl_mean"], ascending=[True, False])
          .head(10).to_string(index=False))
    if res.additivity_line():
        print(res.additivity_line())
    return 0


def _budget_of(args):
    from .allocation import Budget

    given = [(k, v) for k, v in (("bits", args.budget_bits), ("sparsity", args.budget_sparsity),
                                 ("bytes", args.budget_bytes)) if v is not None]
    if len(given) > 1:
        raise DTMError("Give one budget: --budget-bits, --budget-sparsity or --budget-bytes.")
    return Budget(*given[0]) if given else None


def cmd_budget_plan(args) -> int:
    from .jobs import plan_under_budget
    from .plan import save_compressed
    from .plan_exports import export_plan
    from .prompts import load_prompts

    _check_common(args)
    budget = _budget_of(args)
    if budget is None and args.target_fdt is None:
        raise DTMError("Give a budget (--budget-bits, --budget-sparsity or --budget-bytes) or "
                       "a target (--target-fdt).")
    pset = load_prompts(args.prompts)
    dense = _cache(args).dense(args.model)
    from .distributed import init, world as world_of

    rank, world = world_of()
    store = init(str(next(dense.model.parameters()).device.type)) if world > 1 else None
    plan = plan_under_budget(dense, args.specs, pset, args.new_tokens, budget=budget,
                             target_fdt=args.target_fdt, holdout=args.holdout, seed=args.seed,
                             planner=args.planner, chat=args.chat, cache_dir=args.cache_dir,
                             max_evals=args.max_evals, calibration=_calibration(args),
                             batch_size=args.batch_size, layers=args.layers, kinds=args.kinds,
                             rank=rank, world=world, store=store,
                             progress=stderr_progress if rank == 0 else None)
    if plan is None:
        return 0
    if args.out:
        plan.save(args.out)
    for kind, folder in args.export or []:
        files = export_plan(plan, kind, folder, dense.model,
                            bf16=str(dense.dtype).endswith("bfloat16"))
        print(f"{kind}: " + ", ".join(str(f) for f in files))
    if args.save:
        save_compressed(dense, plan.recipe, args.save, calibration=None
                        if not plan.recipe.needs_calibration else _plan_calibration(dense, plan,
                                                                                   pset, args))
    print(plan.summary_line())
    for e in plan.evaluations:
        print(f"  evaluation {e['step']} ({e['why']}): {e['avg_bits']:.3f} bits, "
              f"{e['sparsity']:.1%} sparsity: mean FDT {e['fdt_mean']:.2f}")
    if plan.holdout is not None:
        print(f"held out ({len(plan.holdout_prompts)} prompts; fdt_vs_plan = row - plan, "
              "paired 95 % interval):")
        print(plan.holdout.dropna(axis=1, how="all").to_string(index=False,
                                                             float_format=lambda x: f"{x:.3f}"))
    return 0


def _plan_calibration(dense, plan, pset, args):
    """The calibration the plan was verified with: the given one, else its fit prompts."""
    from .calibration import calibration_from
    from .generation import encode_prompts
    from .jobs import resolve_calibration

    setting = _calibration(args)
    if setting.source is not None:
        return resolve_calibration(dense, setting, pset.prompts, args.chat)
    ids = encode_prompts(dense.tokenizer, pset.prompts, chat=args.chat)
    return calibration_from(dense, [ids[i] for i in plan.fit_prompts])


def cmd_plan(args) -> int:
    from .jobs import plan_from_sweep, sweep_variants
    from .plan import save_compressed
    from .sweep import prepare

    if args.specs:
        if args.compress:
            raise DTMError("Give --compress SPEC (one spec, --budget) or --specs SPEC,SPEC,... "
                           "(a budget), not both.")
        return cmd_budget_plan(args)
    if not args.compress:
        raise DTMError("plan needs --compress SPEC (with --budget) or --specs SPEC,SPEC,... "
                       "(with --budget-bits, --budget-sparsity, --budget-bytes or "
                       "--target-fdt).")
    if any(v is not None for v in (args.budget_bits, args.budget_sparsity, args.budget_bytes,
                                   args.target_fdt)) or args.export:
        raise DTMError("--budget-bits/--budget-sparsity/--budget-bytes/--target-fdt/--export "
                       "go with --specs.")
    dense, ids, rank, world = _sweep_setup(args)
    ctx = prepare(dense, ids, args.new_tokens, args.batch_size)
    res = sweep_variants(dense, args.compress, ids, args.new_tokens, **_sweep_kw(args, rank, world),
                         ctx=ctx).main
    if rank != 0:
        return 0
    calibration = _calibration(args)
    plan = plan_from_sweep(dense, res.table, args.compress, ids, args.new_tokens, args.budget,
                           references=ctx.references, calibration=calibration, chat=args.chat)
    if args.out:
        plan.save(args.out)
    if args.save:
        from .jobs import resolve_calibration
        calib = (resolve_calibration(dense, calibration, ids, args.chat)
                 if plan.recipe.needs_calibration else None)
        save_compressed(dense, plan.recipe, args.save, calibration=calib)
    print(f"plan {plan.spec}: {len(plan.components)} of {len(res.table)} components, "
          f"{plan.share_params:.1%} of all component parameters compressed; "
          f"mean FDT {plan.fdt_mean:.2f} (budget {plan.budget_fdt:.2f})")
    print(plan.curve.to_string(index=False))
    return 0


def cmd_intactkv_calibrate(args) -> int:
    from .generation import encode_prompts
    from .intactkv import IntactKV, calibrate
    from .jobs import compare_variants
    from .prompts import load_prompts

    _check_common(args)
    if not 1 <= args.steps <= 10000:
        raise DTMError("--steps must be between 1 and 10000.")
    ikv = IntactKV.parse(args.intactkv or ("prefix" if args.chat else "1"))
    if ikv is None:
        raise DTMError("IntactKV calibration needs pivot tokens: --intactkv K or prefix.")
    cal_set = load_prompts(args.prompts)
    eval_set = load_prompts(args.eval_prompts) if args.eval_prompts else cal_set
    pair = _load_pair(args, cal_set.prompts)
    cal_ids = encode_prompts(pair.tokenizer, cal_set.prompts, chat=args.chat)
    eval_ids = encode_prompts(pair.tokenizer, eval_set.prompts, chat=args.chat)
    cal = calibrate(pair, cal_ids, ikv, steps=args.steps, lr=args.lr, cache_dir=args.cache_dir,
                    progress=stderr_progress)
    if args.out:
        from pathlib import Path
        cal.save(Path(args.out))
    table = compare_variants(pair, eval_ids, args.new_tokens,
                             {"plain": None, f"IntactKV {ikv.label}": ikv,
                              f"IntactKV {ikv.label}+cal": ikv.with_calibration(cal)},
                             batch_size=args.batch_size).summary_table()
    print(f"pair: {pair.dense.source} vs {pair.label}   pivot tokens: {len(cal.ids)} "
          f"{pair.tokenizer.decode(list(cal.ids))!r}")
    print(f"calibration loss (mean over layers of output MSE): {cal.loss_before:.4g} -> "
          f"{cal.loss_after:.4g} in {cal.steps} steps on {len(cal_ids)} prompts")
    print(table.to_string(index=False))
    gain = table.fdt_mean.iloc[2] - table.fdt_mean.iloc[1]
    print(f"FDT gain of calibration over plain IntactKV: {gain:+.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"loss_before": cal.loss_before, "loss_after": cal.loss_after,
                       "steps": cal.steps, "pivot_ids": list(cal.ids),
                       "variants": json.loads(table.to_json(orient="records"))}, fh, indent=2)
    return 0


def cmd_explain(args) -> int:
    from .explain import explain
    from .generation import encode_prompts

    _check_common(args)
    pair = _load_pair(args, [args.prompt])
    ids = encode_prompts(pair.tokenizer, [args.prompt], chat=args.chat)[0]
    e = explain(pair, ids, args.new_tokens, position=args.position, scope=args.scope,
                granularity=args.granularity, components=args.patch,
                reverse=not args.no_reverse, progress=stderr_progress)
    config = {"command": "explain", "model": pair.dense.source, "pair": pair.label,
              "prompt": args.prompt, "chat": args.chat, "new_tokens": args.new_tokens,
              "position": e.position, "scope": args.scope, "granularity": args.granularity}
    ranked = e.ranked().drop(columns=["order"])
    if args.out:
        from .exports import write_table
        write_table(ranked, args.out, config)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({**config, **e.to_json()}, fh, indent=2)
    print(f"pair: {pair.dense.source} vs {pair.label}   position {e.position}: dense "
          f"{e.tokens['dense']!r} (log p {e.logp_dense:.3f}) vs compressed "
          f"{e.tokens['compressed']!r} (log p of the dense token {e.logp_compressed:.3f}), "
          f"KL {e.kl:.4g}")
    print(f"text before: {e.tokens['before']!r}")
    flip = e.lens_flip_layer
    print("logit lens: " + (f"the compressed model's lens first prefers its own token at layer "
                            f"{flip}" if flip is not None else "the lenses never part"))
    print(e.ranking())
    cols = ["component", "restored_logp", "restored_share", "restores_argmax", "kl_after_patch"]
    if not args.no_reverse:
        cols += ["reverse_flips_argmax", "reverse_kl"]
    print(ranked[cols].head(10).to_string(index=False))
    return 0


def cmd_checkpoint(args) -> int:
    from .checkpoints import inspect

    info = inspect(args.path, base=args.base)
    print(info.text())
    out = info.to_json()
    if args.base:
        from .jobs import build_pair, PairRequest
        from .models import load_model

        dense = load_model(args.base, device=args.device)
        build_pair(dense, PairRequest(model=args.base, compressed_model=args.path),
                   load=lambda src: load_model(src, device=args.device))
        print(f"- a compression of {args.base}: same tokenizer, architecture and tensor shapes")
        out["base"] = args.base
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return 0


COMMANDS = {"checkpoint": cmd_checkpoint, "explain": cmd_explain, "divergence": cmd_divergence, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
            "plan": cmd_plan, "kld": cmd_kld, "intactkv-calibrate": cmd_intactkv_calibrate}


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")   # libraries' own bars (compressed-tensors)
    from .plugins import load_plugins
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


if __name__ == "__main__":
    sys.exit(main())
