"""``divergence``: FDT/SDT/KL per prompt for one pair (and the same under IntactKV)."""
from __future__ import annotations

import json
import sys

from dtm_core.cli import options as opt

NAME = "divergence"


def add_parser(sub) -> None:
    div = sub.add_parser(NAME, help="FDT/SDT/KL per prompt for one pair")
    opt.model_args(div)
    div.add_argument("--prompts", required=True, help=".txt, .jsonl or .csv file, or a built-in set")
    div.add_argument("--new-tokens", type=int, default=32, metavar="N")
    div.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    div.add_argument("--generate-compressed", action="store_true",
                     help="also generate the compressed model's full greedy text (slower)")
    div.add_argument("--free-run", action="store_true",
                     help="both models generate greedily to their EOS or N and the texts are "
                          "compared after the divergence too: len_dense, len_compressed, "
                          "len_ratio, loop_dense, loop_compressed, rejoin_pos, edit_sim")
    div.add_argument("--out", help="one row per prompt: a plain CSV, or Parquet when the name "
                                   "ends in .parquet; the configuration goes to NAME.json "
                                   "beside it")
    div.add_argument("--json", help="write the aggregates as JSON here")
    opt.thinking_args(div)
    opt.intactkv_args(div)
    opt.one_model_args(div)


def run(args) -> int:
    from dtm_core.jobs import compare_variants
    from dtm_core.measure.prompts import load_prompts

    opt.check_common(args)
    pset = load_prompts(args.prompts)
    if pset.rejected:
        print("warning: " + pset.rejection_message(), file=sys.stderr)
    pair = opt.load_pair(args, pset.prompts, in_place=opt.in_place_of(args))
    ikv = opt.intactkv_of(args, pair, pset.prompts)
    from dtm_core.models.generation import encode_prompts
    thinking = opt.thinking_of(args, pair.tokenizer)
    ids = encode_prompts(pair.tokenizer, pset.prompts, chat=args.chat, thinking=thinking)
    variants = {"plain": None} if ikv is None else {"plain": None, "intactkv": ikv}
    cmp = compare_variants(pair, ids, args.new_tokens, variants, batch_size=args.batch_size,
                           generate_compressed=args.generate_compressed,
                           free_run=args.free_run)
    res = cmp.runs["plain"]
    header = (f"pair: {pair.dense.source} vs {pair.label}   prompts: {len(pset.records)}   "
              f"N: {args.new_tokens}")
    if ikv is None:
        table, summary = res.table, res.summary
        opt.print_summary(header, summary)
    else:
        intact = cmp.runs["intactkv"]
        # the IntactKV run is the primary table here; the plain run's columns are *_plain
        table = cmp.wide("intactkv", ["fdt", "sdt", "kl_mean", "compressed_text"])
        summary = {"plain": res.summary, "intactkv": intact.summary, "intactkv_setting": ikv.label}
        _print_comparison(header + f"   IntactKV: {ikv.label}", res.summary, intact.summary)
    if args.out:
        from dtm_core.measure.exports import write_table
        write_table(table, args.out, {
            "command": "divergence", "model": pair.dense.source, "pair": pair.label,
            "prompts": args.prompts, "prompt_count": len(pset.records),
            "new_tokens": args.new_tokens, "chat": args.chat, "free_run": args.free_run,
            "thinking": thinking,
            "intactkv": None if ikv is None else ikv.label,
            "in_place": pair.in_place is not None,
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
