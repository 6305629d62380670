"""Estimated sweep cells: every component's KL from one forward and one backward pass of the dense
model per batch, whatever the number of cells.

The KL a small weight change ``d`` causes, KL(p_dense || p_compressed) averaged over positions, is
to second order ``1/2 d' F d`` with ``F`` the Fisher information of the model's next-token
distributions at the dense weights (the first-order term is zero: the KL is at its minimum
there). Quantization and pruning errors are nearly independent from weight to weight, so the
diagonal carries it: ``kl_estimate = 1/2 sum_i F_ii d_i^2 / positions``. The diagonal is estimated
with random probes: at each continuation position a vector ``u`` with E[u u'] = diag(p) - p p'
(the logits' Fisher); the squared gradient of ``sum u . z`` with respect to the weights is then
an unbiased estimate of diag(F) (terms across positions and prompts have mean zero). One backward
of that scalar per batch gives every selected weight's Fisher at once; a cell then costs the
spec applied to its component and one weighted sum over its weights.

Probes (``probe``): ``gauss`` (default; u = sqrt(p) * e - p (sqrt(p) . e), e standard normal:
lowest variance of the three here, see bench/bench_estimate.py), ``sample`` (u = onehot(t) - p, t
drawn from p: the sampled-label score) and ``argmax`` (the empirical Fisher of the dense greedy
token, which is biased but common). The FDT estimate maps the KL estimate through a curve fitted to
the exact cells measured so far (:func:`fdt_curve`); a map from KL alone cannot order cells by FDT
better than the exact KL does (Spearman 0.59 between exact KL and FDT over the default model's
int4:g64 cells), which bounds the FDT estimate's agreement.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from dtm_core.analysis.sweep.probes import PROBES, _probe, head_at, probe_batches
from dtm_core.errors import DTMError

ESTIMATE_COLUMNS = ["layer", "kind", "component", "params", "kl_estimate", "fdt_estimate",
                    "exact", "kl_mean", "fdt_mean"]
# (log c, a) of the flip probability q = c KL^a (:func:`fdt_curve`), fitted on the default
# model's exact int4:g64 sweep (210 cells, 8 'general' prompts, N = 16; bench/bench_estimate.py
# prints the fit): the curve used before three exact cells of a sweep are known
PRIOR_CURVE = (-0.85, 0.385)


@dataclass
class Fisher:
    """The diagonal Fisher of the selected weights over a prompt set's continuation positions."""

    diag: dict = field(default_factory=dict)   # (id of module, param name) -> tensor like param
    positions: int = 0
    seconds: float = 0.0
    probe: str = "gauss"

    def of(self, comp) -> torch.Tensor:
        return self.diag[(id(comp.module), comp.param)]


def fisher_diagonal(dense, prompt_ids: Sequence[Sequence[int]], references, comps, *,
                    batch_size: int = 16, probe: str = "gauss", seed: int = 0) -> Fisher:
    """One forward and one backward of the dense model per batch of prompt + reference
    sequences; the squared weight gradients of the probes at the continuation positions summed
    over batches (every parameter that ``comps`` touch, once)."""
    if probe not in PROBES:
        raise DTMError(f"Unknown probe '{probe}'; use one of {', '.join(PROBES)}.")
    model = dense.model
    params = {}
    for c in comps:
        params.setdefault((id(c.module), c.param), c.weight)
    if not params:
        raise DTMError("No components to estimate.")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    out = Fisher(probe=probe)
    was = {k: w.requires_grad for k, w in params.items()}
    frozen = [w for w in model.parameters() if w.requires_grad]
    try:
        for w in frozen:
            w.requires_grad_(False)
        for w in params.values():
            w.requires_grad_(True)
            w.grad = None
        for x_ids, rows, pos in probe_batches(dense, prompt_ids, references, batch_size):
            with torch.enable_grad(), head_at(model, rows, pos):
                logits = model(input_ids=x_ids, use_cache=False).logits
                z = logits[0].float()
                u = _probe(z, probe, gen)
                torch.autograd.backward((z * u).sum(), inputs=list(params.values()))
            for k, w in params.items():
                g = w.grad.detach().float()
                w.grad = None
                acc = out.diag.get(k)
                out.diag[k] = g.square_() if acc is None else acc.add_(g.square_())
            out.positions += len(rows)
            del logits, z, u
    finally:
        for w in params.values():
            w.grad = None
        for k, w in params.items():
            w.requires_grad_(was[k])
        for w in frozen:
            w.requires_grad_(True)
    out.seconds = time.perf_counter() - t0
    return out


