"""``plan``: a sweep, then the largest set of components within an FDT budget (``--compress``), or a
mixed plan, one spec per component under a bits / sparsity / bytes budget (``--specs``), proven
on held-out prompts and exported to other tools."""
from __future__ import annotations

from dtm_core.cli import options as opt
from dtm_core.cli.sweep import sweep_kw, sweep_options, sweep_setup
from dtm_core.errors import DTMError

NAME = "plan"


def add_parser(sub) -> None:
    sp = sub.add_parser(NAME, help="sweep, then the largest set of components within a budget")
    sweep_options(sp, NAME)
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
    g.add_argument("--objective", default="fdt", metavar="OBJECTIVE",
                   help="what the plan optimizes: fdt (default), or accept_len_kK (K = 1, 2, 4, "
                        "8, 16) for a draft plan: the compressed model as a self-speculative "
                        "draft, the mean number of its K drafted tokens the dense model accepts "
                        "per verification step")
    g.add_argument("--target-accept", type=float, metavar="A",
                   help="a draft plan's target: the cheapest plan whose mean accepted length "
                        "reaches A (with a budget, a plan below it is repaired)")
    g.add_argument("--draft-cost", type=float, metavar="C",
                   help="a draft plan's cost of one draft forward over one dense forward, for "
                        "the expected speed-up (default: the draft's bits over the dense "
                        "model's)")
    g.add_argument("--shortlist", type=int, metavar="K",
                   help="estimate every cell first (one forward and backward of the dense model "
                        "per batch) and measure only the K most sensitive cells of each spec "
                        "exactly; the others enter the plan with their estimates (it is still "
                        "verified by real evaluations)")
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


def _budget_of(args):
    from dtm_core.planning.allocation import Budget

    given = [(k, v) for k, v in (("bits", args.budget_bits), ("sparsity", args.budget_sparsity),
                                 ("bytes", args.budget_bytes)) if v is not None]
    if len(given) > 1:
        raise DTMError("Give one budget: --budget-bits, --budget-sparsity or --budget-bytes.")
    return Budget(*given[0]) if given else None


def budget_plan(args) -> int:
    from dtm_core.jobs import plan_under_budget
    from dtm_core.planning.plan import save_compressed
    from dtm_core.planning.plan_exports import export_plan
    from dtm_core.measure.prompts import load_prompts

    opt.check_common(args)
    budget = _budget_of(args)
    if budget is None and args.target_fdt is None and args.target_accept is None:
        raise DTMError("Give a budget (--budget-bits, --budget-sparsity or --budget-bytes) or "
                       "a target (--target-fdt, or --target-accept for a draft plan).")
    pset = load_prompts(args.prompts)
    dense = opt.pair_cache(args).dense(args.model)
    from dtm_core.distributed import init, world as world_of

    rank, world = world_of()
    store = init(str(next(dense.model.parameters()).device.type)) if world > 1 else None
    plan = plan_under_budget(dense, args.specs, pset, args.new_tokens, budget=budget,
                             target_fdt=args.target_fdt, holdout=args.holdout, seed=args.seed,
                             planner=args.planner, chat=args.chat, cache_dir=args.cache_dir,
                             max_evals=args.max_evals, calibration=opt.calibration_setting(args),
                             batch_size=args.batch_size, layers=args.layers, kinds=args.kinds,
                             rank=rank, world=world, store=store, objective=args.objective,
                             target_accept=args.target_accept, draft_cost=args.draft_cost,
                             shortlist=args.shortlist,
                             progress=opt.stderr_progress if rank == 0 else None)
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
              f"{e['sparsity']:.1%} sparsity: mean {plan.objective} {e['fdt_mean']:.3f}")
    if plan.holdout is not None:
        print(f"held out ({len(plan.holdout_prompts)} prompts; fdt_vs_plan = row - plan, "
              "paired 95 % interval):")
        print(plan.holdout.dropna(axis=1, how="all").to_string(index=False,
                                                             float_format=lambda x: f"{x:.3f}"))
    return 0


def _plan_calibration(dense, plan, pset, args):
    """The calibration the plan was verified with: the given one, else its fit prompts."""
    from dtm_core.compression.calibration import calibration_from
    from dtm_core.models.generation import encode_prompts
    from dtm_core.jobs import resolve_calibration

    setting = opt.calibration_setting(args)
    if setting.source is not None:
        return resolve_calibration(dense, setting, pset.prompts, args.chat)
    ids = encode_prompts(dense.tokenizer, pset.prompts, chat=args.chat)
    return calibration_from(dense, [ids[i] for i in plan.fit_prompts])


def run(args) -> int:
    from dtm_core.jobs import plan_from_sweep, sweep_variants
    from dtm_core.planning.plan import save_compressed
    from dtm_core.analysis.sweep import prepare

    if args.specs:
        if args.compress:
            raise DTMError("Give --compress SPEC (one spec, --budget) or --specs SPEC,SPEC,... "
                           "(a budget), not both.")
        return budget_plan(args)
    if not args.compress:
        raise DTMError("plan needs --compress SPEC (with --budget) or --specs SPEC,SPEC,... "
                       "(with --budget-bits, --budget-sparsity, --budget-bytes or "
                       "--target-fdt).")
    if any(v is not None for v in (args.budget_bits, args.budget_sparsity, args.budget_bytes,
                                   args.target_fdt, args.shortlist)) or args.export:
        raise DTMError("--budget-bits/--budget-sparsity/--budget-bytes/--target-fdt/--export/"
                       "--shortlist go with --specs.")
    dense, ids, rank, world = sweep_setup(args)
    ctx = prepare(dense, ids, args.new_tokens, args.batch_size)
    res = sweep_variants(dense, args.compress, ids, args.new_tokens, **sweep_kw(args, rank, world),
                         ctx=ctx).main
    if rank != 0:
        return 0
    calibration = opt.calibration_setting(args)
    plan = plan_from_sweep(dense, res.table, args.compress, ids, args.new_tokens, args.budget,
                           references=ctx.references, calibration=calibration, chat=args.chat)
    if args.out:
        plan.save(args.out)
    if args.save:
        from dtm_core.jobs import resolve_calibration
        calib = (resolve_calibration(dense, calibration, ids, args.chat)
                 if plan.recipe.needs_calibration else None)
        save_compressed(dense, plan.recipe, args.save, calibration=calib)
    print(f"plan {plan.spec}: {len(plan.components)} of {len(res.table)} components, "
          f"{plan.share_params:.1%} of all component parameters compressed; "
          f"mean FDT {plan.fdt_mean:.2f} (budget {plan.budget_fdt:.2f})")
    print(plan.curve.to_string(index=False))
    return 0
