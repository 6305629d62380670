"""Mixed-precision / mixed-sparsity plans under a budget, verified, and proven on held-out prompts.

1. The prompts are split (``holdout`` share, fixed seed) into a fit part and a held-out part.
2. Every component is swept under every candidate spec on the fit part (:func:`~dtm_core.analysis.sweep.
   sweep`: cached per cell, one dense preparation shared by all specs).
3. A planner picks one choice per component (``none`` or a candidate) within the budget
   (:mod:`dtm_core.planning.allocation`): ``fdt`` (the exact knapsack on FDT lost), ``dtm`` (the DTM
   paper's threshold procedure), or ``auto`` (default): all of these and the KL-ranked knapsack,
   each verified on the fit prompts, the best kept (the sum of single-component losses the
   knapsack minimizes is a proxy: where every component alone loses much, as under 50 %
   magnitude pruning, it misjudges what compounds).
4. Verification: the whole plan is evaluated for real on the fit part. With a target (mean FDT >=
   target x N) a plan below it is repaired greedily (the upgrades that buy the most FDT per bit
   first, enough to cover the shortfall by the cells' numbers), with at most ``max_evals`` real
   evaluations; with a target and no budget, the smallest plan that meets the target is found by
   bisection over the bits budget first.
5. Held-out proof: the plan, the other planner, the KL-ranked plan (same solver), a random plan
   (same budget), every uniform candidate spec and the dense model (the ceiling: FDT = N,
   its accuracy) are evaluated on the held-out prompts; the
   table has mean/median FDT, SDT, KL, accuracy (sets with answers) and paired 95 % intervals of
   each row's FDT and accuracy against the plan's.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import pandas as pd

from dtm_core.planning.draft_plan import draft_columns, draft_length
from dtm_core.planning.plan_record import BudgetPlan  # noqa: F401 (its home for most callers)
from dtm_core.planning.allocation import (KEEP, KV_BYTES, Budget, ChoiceTable, choice_table,
                                          closest_uniform, dtm_allocation, knapsack, losses,
                                          random_allocation, recipe_of)  # noqa: F401
from dtm_core.measure.divergence import reference_continuations
from dtm_core.errors import DTMError
from dtm_core.measure.evaluate import evaluate, paired_bootstrap
from dtm_core.models.generation import encode_prompts
from dtm_core.compression.methods import parse_spec
from dtm_core.models.load import LoadedModel
from dtm_core.compression.pair import in_place_pair
from dtm_core.measure.prompts import PromptSet

PLANNERS = ("auto", "fdt", "dtm")
AUTO_FROM = ("fdt", "dtm", "kl")     # auto: the best of these on the fit prompts, verified
HOLDOUT_COLUMNS = ["config", "planner", "avg_bits", "sparsity", "bytes", "fdt_mean", "fdt_median",
                   "sdt_mean", "kl_mean", "fdt_vs_plan", "fdt_vs_plan_ci95_low",
                   "fdt_vs_plan_ci95_high", "accuracy", "accuracy_vs_plan",
                   "accuracy_vs_plan_ci95_low", "accuracy_vs_plan_ci95_high"]
DRAFT_COLUMNS = ["accept_len", "draft_cost", "speedup"]    # draft plans' held-out extras


def parse_specs(text) -> list[str]:
    """Candidate specs from ``int8,int4:g64`` or a list; each checked, duplicates dropped."""
    items = text if isinstance(text, (list, tuple)) else str(text or "").split(",")
    out = []
    for s in (str(x).strip() for x in items):
        if s:
            norm = str(parse_spec(s))
            if norm != KEEP and norm not in out:
                out.append(norm)
    if not out:
        raise DTMError("Give at least one candidate spec, e.g. int8,int4:g64,int3:g64.")
    return out


def split_prompts(n: int, holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit, held-out) prompt indices: a seeded shuffle, the last ``holdout`` share held out."""
    if not 0 <= holdout < 1:
        raise DTMError("--holdout is the share of prompts held out, in [0, 1), e.g. 0.3.")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = int(round(holdout * n))
    if holdout > 0 and (k < 1 or n - k < 1):
        raise DTMError(f"{n} prompt{'s' * (n != 1)} cannot be split with --holdout {holdout:g}: "
                       "both parts need at least one prompt.")
    return sorted(idx[:n - k]), sorted(idx[n - k:])