def _weighted_change(comp, fisher_full: torch.Tensor, dense_w: torch.Tensor,
                     new_w: torch.Tensor) -> float:
    """sum F (W' - W)^2 over the matrices ``comp`` covers (its rows of a fused weight, its
    experts of a 3-D parameter)."""
    total = 0.0
    for f, a, b in zip(comp.matrices(fisher_full), comp.matrices(dense_w.detach()),
                       comp.matrices(new_w.detach())):
        d = b.float() - a.float()
        if comp.rows is not None:
            f, d = f[comp.rows], d[comp.rows]
        total += float((f * d.square_()).sum(dtype=torch.float64))
    return total


def estimate_rows(dense, fisher: Fisher, spec, comps, calibration=None) -> list[dict]:
    """Each component compressed alone with ``spec`` (on a shared copy, restored after): its
    estimated KL, 1/2 sum F (W' - W)^2 / positions."""
    from dtm_core.compression.pair import shared_copy
    from dtm_core.compression.recipe import Recipe, apply_recipe, gather_statistics
    from dtm_core.models.components import resolve

    work = shared_copy(dense.model)
    if calibration is not None:     # every cell's statistics in one pass, as sweeps do
        gather_statistics(work, [(c, spec) for c in comps], calibration)
    rows = []
    for comp in comps:
        with apply_recipe(work, Recipe.single(spec, comp.name), calibration):
            new = resolve(work, comp.name)[0]
            s = _weighted_change(comp, fisher.of(comp), comp.weight, new.weight)
        rows.append({"layer": comp.layer, "kind": comp.kind, "component": comp.name,
                     "params": comp.params,
                     "kl_estimate": 0.5 * s / max(fisher.positions, 1)})
    return rows


def expected_fdt(q, new_tokens: int):
    """E[min(FDT, N)] when each position's argmax flips with probability ``q`` on its own:
    sum_{t=1..N} (1 - q)^t."""
    q = np.clip(np.asarray(q, dtype=float), 1e-12, 1.0)
    return (1.0 - q) * (1.0 - (1.0 - q) ** new_tokens) / q


def fdt_curve(exact: pd.DataFrame | None, new_tokens: int) -> tuple[float, float, int]:
    """(log c, a, cells): a position flips with probability q = c KL^a, so that the mean FDT is
    :func:`expected_fdt` (which carries the curve across N); fitted by least squares in FDT on
    the exact cells with KL > 0, or the prior :data:`PRIOR_CURVE` while fewer than three such
    cells (with distinct KL) exist."""
    if exact is None or exact.empty:
        return (*PRIOR_CURVE, 0)
    ok = exact[(exact.kl_mean > 0) & exact.fdt_mean.notna()]
    if len(ok) < 3 or ok.kl_mean.nunique() < 2:
        return (*PRIOR_CURVE, 0)
    lkl = np.log(ok.kl_mean.to_numpy(float))
    fdt = ok.fdt_mean.to_numpy(float)
    best = (np.inf, *PRIOR_CURVE)
    for a in np.linspace(0.1, 2.0, 39):              # a coarse grid, then a finer one around it
        for lc in np.linspace(-12, 8, 201):
            err = float(np.square(expected_fdt(np.exp(lc + a * lkl), new_tokens) - fdt).sum())
            if err < best[0]:
                best = (err, lc, a)
    _, lc0, a0 = best
    for a in np.linspace(max(a0 - 0.05, 0.01), a0 + 0.05, 21):
        for lc in np.linspace(lc0 - 0.1, lc0 + 0.1, 41):
            err = float(np.square(expected_fdt(np.exp(lc + a * lkl), new_tokens) - fdt).sum())
            if err < best[0]:
                best = (err, lc, a)
    return float(best[1]), float(best[2]), len(ok)


