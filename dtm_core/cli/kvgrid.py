"""``kvgrid``: every (K bits, V bits) of KV-cache quantization on all layers, mean FDT and KL as
two K x V tables."""
from __future__ import annotations

import json

from dtm_core.cli import options as opt

NAME = "kvgrid"


def add_parser(sub) -> None:
    sp = sub.add_parser(NAME, help="the K-bits x V-bits grid of KV-cache quantization")
    sp.add_argument("--model", default="default")
    sp.add_argument("--prompts", required=True, help="a prompt file or a built-in set")
    sp.add_argument("--new-tokens", type=int, default=32, metavar="N")
    sp.add_argument("--chat", action="store_true")
    sp.add_argument("--k-bits", default="2-8", help="key bits: a range or list (default 2-8)")
    sp.add_argument("--v-bits", default="2-8", help="value bits: a range or list (default 2-8)")
    sp.add_argument("--group", type=int, metavar="G",
                    help="one scale per G values of the head dimension (default: per vector)")
    sp.add_argument("--layers", default="*", help="the layers whose caches are quantized "
                                                  "(default all), e.g. 0-11")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--dtype", default="auto")
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument("--cache-dir", help="model cache folder")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--out", help="one row per (K bits, V bits): a CSV, or Parquet when the name "
                                  "ends in .parquet (configuration in NAME.json beside it)")
    sp.add_argument("--json", help="write the two matrices (fdt_mean, kl_mean) as JSON here")


def run(args) -> int:
    from dtm_core.analysis.kvgrid import grid_matrix
    from dtm_core.jobs import kv_grid
    from dtm_core.measure.prompts import load_prompts
    from dtm_core.models.generation import encode_prompts

    opt.check_common(args)
    pset = load_prompts(args.prompts)
    dense = opt.pair_cache(args).dense(args.model)
    ids = encode_prompts(dense.tokenizer, pset.prompts, chat=args.chat)
    table = kv_grid(dense, ids, args.new_tokens, k_bits=args.k_bits, v_bits=args.v_bits,
                    group=args.group, layers=args.layers, batch_size=args.batch_size,
                    progress=opt.stderr_progress)
    if args.out:
        from dtm_core.measure.exports import write_table
        write_table(table, args.out, {"command": NAME, "model": dense.source,
                                      "prompts": args.prompts, "prompt_count": len(ids),
                                      "new_tokens": args.new_tokens, "chat": args.chat,
                                      "group": args.group, "layers": args.layers})
    mats = {m: grid_matrix(table, m) for m in ("fdt_mean", "kl_mean")}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({m: {"k_bits": [int(k) for k in t.index],
                           "v_bits": [int(v) for v in t.columns],
                           "values": t.values.tolist()} for m, t in mats.items()}, fh, indent=2)
    print(f"KV grid on {dense.source}: {len(ids)} prompts, N={args.new_tokens}, caches of layers "
          f"{args.layers}{f', groups of {args.group}' if args.group else ''}")
    for m, label in (("fdt_mean", "mean FDT"), ("kl_mean", "mean KL")):
        t = mats[m]
        t.index.name, t.columns.name = "K bits", "V bits"
        print(f"\n{label} (rows: key bits, columns: value bits)")
        print(t.to_string(float_format=(lambda x: f"{x:.2f}") if m == "fdt_mean"
                          else (lambda x: f"{x:.4f}")))
    return 0