class _Verifier:
    """Real evaluations of plans on the fit prompts, counted and cached by assignment.

    A plan is applied to a shared copy of the dense model and run on the sweep's recorded layer
    inputs from its first compressed layer on (as a sweep's cells and its all-at-once cell are):
    the numbers of :func:`~dtm_core.measure.divergence.divergence` of the plan's pair (tested), without
    the dense pass or the layers before."""

    def __init__(self, dense, table, ctx, calib, note, column: str = "fdt"):
        self.dense, self.table, self.ctx, self.calib = dense, table, ctx, calib
        self.note, self.column = note, column
        self.work = None
        self.done: dict[tuple, float] = {}
        self.log: list[dict] = []

    def __call__(self, assign, why: str) -> float:
        from dtm_core.compression.recipe import apply_recipe
        from dtm_core.compression.pair import shared_copy
        from dtm_core.analysis.sweep import cell_table

        key = tuple(int(j) for j in assign)
        if key not in self.done:
            recipe = self.table.recipe(assign)
            if self.work is None:
                self.work = shared_copy(self.dense.model)
            comps = [c for c, sp in recipe.components(self.work)
                     if sp.changes_weights or sp.targets_cache]
            with apply_recipe(self.work, recipe, self.calib):
                t = cell_table(self.work, self.ctx, min((c.layer for c in comps), default=0))
            self.done[key] = float(t[self.column].mean())
            m = self.table.measure(assign)
            self.log.append({"step": len(self.log) + 1, "why": why, **m,
                             "fdt_mean": self.done[key]})
            self.note(None, f"verified ({why}): {m['avg_bits']:.3f} bits, "
                            f"{m['sparsity']:.1%} sparsity: mean {self.column} "
                            f"{self.done[key]:.3f}")
        return self.done[key]

    @property
    def count(self) -> int:
        return len(self.log)


def solve(table: ChoiceTable, budget: Budget, planner: str) -> tuple[np.ndarray, float | None]:
    if planner == "kl":
        return knapsack(table, budget, "kl"), None
    if planner == "dtm":
        return dtm_allocation(table, budget)
    if planner == "fdt":
        return knapsack(table, budget, "fdt"), None
    raise DTMError(f"Unknown planner '{planner}': use {' or '.join(PLANNERS)}.")


def repair(table: ChoiceTable, assign, target: float, real: float, verify, max_evals: int
           ) -> tuple[np.ndarray, float]:
    """Upgrade components (most FDT per extra bit first, by the cells' numbers) until the real
    mean FDT reaches ``target`` tokens or ``max_evals`` evaluations are spent."""
    loss = losses(table, "fdt")
    rows = np.arange(len(assign))
    assign = assign.copy()
    while real < target and verify.count < max_evals:
        gain = loss[rows, assign][:, None] - loss
        more = table.bits - table.bits[rows, assign][:, None]
        ok = (gain > 0) & (more > 0)
        if not ok.any():
            break
        rate = np.where(ok, gain / np.maximum(more, 1e-12), -np.inf)
        order = np.argsort(-rate, axis=None)
        need, got, moved = target - real, 0.0, set()
        for flat in order:
            i, j = np.unravel_index(int(flat), rate.shape)
            if not np.isfinite(rate[i, j]) or i in moved:
                continue
            got += float(gain[i, j])
            assign[i] = j
            moved.add(i)
            if got >= need:
                break
        real = verify(assign, f"repair: {len(moved)} upgrade{'s' * (len(moved) != 1)}")
    return assign, real


