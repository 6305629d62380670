"""``sweep``: compress one ``LAYER.KIND`` at a time (the sensitivity map); also the options and the
setup that ``plan`` shares with it."""
from __future__ import annotations

from dtm_core.cli import options as opt

NAME = "sweep"


def sweep_options(sp, name: str) -> None:
    """The options ``sweep`` and ``plan`` share (a plan starts with a sweep)."""
    sp.add_argument("--model", default="default")
    sp.add_argument("--compress", required=name == "sweep", metavar="SPEC",
                    help=opt.spec_help())
    sp.add_argument("--prompts", required=True)
    opt.calibration_arg(sp)
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
    opt.gpus_arg(sp)
    sp.add_argument("--lost-after", type=float, default=30.0, metavar="S",
                    help="under torchrun: a rank silent this many seconds is taken as lost "
                         "and its unfinished cells go to the others (default 30)")


def add_parser(sub) -> None:
    sp = sub.add_parser(NAME, help="compress one LAYER.KIND at a time (sensitivity map)")
    sweep_options(sp, NAME)
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
    sp.add_argument("--estimate", action="store_true",
                    help="estimate every cell first from one forward and one backward pass of "
                         "the dense model a batch (columns kl_estimate, fdt_estimate); exact "
                         "cells only with --refine or --settle")
    sp.add_argument("--refine", metavar="N|all",
                    help="after the estimate, measure N cells exactly (or all), most sensitive "
                         "by estimate first")
    sp.add_argument("--settle", type=int, metavar="K",
                    help="after the estimate, measure cells most sensitive first until the "
                         "top-K ranking is settled (no change over max(K, 3) exact cells)")
    sp.add_argument("--probe", default="gauss", choices=["gauss", "sample", "argmax"],
                    help="the estimate's Fisher probe (default gauss)")


def sweep_setup(args):
    import os

    from dtm_core.compression.recipe import parse_spec
    from dtm_core.models.generation import encode_prompts
    from dtm_core.measure.prompts import load_prompts

    opt.check_common(args)
    parse_spec(args.compress)
    pset = load_prompts(args.prompts)
    dense = opt.pair_cache(args).dense(args.model)
    ids = encode_prompts(dense.tokenizer, pset.prompts, chat=args.chat)
    from dtm_core.distributed import init, world as world_of

    rank, world = world_of()
    args.store = None
    if world > 1:  # torchrun: share the cores between the ranks, join the process group
        import torch
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        args.store = init(str(next(dense.model.parameters()).device.type))
    return dense, ids, rank, world


def sweep_kw(args, rank, world) -> dict:
    return dict(layers=args.layers, kinds=args.kinds, cache_dir=args.cache_dir,
                batch_size=args.batch_size, rank=rank, world=world, chat=args.chat,
                calibration=opt.calibration_setting(args), store=getattr(args, "store", None),
                lost_after_s=getattr(args, "lost_after", 30.0))


def run(args) -> int:
    from dtm_core.compression.intactkv import IntactKV
    from dtm_core.jobs import sweep_variants

    dense, ids, rank, world = sweep_setup(args)
    ikv = IntactKV.parse(args.intactkv)
    if args.estimate or args.refine is not None or args.settle is not None:
        return _run_estimated(args, dense, ids, ikv, rank, world)
    both = sweep_variants(dense, args.compress, ids, args.new_tokens, **sweep_kw(args, rank, world),
                          progress=opt.stderr_progress if rank == 0 else None, intactkv=ikv,
                          whole=args.whole)
    res = both.main
    if rank != 0:
        return 0
    if args.out:
        from dtm_core.measure.exports import write_table
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


def _refine_count(value) -> int | None:
    from dtm_core.errors import DTMError

    if value is None:
        return 0
    if str(value).strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise DTMError(f"--refine takes a number of cells or 'all', not '{value}'.")
    return n


def _run_estimated(args, dense, ids, ikv, rank, world) -> int:
    """``sweep --estimate``: every cell estimated, then the exact cells asked for."""
    from dtm_core.errors import DTMError
    from dtm_core.jobs import estimated_sweep

    if world > 1:
        raise DTMError("--estimate runs in one process; run it without torchrun (the exact "
                       "sweep after it can run under torchrun with the same cache).")
    if args.whole:
        raise DTMError("--whole measures the exact sweep; run it without --estimate.")
    if args.settle is not None and args.settle < 1:
        raise DTMError("--settle takes K >= 1.")
    kw = sweep_kw(args, rank, world)
    for k in ("rank", "world", "store", "lost_after_s"):
        kw.pop(k, None)
    res = estimated_sweep(dense, args.compress, ids, args.new_tokens, **kw,
                          refine=_refine_count(args.refine), settle=args.settle,
                          probe=args.probe, progress=opt.stderr_progress, intactkv=ikv)
    est, agree = res.estimate, res.agreement()
    if args.out:
        from dtm_core.measure.exports import write_table
        write_table(res.table, args.out, {
            "command": "sweep", "model": dense.source, "spec": args.compress,
            "prompts": args.prompts, "prompt_count": len(ids), "new_tokens": args.new_tokens,
            "chat": args.chat, "intactkv": None if ikv is None else ikv.label,
            "cell_store": str(res.sweep.folder if res.sweep else ""),
            "estimate": {"probe": est.probe, "seconds": est.seconds,
                         "fisher_seconds": est.fisher_seconds, "positions": est.positions,
                         "fdt_curve": list(est.curve), "agreement": agree,
                         "settled": bool(res.sweep.settled) if res.sweep else False}})
    t = res.table
    print(f"sweep {args.compress} on {dense.source}: {len(t)} cells estimated in "
          f"{est.seconds:.1f} s (Fisher {est.fisher_seconds:.1f} s over {est.positions} "
          f"positions), {int(t.exact.sum())} exact"
          + (", top-{} settled".format(args.settle) if res.sweep and res.sweep.settled else ""))
    if agree["cells"] >= 3:
        print(f"estimate against exact over {agree['cells']} cells: Spearman KL "
              f"{agree['spearman_kl']:.3f}, FDT {agree['spearman_fdt']:.3f}")
    cols = ["component", "params", "kl_estimate", "fdt_estimate", "exact", "kl_mean",
            "fdt_mean"]
    print(t[cols].sort_values("kl_estimate", ascending=False).head(10).to_string(index=False))
    return 0
