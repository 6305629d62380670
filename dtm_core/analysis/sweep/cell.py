"""One sweep cell's numbers: the compressed model's continuation logits from the recorded layer
inputs, reduced chunk by chunk to the registered metrics' primitives (the fast path forms KL from
the dense side's ``p_dense @ W_head``), per-prompt columns, the cell's aggregates, its component's
weight error, and the layers x kinds view of a sweep table.
"""
from __future__ import annotations

import pandas as pd
import torch

from dtm_core.analysis.sweep.record import SweepContext, continuation_hidden
from dtm_core.errors import DTMError
from dtm_core.measure.metrics import (TokenMetrics, aggregate, aggregates, concat, primitives,
                                      run_metrics, slice_tokens)
from dtm_core.models.families import family_of


CELL_COLUMNS = ["layer", "kind", "component", "params", "fdt_mean", "fdt_median", "fdt_p25",
                "sdt_mean", "kl_mean", "ppl_change", "weight_error", "output_sqnr_db",
                "output_cos_error", "seconds"]
WHOLE = "__all__"     # the store's name for every selected component compressed at once


def cell_columns() -> list[str]:
    """A cell's columns: the documented ones, then every other registered aggregate."""
    extra = [k for k in aggregates() if k not in CELL_COLUMNS]
    return CELL_COLUMNS[:-1] + extra + CELL_COLUMNS[-1:]


def weight_error(dense_model, model, name: str) -> float:
    """Relative weight error ||W - W'|| / ||W|| of component ``name`` (Frobenius norm over every
    matrix it covers) between the dense model and ``model`` (a shared copy with it changed)."""
    from dtm_core.models.components import resolve

    num = den = 0.0
    for dc, wc in zip(resolve(dense_model, name), resolve(model, name)):
        for a, b in zip(dc.matrices(dc.weight), wc.matrices(wc.weight)):
            if dc.rows is not None:
                a, b = a[dc.rows], b[dc.rows]
            a = a.detach().double()
            num += float((b.detach().double() - a).pow(2).sum())
            den += float(a.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def heatmap_metrics() -> dict[str, str]:
    """Aggregate key -> label, for every value a cell has (from the metric registry), and the
    component's relative weight error."""
    from dtm_core.measure.metrics import METRICS

    # optional metrics (reverse KL, JS) are not in a fast-path sweep's cells: not offered
    optional = {a.name for m in METRICS.values() if m.optional for a in m.aggregates}
    return {**{k: a.label for k, a in aggregates().items() if k not in optional},
            "weight_error": "relative weight error ||W - W'|| / ||W||",
            "output_sqnr_db": "output SQNR (dB) of the component",
            "output_cos_error": "output cosine error of the component"}


ROW_CHUNK = 128  # LM-head rows per step: each chunk's logits are reduced while still in cache


def _chunk_tokens(model, fam, ctx: SweepContext, b: int, h: torch.Tensor, sl: slice
                  ) -> TokenMetrics:
    """The primitives of one chunk of continuation positions (see :mod:`dtm_core.measure.metrics`)."""
    logits = fam.logits(model, h).float()
    ref = ctx.refs[b][sl]
    top, arg = logits.max(-1)
    piv = ctx.pivot_rows[b][sl] if ctx.intactkv is not None else None
    if not ctx.fast:
        d = torch.log_softmax(ctx.dense_logits[b][sl].double(), -1)
        c = torch.log_softmax(logits.double(), -1)
        d_arg = ctx.dense_argmax[b][sl]
        if piv is not None:   # positions inside the pivot span are the dense model's
            c = torch.where(piv[:, None], d, c)
            arg = torch.where(piv, d_arg, arg)
        return run_metrics(primitives(d, c, ref, ctx.new_tokens, d_arg, arg), distributions=True)
    comp_top = logits.topk(ctx.dense_top[b].shape[-1], -1).indices
    z_ref = logits.gather(-1, ref[:, None])[:, 0].double()
    # exp and its (cascade) sum in float32 are accurate to ~1e-7 for terms <= 1; the KL below is
    # a difference of terms the size of the logits, so it is formed in float64
    lse = top.double() + logits.sub_(top[:, None]).exp_().sum(-1).double().log_()
    dot = torch.linalg.vecdot(ctx.dense_pw[b][sl], h.double())
    if ctx.dense_pb[b] is not None:
        dot = dot + ctx.dense_pb[b][sl]
    kl = (ctx.dense_negent[b][sl] - dot + lse).clamp(min=0)
    lp_d, lp_c = ctx.dense_lp_ref[b][sl], z_ref - lse
    d_arg, d_top = ctx.dense_argmax[b][sl], ctx.dense_top[b][sl]
    if piv is not None:       # positions inside the pivot span are the dense model's
        arg = torch.where(piv, d_arg, arg)
        kl = torch.where(piv, torch.zeros_like(kl), kl)
        lp_c = torch.where(piv, lp_d, lp_c)
        comp_top = torch.where(piv[:, None], d_top, comp_top)
    return TokenMetrics(ref=ref.cpu(), dense_argmax=d_arg.cpu(), comp_argmax=arg.cpu(),
                        kl=kl.float().cpu(), lp_dense=lp_d.cpu(), lp_comp=lp_c.cpu(),
                        n_new=ctx.new_tokens, dense_top=d_top.cpu(), comp_top=comp_top.cpu(),
                        lp_dense_top=ctx.dense_lp_top[b][sl].cpu())


@torch.no_grad()
def cell_table(model, ctx: SweepContext, start: int, on_batch=None) -> pd.DataFrame:
    """Per-prompt metric columns of ``model`` (compressed at layer ``start`` or later) against the
    dense model: the registered metrics on the same primitives as :func:`token_metrics`.

    Fast path, per position: argmax and max in one pass, log-sum-exp from that max, and
    KL(d || c) = sum_v p_d log p_d - (p_d @ W) . h_c - p_d . b + logsumexp(z_c).
    """
    head = model.get_output_embeddings()
    if head.weight is not ctx.head_weight:
        raise DTMError("The sweep's model has a different LM head from the one it was prepared "
                       "with.")
    fam = family_of(model)
    rows = []
    for b, idx in enumerate(ctx.batches):
        if on_batch is not None:      # e.g. the output error's scored positions of this batch
            on_batch(b)
        hidden = continuation_hidden(model, ctx, b, start)
        tm = concat([_chunk_tokens(model, fam, ctx, b, hidden[s:s + ROW_CHUNK],
                                   slice(s, s + ROW_CHUNK))
                     for s in range(0, len(hidden), ROW_CHUNK)], ctx.new_tokens)
        start_row = 0
        for i in idx:
            n = len(ctx.references[i])
            one = run_metrics(slice_tokens(tm, start_row, start_row + n), distributions=False)
            start_row += n
            rows.append({"prompt_index": i, **one.summary()})
    return pd.DataFrame(rows).sort_values("prompt_index").reset_index(drop=True)


def summarize_cell(t: pd.DataFrame) -> dict:
    """A cell's values: every registered aggregate over its per-prompt table."""
    agg = aggregate(t)
    return {k: agg[k] for k in aggregates() if k in agg}


def heatmap_frame(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """layers x kinds matrix of one metric (kinds in model order)."""
    kinds = list(dict.fromkeys(table.kind))
    return table.pivot(index="layer", columns="kind", values=metric)[kinds]