def make_budget_plan(dense: LoadedModel, specs, pset: PromptSet, new_tokens: int, *,
                     budget: Budget | None = None, target_fdt: float | None = None,
                     holdout: float = 0.3, seed: int = 0, planner: str = "auto",
                     chat: bool = False, cache_dir=None, max_evals: int = 8,
                     calibration=None, batch_size: int = 16, layers: str | None = None,
                     kinds: str | None = None, rank: int = 0, world: int = 1,
                     store=None, progress: Callable[[float | None, str], None] | None = None,
                     stop=None, objective: str = "fdt", target_accept: float | None = None,
                     draft_cost: float | None = None,
                     shortlist: int | None = None) -> BudgetPlan | None:
    """A plan of one spec per component (see the module docstring). ``calibration``: texts or a
    Calibration for methods that need statistics (default: the fit prompts, as the sweeps).
    Under torchrun (``world`` > 1 with the c10d ``store``) the ranks share the sweeps' cells and
    rank 0 plans, verifies and reports; the other ranks return None. ``layers`` / ``kinds``
    restrict the plan to some components (as for a sweep): the others stay as they are, and the
    bits and sparsity budgets count the selected components only. ``stop`` (a threading.Event)
    ends the sweeps after the current cell (their finished cells stay stored).
    ``objective="accept_len_k{K}"`` makes it a draft plan (:mod:`dtm_core.planning.draft_plan`):
    ``target_accept`` a mean accepted length per step to reach, ``draft_cost`` one draft forward
    over a dense one for the expected speed-up (default: bits over the dense model's).
    ``shortlist`` K: each spec's cells are estimated first (:mod:`~dtm_core.analysis.sweep.
    estimate`) and only the K most sensitive by estimate are measured exactly, the others enter
    the choice table with their estimates; the plan is still verified by real evaluations."""
    from dtm_core.planning.draft_plan import objective_table
    from dtm_core.compression.calibration import calibration_from
    from dtm_core.analysis.sweep import prepare, sweep

    note = progress or (lambda f, m: None)
    specs = parse_specs(specs)
    caches = {parse_spec(s).targets_cache for s in specs}
    if len(caches) > 1:
        raise DTMError("A plan is over weights or over KV caches: give weight specs "
                       "(int4:g128, ...) or kv: specs (kv:int8, kv:int4, ...), not both.")
    if caches == {True} and budget is not None and budget.kind != "bits":
        raise DTMError("A KV plan's budget is bits per cached value (--budget-bits, scales "
                       "included); its cache memory per 1000 tokens of context is shown with "
                       "the plan.")
    k_draft = draft_length(objective)
    if k_draft is None and target_accept is not None:
        raise DTMError("--target-accept is a draft plan's target: give --objective "
                       "accept_len_kK too.")
    if k_draft is not None:
        if target_fdt is not None:
            raise DTMError("A draft plan's target is --target-accept (a mean accepted length "
                           "per step), not --target-fdt.")
        if target_accept is not None and not 0 < target_accept <= k_draft:
            raise DTMError(f"--target-accept is a mean accepted length per step, between 0 "
                           f"and the draft length {k_draft}.")
        target_fdt = target_accept      # the planner's target, in the objective's unit
    if budget is None and target_fdt is None:
        raise DTMError("Give a budget (--budget-bits, --budget-sparsity or --budget-bytes) or "
                       "a target (--target-fdt).")
    if k_draft is None and target_fdt is not None and not 0 < target_fdt <= 1:
        raise DTMError("--target-fdt is a share of N in (0, 1], e.g. 0.9.")
    if planner not in PLANNERS:
        raise DTMError(f"Unknown planner '{planner}': use {' or '.join(PLANNERS)}.")
    if max_evals < 1:
        raise DTMError("--max-evals must be at least 1.")
    if shortlist is not None and k_draft is not None:
        raise DTMError("A draft plan needs every cell's acceptance, which estimates do not give: "
                       "leave out --shortlist.")
    if shortlist is not None and (shortlist < 0 or world > 1):
        raise DTMError("--shortlist K takes K >= 0 exact cells per spec, in one process (not "
                       "under torchrun).")
    texts = pset.prompts
    fit, held = split_prompts(len(texts), holdout, seed)
    ids_all = encode_prompts(dense.tokenizer, texts, chat=chat)
    ids = [ids_all[i] for i in fit]
    note(0.0, f"{len(fit)} fit prompts, {len(held)} held out: dense references")
    refs = reference_continuations(dense, ids, new_tokens, batch_size)
    calib = None
    if any(parse_spec(s).needs_calibration for s in specs):
        calib = calibration_from(dense, calibration if calibration is not None else ids,
                                 chat=chat)
    ctx = prepare(dense, ids, new_tokens, batch_size, references=refs)
    tables = {}
    for k, spec in enumerate(specs):
        tell = (lambda f, m, k=k, s=spec: note((k + f) / len(specs) * 0.8, f"sweep {s}: {m}"))
        if shortlist is not None:
            tables[spec] = _shortlisted(dense, spec, ids, new_tokens, shortlist, ctx, calib,
                                        dict(cache_dir=cache_dir, batch_size=batch_size,
                                             layers=layers, kinds=kinds, stop=stop), tell)
            continue
        res = sweep(dense, spec, ids, new_tokens, cache_dir=cache_dir, ctx=ctx, calibration=calib,
                    batch_size=batch_size, layers=layers, kinds=kinds, rank=rank, world=world,
                    store=store, stop=stop, progress=tell)
        if res.stopped:
            raise DTMError(f"Stopped during the sweep of {spec}; the finished cells are stored "
                           "and the next plan over the same prompts reuses them.")
        tables[spec] = res.table
    if rank != 0:
        return None
    table = objective_table(choice_table(dense.model, tables, new_tokens, len(ids)), tables,
                            objective, refs)
    if table.stored is not None and budget is not None:
        budget = Budget("bits", budget.value, table.unit)
    verify = _Verifier(dense, table, ctx, calib, note, "fdt" if k_draft is None else objective)
    want = None if target_fdt is None else (target_fdt if k_draft is not None
                                            else target_fdt * new_tokens)
    threshold, why_note = None, ""
    if budget is not None:
        tried = []
        for p in (AUTO_FROM if planner == "auto" else (planner,)):
            a, thr = solve(table, budget, p)
            tried.append((verify(a, f"{p} plan within {budget}"), -table.measure(a)["avg_bits"],
                          -AUTO_FROM.index(p), p, a, thr))
        # auto: the highest verified mean FDT (then the fewer bits, then fdt, dtm, kl)
        real, _, _, chosen, assign, threshold = max(tried, key=lambda t: t[:3])
        if planner == "auto":
            planner = chosen
            why_note = f"auto: the best of {', '.join(AUTO_FROM)} on the fit prompts"
        if want is not None and real < want:
            assign, real = repair(table, assign, want, real, verify, max_evals)
            over = budget.of(table.measure(assign))
            why_note += ("; " if why_note else "") + (
                "repaired to meet the target" if real >= want else
                f"below the target after {verify.count} evaluations")
            if (over > budget.value) if budget.kind != "sparsity" else (over < budget.value):
                why_note += f"; exceeds the budget ({over:.4g})"
    else:
        planner = "fdt" if planner == "auto" else planner
        assign, real, threshold, why_note = _smallest(table, want, planner, verify, max_evals)
    if shortlist is not None:
        exact = sum(int(t.exact.sum()) for t in tables.values())
        why_note += ("; " if why_note else "") + (
            f"shortlist: {exact} of {sum(len(t) for t in tables.values())} cells exact, the "
            "others estimated")
    measure = table.measure(assign)
    plan = BudgetPlan(assignments=table.assignments(assign), specs=specs, budget=budget,
                      target_fdt=target_fdt, planner=planner, measure=measure, fdt_mean=real,
                      new_tokens=new_tokens, family=table.family, dtype_bits=table.dtype_bits,
                      fit_prompts=fit, holdout_prompts=held, evaluations=verify.log,
                      note=why_note, threshold=threshold,
                      cells=table.frame().rename(columns={"fdt_mean": f"{objective}_mean"}
                                                 if k_draft is not None else {}),
                      objective=objective, draft_cost=draft_cost)
    if held:
        plan.holdout = holdout_table(dense, table, plan, assign, pset, held, new_tokens, chat,
                                     calib, seed, note)
    note(1.0, plan.summary_line())
    return plan


