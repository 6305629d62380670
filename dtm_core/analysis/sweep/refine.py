"""Progressive refinement: every cell estimated at once (:mod:`.estimate`), then exact cells in
place of estimated ones, most sensitive by estimate first, until all are exact, a number of them
is, or the top-k ranking is settled (:class:`~dtm_core.analysis.sweep.estimate.Settled`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd

from dtm_core.analysis.sweep.cell import cell_columns
from dtm_core.analysis.sweep.estimate import (EstimateResult, Settled, agreement, estimate_sweep,
                                              fdt_curve, fdt_from_kl)
from dtm_core.analysis.sweep.run import SweepResult, sweep

KEYS = ["layer", "kind", "component", "params"]


def merged_table(est: pd.DataFrame, exact: pd.DataFrame | None, new_tokens: int) -> pd.DataFrame:
    """One row per estimated cell, model order: its estimate (``kl_estimate``,
    ``fdt_estimate`` from the curve fitted on the exact cells), ``exact`` (whether it was
    measured), and every exact column where it was (empty otherwise)."""
    ex = exact if exact is not None and not exact.empty else None
    curve = fdt_curve(ex, new_tokens)
    out = est[KEYS + ["kl_estimate"]].copy()
    out["fdt_estimate"] = fdt_from_kl(out.kl_estimate, curve, new_tokens)
    cols = [c for c in cell_columns() if c not in KEYS]
    if ex is not None:
        out = out.join(ex.set_index("component")[cols], on="component")
    else:
        for c in cols:
            out[c] = float("nan")
    out.insert(6, "exact", out.kl_mean.notna())
    return out


@dataclass
class Refined:
    estimate: EstimateResult
    sweep: SweepResult | None      # None when no exact cell was asked for
    table: pd.DataFrame            # :func:`merged_table`
    new_tokens: int

    def agreement(self) -> dict:
        """Spearman's rank correlation of estimate and exact over the cells measured exactly."""
        return agreement(self.table)


def estimate_and_refine(dense, spec: str, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
                        *, refine: int | None = 0, settle: int | None = None,
                        probe: str = "gauss", seed: int = 0,
                        on_estimate: Callable[[pd.DataFrame], None] | None = None,
                        on_table: Callable[[pd.DataFrame], None] | None = None,
                        progress=None, stop=None, **kw) -> Refined:
    """Estimates of every selected cell, then up to ``refine`` exact cells (None: all) most
    sensitive by estimate first, stopping early once the top-``settle`` is settled (with
    ``settle`` and ``refine`` 0: as many as that takes).
    ``on_estimate`` sees the estimated table at once, ``on_table`` the merged table after each
    exact cell; ``kw`` as for :func:`~dtm_core.analysis.sweep.sweep` (layers, kinds, cache_dir,
    batch_size, calibration, intactkv)."""
    given = kw.pop("ctx", None)     # a prepared context (its references serve the estimate)
    est_kw = {k: v for k, v in kw.items() if k in ("layers", "kinds", "cache_dir", "batch_size",
                                                   "calibration", "intactkv")}
    if given is not None:
        est_kw["references"] = given.references
    est = estimate_sweep(dense, spec, prompt_ids, new_tokens, probe=probe, seed=seed,
                         progress=progress, **est_kw)
    exact_rows = est.table[est.table.exact].component.tolist()
    table = merged_table(est.table, est.exact, new_tokens)
    if on_estimate is not None:
        on_estimate(table)
    if refine == 0 and settle is None:
        return Refined(est, None, table, new_tokens)
    if settle and refine == 0:      # until settled, however many cells that takes
        refine = None
    order = est.refinement_order()
    todo = set(order if refine is None else order[:refine])
    done: dict[str, dict] = {}
    stopper = Settled(settle) if settle else None

    def until(row) -> bool:
        done[row["component"]] = row
        if stopper is not None and stopper(row):
            return True
        return refine is not None and len([c for c in done if c in todo]) >= len(todo)

    def on_cell(row):
        if on_table is not None:
            rows = pd.DataFrame(list(done.values()) + [row], columns=cell_columns())
            on_table(merged_table(est.table, rows.drop_duplicates("component", keep="last"),
                                  new_tokens))

    names = exact_rows + order          # stored cells first, then by estimate
    ctx = given
    if ctx is None and order and (refine is None or refine > 0 or settle):
        from dtm_core.analysis.sweep.record import prepare

        ctx = prepare(dense, prompt_ids, new_tokens, kw.get("batch_size", 16),
                      references=est.references, intactkv=kw.get("intactkv"))
    res = sweep(dense, spec, prompt_ids, new_tokens, order=names, until=until, on_cell=on_cell,
                progress=progress, stop=stop, ctx=ctx, **kw)
    return Refined(est, res, merged_table(est.table, res.table, new_tokens), new_tokens)

