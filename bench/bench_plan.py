"""Mixed plans under a budget (issue: mixed-precision and mixed-sparsity plans).

Three measurements on the default model, each in this run with a fresh cell store:

    .venv/bin/python bench/bench_plan.py speed     [--prompts 16] [--new-tokens 32]
        wall time of a 3-spec plan (int8,int4:g64,int3:g64 at 4.5 bits, verification included,
        no held-out part) against a single-spec sweep (int4:g64) of the same prompts: target
        at most 3x. Also the plan with --holdout 0.3 (its sweeps see 70 % of the prompts, then
        seven held-out evaluations).
    .venv/bin/python bench/bench_plan.py holdout   [--set factoid_qa] [--prompts 32] [--chat]
        the held-out comparison tables: 4.5 and 4.0 bits over int8,int4:g64,int3:g64 and 50 %
        sparsity over magnitude:0.3,0.5,0.7,0.9 (and the DTM planner for each).
    .venv/bin/python bench/bench_plan.py dtm       [--prompts 16] [--tolerance 0.9]
        the DTM paper's two statements: the share of components that can be pruned to 90 %
        (magnitude:0.9) and the share of parameters that take naive int8 (int8) while the
        combined mean FDT stays >= tolerance x N (the single-spec plan: least sensitive first,
        bisection with real evaluations).
"""
import argparse
import tempfile
import time

from dtm_core.planning.allocation import Budget
from dtm_core.planning.budget_plan import make_budget_plan
from dtm_core.models.components import all_components
from dtm_core.models.generation import encode_prompts
from dtm_core.models.load import load_model
from dtm_core.planning.plan import make_plan
from dtm_core.measure.prompts import PromptSet, load_prompts
from dtm_core.analysis.sweep import prepare, sweep

QUANT = "int8,int4:g64,int3:g64"
SPARSE = "magnitude:0.3,magnitude:0.5,magnitude:0.7,magnitude:0.9"


def first(pset: PromptSet, n: int) -> PromptSet:
    return PromptSet(pset.name, pset.records[:n], sha256=pset.sha256)


def speed(dense, args):
    pset = first(load_prompts(args.set or "general"), args.prompts)
    ids = encode_prompts(dense.tokenizer, pset.prompts)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        ctx = prepare(dense, ids, args.new_tokens)
        res = sweep(dense, "int4:g64", ids, args.new_tokens, cache_dir=cache, ctx=ctx)
        single = time.perf_counter() - t
    print(f"single-spec sweep int4:g64: {len(res.table)} cells, {single:.1f} s "
          f"(preparation included)")
    for holdout in (0.0, 0.3):
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            plan = make_budget_plan(dense, QUANT, pset, args.new_tokens,
                                    budget=Budget("bits", 4.5), holdout=holdout,
                                    cache_dir=cache)
            wall = time.perf_counter() - t
        print(f"3-spec plan ({QUANT}, 4.5 bits, holdout {holdout:g}): {wall:.1f} s = "
              f"{wall / single:.2f} x the single-spec sweep (target <= 3); "
              f"{len(plan.evaluations)} verification(s); {plan.summary_line()}")


def holdout(dense, args):
    pset = first(load_prompts(args.set or "factoid_qa"), args.prompts)
    with tempfile.TemporaryDirectory() as cache:
        runs = [(QUANT, Budget("bits", 4.5)), (QUANT, Budget("bits", 4.0)),
                (SPARSE, Budget("sparsity", 0.5))]
        for specs, budget in runs:
            for planner in ("fdt", "dtm"):
                t = time.perf_counter()
                plan = make_budget_plan(dense, specs, pset, args.new_tokens, budget=budget,
                                        holdout=0.3, planner=planner, cache_dir=cache,
                                        chat=args.chat)
                print(f"\n== {specs} within {budget}, planner {planner} "
                      f"({time.perf_counter() - t:.0f} s; {len(plan.fit_prompts)} fit, "
                      f"{len(plan.holdout_prompts)} held-out prompts of {pset.name}, "
                      f"N={args.new_tokens}{', chat template' if args.chat else ''})")
                print(plan.summary_line())
                cols = ["config", "avg_bits", "sparsity", "fdt_mean", "fdt_median", "sdt_mean",
                        "kl_mean", "fdt_vs_plan", "fdt_vs_plan_ci95_low",
                        "fdt_vs_plan_ci95_high", "accuracy", "accuracy_vs_plan",
                        "accuracy_vs_plan_ci95_low", "accuracy_vs_plan_ci95_high"]
                print(plan.holdout[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))


def dtm(dense, args):
    pset = first(load_prompts(args.set or "general"), args.prompts)
    ids = encode_prompts(dense.tokenizer, pset.prompts)
    comps = all_components(dense.model)
    with tempfile.TemporaryDirectory() as cache:
        ctx = prepare(dense, ids, args.new_tokens)
        for spec in ("magnitude:0.9", "int8"):
            res = sweep(dense, spec, ids, args.new_tokens, cache_dir=cache, ctx=ctx)
            plan = make_plan(dense, res.table, spec, ids, ctx.references, args.new_tokens,
                             budget=args.tolerance)
            alone = res.table[res.table.fdt_mean >= args.tolerance * args.new_tokens]
            print(f"{spec}: alone, {len(alone)} of {len(comps)} components keep mean FDT >= "
                  f"{args.tolerance:g} x N ({alone.params.sum() / res.table.params.sum():.1%} of "
                  f"the parameters); the most tolerant single cell: "
                  f"{res.table.sort_values('fdt_mean').component.iloc[-1]} at mean FDT "
                  f"{res.table.fdt_mean.max():.2f}")
            kinds = {}
            for name in plan.components:
                kinds[name.split(".")[1]] = kinds.get(name.split(".")[1], 0) + 1
            print(f"{spec}: {len(plan.components)} of {len(comps)} components "
                  f"({len(plan.components) / len(comps):.1%}), {plan.share_params:.1%} of the "
                  "component parameters, "
                  f"mean FDT {plan.fdt_mean:.2f} >= {plan.budget_fdt:.2f} "
                  f"({args.tolerance:g} x N={args.new_tokens}); by kind {kinds}; "
                  f"{len(plan.curve) - 1} evaluations")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["speed", "holdout", "dtm"])
    ap.add_argument("--set", default=None)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tolerance", type=float, default=0.9)
    ap.add_argument("--chat", action="store_true", help="holdout: wrap prompts in the chat "
                                                        "template")
    args = ap.parse_args()
    if args.prompts is None:
        args.prompts = 32 if args.what == "holdout" else 16
    dense = load_model("default")
    {"speed": speed, "holdout": holdout, "dtm": dtm}[args.what](dense, args)


if __name__ == "__main__":
    main()
