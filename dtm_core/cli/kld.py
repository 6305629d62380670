"""``kld``: llama.cpp-style KL-divergence statistics of a pair on a text."""
from __future__ import annotations

import json

from dtm_core.cli import options as opt

NAME = "kld"


def add_parser(sub) -> None:
    kl = sub.add_parser(NAME, help="llama.cpp-style KL-divergence statistics on a text")
    opt.model_args(kl)
    kl.add_argument("--text", required=True, help="a UTF-8 text file")
    kl.add_argument("--ctx", type=int, default=512, help="chunk size in tokens (default 512)")
    opt.one_model_args(kl)
    kl.add_argument("--json", help="write the statistics as JSON here")
    kl.add_argument("--out", help="the statistics as a CSV (statistic,value), or Parquet when the "
                                  "name ends in .parquet; the configuration in NAME.json beside")


def run(args) -> int:
    from dtm_core.measure.kld import format_report, score_text
    from dtm_core.measure.prompts import read_text_file

    opt.check_common(args)
    text = read_text_file(args.text)
    pair = opt.load_pair(args, [line for line in text.splitlines() if line.strip()][:64],
                         in_place=opt.in_place_of(args))
    store, rank = opt.join_world(pair)
    stats, values = score_text(pair, text, args.ctx, progress=opt.stderr_progress, store=store)
    if rank != 0:       # torchrun: rank 0 reports the merged result
        return 0
    if args.out:
        from dtm_core.measure.exports import write_table
        from dtm_core.measure.kld import statistics_table
        write_table(statistics_table(stats), args.out,
                    {"command": "kld", "model": pair.dense.source, "pair": pair.label,
                     "in_place": pair.in_place is not None,
                     "text": args.text, "ctx": args.ctx})
    conf = values.by_confidence()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({**stats, "kl_by_confidence": conf.to_dict(orient="records")}, fh,
                      indent=2)
    print(f"pair: {pair.dense.source} vs {pair.label}   ctx: {args.ctx}")
    print(format_report(stats))
    print("\n" + confidence_report(conf))
    return 0


def confidence_report(conf) -> str:
    """The KL-by-confidence table as text lines."""
    lines = ["KL by the base model's top-token probability:",
             f"{'p(top)':>10} {'positions':>10} {'share':>7} {'mean KL':>10} {'KL share':>9} "
             f"{'same top':>9}"]
    for r in conf.itertuples():
        lines.append(f"{r.bucket:>10} {r.positions:>10d} {r.share:>7.1%} {r.kl_mean:>10.5f} "
                     f"{r.kl_share:>9.1%} {r.agree:>9.1%}")
    return "\n".join(lines)