def _shortlisted(dense, spec, ids, new_tokens, shortlist, ctx, calib, kw, tell) -> pd.DataFrame:
    """A spec's cells for the choice table from estimates (:mod:`~dtm_core.analysis.sweep.
    refine`): the ``shortlist`` most sensitive by estimate (and any already stored) exact, the
    others their estimates (``kl_estimate``; ``fdt_estimate`` from the curve fitted on the
    exact ones), with ``exact`` saying which."""
    from dtm_core.analysis.sweep.refine import estimate_and_refine

    r = estimate_and_refine(dense, spec, ids, new_tokens, refine=shortlist, ctx=ctx,
                            calibration=calib, progress=tell, **kw)
    if r.sweep is not None and r.sweep.stopped:
        raise DTMError(f"Stopped during the sweep of {spec}; the finished cells are stored and "
                       "the next plan over the same prompts reuses them.")
    t = r.table.copy()
    t["fdt_mean"] = t.fdt_mean.where(t.exact, t.fdt_estimate)
    t["kl_mean"] = t.kl_mean.where(t.exact, t.kl_estimate)
    return t


def _smallest(table, want, planner, verify, max_evals):
    """The smallest plan (bits per weight) whose real mean FDT reaches ``want``: bisection over
    the bits budget, then a repair from the largest failing probe when evaluations remain."""
    cost = table.bits
    lo = float(cost.min(axis=1).sum()) / table.total_params
    hi = table.dtype_bits
    passing, failing = None, None      # (assign, real, threshold)
    b = Budget("bits", lo, table.unit)
    assign, thr = solve(table, b, planner)
    real = verify(assign, f"{planner} plan at the smallest size")
    if real >= want:
        return assign, real, thr, ""
    failing = (assign, real, thr, lo)
    while verify.count < max(1, max_evals - 2) and hi - lo > 0.01:
        mid = (lo + hi) / 2
        assign, thr = solve(table, Budget("bits", mid, table.unit), planner)
        real = verify(assign, f"bisection at {mid:.3f} bits")
        if real >= want:
            hi, passing = mid, (assign, real, thr, mid)
        else:
            lo, failing = mid, (assign, real, thr, mid)
    a, r = repair(table, failing[0], want, failing[1], verify, max_evals)
    if r >= want and (passing is None or table.measure(a)["avg_bits"]
                      < table.measure(passing[0])["avg_bits"]):
        return a, r, None, "repaired from the bisection's largest failing plan"
    if passing is not None:
        return passing[0], passing[1], passing[2], ""
    keep = np.zeros(len(table.components), dtype=np.int64)
    return keep, float(table.new_tokens), None, ("no compressed plan reached the target within "
                                                 f"{verify.count} evaluations: every component "
                                                 "kept")


