"""The diagnostics engineers compare quantizations with (exllamav3's ``model_diff``, llama.cpp's
perplexity tool), as registered metrics beside the divergent-token ones: top-K agreement (the
dense token among the compressed model's K most likely; the overlap of the two top-K sets), reverse
KL and Jensen-Shannon (optional metrics: computed wherever the two distributions are at hand), and
KL bucketed by the dense model's confidence in its top token (a table over a prompt set or a
scored text). Imported with :mod:`dtm_core.measure`, so every view has them.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from dtm_core.measure.metrics import (Aggregate, Column, TokenMetric, TokenMetrics, _mean,
                                      kl_per_position, register_metric)


TOP_K = (1, 5, 10)


def _topk_values(t: TokenMetrics) -> torch.Tensor:
    """Per position, for K in TOP_K: whether the dense token (the reference) is among the
    compressed model's K most likely, then the overlap |top-K dense ∩ top-K compressed| / K.
    K = 1 uses the argmaxes (exactly agreement and top-1 agreement); NaN without top lists."""
    n = len(t.ref)
    hits = [(t.comp_argmax == t.ref).double()]
    over = [(t.comp_argmax == t.dense_argmax).double()]
    for k in TOP_K[1:]:
        if t.comp_top is None or t.dense_top is None:
            hits.append(torch.full((n,), float("nan"), dtype=torch.float64))
            over.append(torch.full((n,), float("nan"), dtype=torch.float64))
            continue
        c, d = t.comp_top[:, :k], t.dense_top[:, :k]
        hits.append((c == t.ref[:, None]).any(-1).double())
        over.append((d[:, :, None] == c[:, None, :]).any(-1).sum(-1).double() / k)
    return torch.stack(hits + over, -1) if n else torch.zeros(0, 2 * len(TOP_K))


def _col_mean(j):
    return lambda v, t: v[:, j].mean()


register_metric(TokenMetric(
    "topk", _topk_values,
    tuple(Column(f"top{k}_hit", _col_mean(j), 1.0,
                 f"dense token in the compressed top {k}") for j, k in enumerate(TOP_K))
    + tuple(Column(f"top{k}_overlap", _col_mean(len(TOP_K) + j), 1.0,
                   f"top-{k} overlap") for j, k in enumerate(TOP_K)),
    tuple(Aggregate(f"top{k}_hit_mean", _mean(f"top{k}_hit"), f"dense token in top {k}",
                    (f"top{k}_hit",), True) for k in TOP_K)
    + tuple(Aggregate(f"top{k}_overlap_mean", _mean(f"top{k}_overlap"), f"top-{k} overlap",
                      (f"top{k}_overlap",), True) for k in TOP_K),
    description="top-K agreement: the dense token among the compressed model's K most likely, "
                "and the overlap of the two models' top-K sets (K = 1, 5, 10)"))


def _reverse_kl(t: TokenMetrics) -> torch.Tensor:
    return kl_per_position(t.comp_logp, t.dense_logp)


def _js(t: TokenMetrics) -> torch.Tensor:
    """Jensen-Shannon divergence (nats): the mean KL of each distribution from their average."""
    m = torch.logaddexp(t.dense_logp, t.comp_logp) - math.log(2.0)
    return (0.5 * (kl_per_position(t.dense_logp, m) + kl_per_position(t.comp_logp, m))).clamp(
        min=0)


def _on_distributions(name: str, per_token, label: str, short: str, description: str) -> None:
    """An optional metric of the two full distributions: per-prompt column ``{name}_mean`` and
    its set mean of the same name."""
    col = f"{name}_mean"
    register_metric(TokenMetric(
        name, per_token, (Column(col, lambda v, t: v.mean(), 0.0, label),),
        (Aggregate(col, _mean(col), short, (col,)),), needs_distributions=True, optional=True,
        description=description))


_on_distributions("reverse_kl", _reverse_kl, "mean reverse KL (nats)", "reverse KL",
                  "KL(compressed || dense): heavy where the compressed model is confident and "
                  "the dense one is not")
_on_distributions("js", _js, "mean Jensen-Shannon divergence (nats)", "Jensen-Shannon",
                  "Jensen-Shannon divergence of the two next-token distributions (symmetric, "
                  "at most ln 2)")


CONFIDENCE_EDGES = (0.0, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)


def kl_by_confidence(kl, p_top, agree=None, edges=CONFIDENCE_EDGES) -> pd.DataFrame:
    """KL bucketed by the dense model's probability of its most likely token, per position:
    where the damage sits (a near-certain dense token that the compressed model doubts, or
    positions that were uncertain anyway). One row per bucket [lo, hi) (the last closed):
    positions, their share, mean KL, their share of the total KL and, with ``agree`` (the
    compressed argmax equals the dense token), the agreement there."""
    kl = np.asarray(kl, dtype=float)
    p = np.asarray(p_top, dtype=float)
    ok = None if agree is None else np.asarray(agree, dtype=float)
    total, n = float(kl.sum()), len(kl)
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        sel = (p >= lo) & ((p <= hi) if last else (p < hi))
        m = int(sel.sum())
        row = {"bucket": f"{lo:g}-{hi:g}", "p_lo": lo, "p_hi": hi, "positions": m,
               "share": m / n if n else 0.0,
               "kl_mean": float(kl[sel].mean()) if m else float("nan"),
               "kl_share": float(kl[sel].sum()) / total if total > 0 else 0.0}
        if ok is not None:
            row["agree"] = float(ok[sel].mean()) if m else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def confidence_arrays(tokens: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(KL, dense top-token probability, agreement) at every position of a prompt set's
    TokenMetrics, as arrays (what :func:`kl_by_confidence` takes)."""
    tms = [t for t in tokens if t is not None and t.lp_dense_top is not None and len(t.ref)]
    if not tms:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return (torch.cat([t.kl for t in tms]).double().numpy(),
            torch.cat([t.lp_dense_top for t in tms]).exp().numpy(),
            torch.cat([t.agree for t in tms]).double().numpy())


def tokens_by_confidence(tokens: list) -> pd.DataFrame:
    """:func:`kl_by_confidence` over every position of a prompt set's TokenMetrics."""
    return kl_by_confidence(*confidence_arrays(tokens))