def fdt_from_kl(kl, curve, new_tokens: int):
    """The mean FDT the curve gives for KL values (N where the KL is 0)."""
    lc, a = curve[0], curve[1]
    kl = np.asarray(kl, dtype=float)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        q = np.exp(lc + a * np.log(np.where(kl > 0, kl, 1.0)))
        return np.where(kl > 0, expected_fdt(q, new_tokens), float(new_tokens))


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 3 pairs."""
    a, b = pd.Series(list(a), dtype=float), pd.Series(list(b), dtype=float)
    ok = a.notna() & b.notna()
    if ok.sum() < 3:
        return float("nan")
    return float(a[ok].rank().corr(b[ok].rank()))


def agreement(table: pd.DataFrame) -> dict:
    """Spearman's rank correlation of estimate and exact over a table's exact cells: KL, and
    FDT (the FDT estimate's order is the KL estimate's reversed)."""
    ex = table[table.exact]
    return {"cells": int(len(ex)), "spearman_kl": spearman(ex.kl_estimate, ex.kl_mean),
            "spearman_fdt": spearman(ex.fdt_estimate, ex.fdt_mean)}


@dataclass
class EstimateResult:
    table: pd.DataFrame            # ESTIMATE_COLUMNS, model order
    seconds: float
    fisher_seconds: float
    positions: int
    probe: str
    curve: tuple                   # (A, B, exact cells it was fitted on)
    references: list = field(default_factory=list)   # the dense continuations it used
    exact: pd.DataFrame | None = None   # the exact cells the sweep's store held (cell columns)

    def agreement(self) -> dict:
        return agreement(self.table)

    def refinement_order(self) -> list[str]:
        """Component names not yet exact, most sensitive by estimate first."""
        t = self.table[~self.table.exact].sort_values("kl_estimate", ascending=False)
        return list(t.component)


def finish_table(rows: list[dict], exact: pd.DataFrame | None, new_tokens: int) -> tuple:
    """The estimate table with each cell's exact values where the store has them, and the FDT
    estimate from the curve fitted on those."""
    t = pd.DataFrame(rows)
    curve = fdt_curve(exact, new_tokens)
    t["fdt_estimate"] = fdt_from_kl(t.kl_estimate, curve, new_tokens)
    if exact is not None and not exact.empty:
        ex = exact.set_index("component")[["kl_mean", "fdt_mean"]]
        t = t.join(ex, on="component")
    else:
        t["kl_mean"] = np.nan
        t["fdt_mean"] = np.nan
    t["exact"] = t.kl_mean.notna()
    return t[ESTIMATE_COLUMNS], curve


def save_estimate(cells, res: EstimateResult) -> None:
    """The estimates beside the exact cells of the same sweep (``estimate-PROBE.json`` in its
    store folder)."""
    cells.write_json(f"estimate-{res.probe}.json", {
        "probe": res.probe, "positions": res.positions, "fisher_seconds": res.fisher_seconds,
        "seconds": res.seconds, "curve": list(res.curve),
        "cells": json.loads(res.table[["component", "kl_estimate"]].to_json(orient="records"))})


class Settled:
    """``sweep(until=...)`` for refinement: the ranking's top ``k`` is settled once the ``k``
    most sensitive exact cells (by exact KL) have stayed the same over the last ``window``
    exact cells (default max(k, 3)). Cells come most sensitive by estimate first, so a top
    that no later cell enters is the one a full sweep would give unless the estimate ranks a
    sensitive cell far too low."""

    def __init__(self, k: int, window: int | None = None):
        if k < 1:
            raise DTMError("The settled top-k needs k >= 1.")
        self.k, self.window = k, window or max(k, 3)
        self.kl: dict[str, float] = {}
        self.top: tuple = ()
        self.same = 0

    def __call__(self, row: dict) -> bool:
        self.kl[row["component"]] = float(row["kl_mean"])
        top = tuple(sorted(sorted(self.kl, key=self.kl.get, reverse=True)[:self.k]))
        self.same = self.same + 1 if top == self.top and len(top) == self.k else 0
        self.top = top
        return self.same >= self.window


_FISHER: dict = {}     # the last Fisher diagonal, for more specs over the same prompts


def _fisher_for(dense, prompt_ids, references, comps, batch_size, probe, seed) -> Fisher:
    key = (dense.fingerprint, json.dumps(prompt_ids), json.dumps(references), probe, seed,
           tuple(sorted({(c.path, c.param) for c in comps})), batch_size)
    hit = _FISHER.get("key") == key and _FISHER.get("model") is dense.model
    if not hit:
        _FISHER.clear()
        _FISHER.update(key=key, model=dense.model,
                       fisher=fisher_diagonal(dense, prompt_ids, references, comps,
                                              batch_size=batch_size, probe=probe, seed=seed))
    return _FISHER["fisher"]


def estimate_sweep(dense, spec: str, prompt_ids: Sequence[Sequence[int]], new_tokens: int, *,
                   layers: str | None = None, kinds: str | None = None, cache_dir=None,
                   batch_size: int = 16, probe: str = "gauss", seed: int = 0,
                   calibration=None, references=None, intactkv=None,
                   progress=None) -> EstimateResult:
    """Every selected cell's estimated KL and FDT (see the module), with the exact values of
    the cells the sweep's store already holds (the same key as :func:`sweep`), stored beside
    them. The dense references are computed unless given; the Fisher diagonal is reused for
    another spec over the same prompts and components."""
    from dtm_core.analysis.sweep.run import select_components, sweep_store
    from dtm_core.analysis.sweep.cell import cell_columns
    from dtm_core.compression.intactkv import IntactKV
    from dtm_core.compression.recipe import parse_spec
    from dtm_core.measure.divergence import reference_continuations

    t0 = time.perf_counter()
    note = progress or (lambda f, m: None)
    sp = parse_spec(spec)
    ikv = IntactKV.parse(intactkv)
    prompt_ids = [list(p) for p in prompt_ids]
    comps = select_components(dense.model, layers, kinds, spec)
    _, cells, calib = sweep_store(dense, spec, prompt_ids, new_tokens, ikv, calibration,
                                  cache_dir)
    if references is None:
        note(0.0, "dense references")
        references = reference_continuations(dense, prompt_ids, new_tokens, batch_size)
    note(0.2, f"Fisher diagonal of {len(comps)} components (one forward and backward a batch)")
    refs = [list(r) for r in references]
    if sp.targets_cache:        # the Fisher of the stored entries (estimate_kv)
        from dtm_core.analysis.sweep.estimate_kv import cache_fisher_for, cache_rows

        fisher = cache_fisher_for(dense, prompt_ids, refs, comps, batch_size, probe, seed)
        note(0.7, f"estimating {len(comps)} cells")
        rows = cache_rows(dense, fisher, sp, comps, calib)
        fisher = Fisher(positions=fisher["positions"], seconds=fisher["seconds"], probe=probe)
    else:
        fisher = _fisher_for(dense, prompt_ids, refs, comps, batch_size, probe, seed)
        note(0.7, f"estimating {len(comps)} cells")
        rows = estimate_rows(dense, fisher, sp, comps, calib)
    stored = [r for r in (cells.get(c.name) for c in comps) if r is not None]
    exact = pd.DataFrame(stored, columns=cell_columns()) if stored else None
    table, curve = finish_table(rows, exact, new_tokens)
    res = EstimateResult(table=table, seconds=time.perf_counter() - t0,
                         fisher_seconds=fisher.seconds, positions=fisher.positions, probe=probe,
                         curve=curve, references=[list(r) for r in references], exact=exact)
    save_estimate(cells, res)
    note(1.0, f"estimated {len(comps)} cells in {res.seconds:.1f} s")
    return res