def holdout_table(dense, table: ChoiceTable, plan: BudgetPlan, assign, pset: PromptSet, held,
                  new_tokens: int, chat: bool, calib, seed: int, note) -> pd.DataFrame:
    """The plan and its baselines on the held-out prompts (see the module docstring)."""
    # every baseline at the plan's own budget (after any repair): same kind, its measured value
    budget = plan.budget or Budget("bits", plan.measure["avg_bits"], table.unit)
    budget = budget.with_value(budget.of(plan.measure)) if budget.kind != "bytes" else \
        budget.with_value(max(budget.value, plan.measure["bytes"]))
    closest = closest_uniform(table, budget)
    configs = [("plan", plan.planner, assign)]
    others = [(f"{p} planner" if p != "kl" else "KL-ranked", p,
               lambda p=p: solve(table, budget, p)[0]) for p in AUTO_FROM if p != plan.planner]
    for name, planner, make in others + [
            ("random", "random", lambda: random_allocation(table, budget, seed))]:
        try:
            configs.append((name, planner, make()))
        except DTMError as exc:          # e.g. a budget the baseline cannot fit: say so, go on
            note(None, f"{name}: {exc}")
    for s in table.choices[1:]:
        configs.append((f"uniform {s}" + (" (closest)" if s == closest else ""), "uniform",
                        table.uniform(s)))
    # the dense model against itself: the ceiling of every column (and the dense accuracy)
    configs.append(("dense", "dense", table.uniform(KEEP)))
    sub = PromptSet(name=f"{pset.name} (held out)", records=[pset.records[i] for i in held])
    rows, per = [], {}
    for k, (name, planner, a) in enumerate(configs):
        note(None, f"held-out evaluation {k + 1}/{len(configs)}: {name}")
        # one model's memory: the dense passes, then the model compressed in place, restored
        pair = in_place_pair(dense, table.recipe(a), calibration=calib)
        ev = evaluate(pair, sub, new_tokens, chat=chat)
        del pair
        per[name] = ev.table
        s = ev.summary
        row = {"config": name, "planner": planner, **table.measure(a),
               "fdt_mean": s.get("fdt_mean"), "fdt_median": s.get("fdt_median"),
               "sdt_mean": s.get("sdt_mean"), "kl_mean": s.get("kl_mean"),
               "accuracy": s.get("accuracy_compressed")}
        rows.append({**row, **draft_columns(row, s, plan.objective, plan.draft_cost,
                                            table.dtype_bits)})
    base = per["plan"]
    for row in rows:
        t = per[row["config"]]
        d, lo, hi = paired_bootstrap(base.fdt.to_numpy(), t.fdt.to_numpy())
        row.update(fdt_vs_plan=d, fdt_vs_plan_ci95_low=lo, fdt_vs_plan_ci95_high=hi)
        if "correct_compressed" in t and "correct_compressed" in base:
            ok = base.correct_compressed.notna() & t.correct_compressed.notna()
            d, lo, hi = paired_bootstrap(base.correct_compressed[ok].astype(float).to_numpy(),
                                         t.correct_compressed[ok].astype(float).to_numpy())
        else:
            d = lo = hi = None
        row.update(accuracy_vs_plan=d, accuracy_vs_plan_ci95_low=lo,
                   accuracy_vs_plan_ci95_high=hi)
    return pd.DataFrame(rows, columns=HOLDOUT_COLUMNS
                        + ([KV_BYTES] if table.stored is not None else [])
                        + (DRAFT_COLUMNS if plan.objective != "fdt" else []))
