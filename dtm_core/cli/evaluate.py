"""``evaluate``: a prompt set's divergence metrics and task accuracy (flips, McNemar, bootstrap)."""
from __future__ import annotations

import sys

from dtm_core.cli import options as opt

NAME = "evaluate"


def add_parser(sub) -> None:
    ev = sub.add_parser(NAME, help="a prompt set: divergence metrics and task accuracy")
    opt.model_args(ev)
    ev.add_argument("--prompts", required=True,
                    help="a .txt/.jsonl/.csv file or a built-in set: " + ", ".join(opt.builtin_sets()))
    ev.add_argument("--new-tokens", type=int, default=32, metavar="N")
    ev.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    ev.add_argument("--out", help="one row per prompt: a plain CSV, or Parquet when the name ends "
                                  "in .parquet; the configuration goes to NAME.json beside it")
    ev.add_argument("--json", help="JSON with configuration, summary, rows and the worst prompts")
    ev.add_argument("--worst", type=int, default=5, metavar="K",
                    help="print the K prompts with the lowest FDT and the K with the highest KL, "
                         "with the text around each first divergent token (default 5; 0: none)")
    ev.add_argument("--free-run", action="store_true",
                    help="compare both models' free-running texts after the divergence too "
                         "(lengths, loops, rejoin position, edit similarity)")
    ev.add_argument("--answer-type", choices=["number"], default=None,
                    help="every item's answer is a number: the final answer of a text (its last "
                         "\\boxed{...}, else its last number) is compared numerically")
    opt.thinking_args(ev)
    opt.intactkv_args(ev)
    opt.one_model_args(ev)


def run(args) -> int:
    from dtm_core.measure.evaluate import evaluate
    from dtm_core.measure.prompts import load_prompts

    opt.check_common(args)
    pset = load_prompts(args.prompts).with_answer_type(args.answer_type)
    pair = opt.load_pair(args, pset.prompts, in_place=opt.in_place_of(args))
    ikv = opt.intactkv_of(args, pair, pset.prompts)
    store, rank = opt.join_world(pair)
    res = evaluate(pair, pset, args.new_tokens, chat=args.chat, batch_size=args.batch_size,
                   progress=opt.stderr_progress, intactkv=ikv, store=store,
                   free_run=args.free_run, thinking=opt.thinking_of(args, pair.tokenizer))
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
    opt.print_summary(f"pair: {pair.dense.source} vs {pair.label}   set: {pset.name} "
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
