"""The metric registry: each per-token metric defined once, and the views derive their columns.

Definitions (Deiseroth et al., NAACL 2024), for a reference continuation ``ref`` of L <= N tokens (the
dense model's greedy continuation, ending at the first EOS, EOS included):

* FDT: the number of leading positions where the compressed argmax equals ``ref``; N when all L agree
  (the two greedy outputs are then identical, both stopping at the same EOS or both running to N).
* SDT: the share of the L positions where the compressed argmax differs from ``ref``.

Every view (``divergence``, the sweep's cells, the live stream, ``evaluate``) first computes the same
per-position *primitives* of a pair on the dense reference (:class:`TokenMetrics`: both argmaxes,
KL(dense || compressed), both models' log-probability of the reference token), then runs every
registered :class:`TokenMetric` on them: a per-token function, per-prompt columns reduced from it,
and prompt-set aggregates over those columns. The sweep computes the primitives without
materializing vocabulary-sized distributions (its fast path: KL through ``p_dense @ W_head``), which
is exact for every metric that declares ``needs_distributions=False``; a metric that needs the two
full log-probability rows declares it, and every view then hands them over (the sweep keeps the
dense logits for it).

Register a metric with :func:`register_metric`; it appears in ``divergence`` tables, sweep cells,
stream steps and ``evaluate`` without touching those files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch


@dataclass
class TokenMetrics:
    """Per-position primitives over one continuation (tensors of length L, on the CPU), and each
    registered metric's per-token values (``values``)."""

    ref: torch.Tensor            # reference token ids
    dense_argmax: torch.Tensor
    comp_argmax: torch.Tensor
    kl: torch.Tensor             # KL(dense || compressed) per position, nats (formed in float64,
    #                              kept as float32 in every view)
    lp_dense: torch.Tensor       # log-probability each model gives the reference token (float64)
    lp_comp: torch.Tensor
    n_new: int
    values: dict = field(default_factory=dict, repr=False)   # metric name -> per-token tensor
    # the two log-probability rows (L, V), only while a metric that needs them runs
    dense_logp: torch.Tensor | None = field(default=None, repr=False)
    comp_logp: torch.Tensor | None = field(default=None, repr=False)
    # each model's TOPK most likely tokens (L, TOPK), most likely first, and log p of the dense
    # model's most likely token (its confidence); None where a view does not provide them
    dense_top: torch.Tensor | None = field(default=None, repr=False)
    comp_top: torch.Tensor | None = field(default=None, repr=False)
    lp_dense_top: torch.Tensor | None = field(default=None, repr=False)

    @property
    def p_dense_ref(self) -> torch.Tensor:
        return self.lp_dense.exp().float()

    @property
    def p_comp_ref(self) -> torch.Tensor:
        return self.lp_comp.exp().float()

    @property
    def agree(self) -> torch.Tensor:
        return self.comp_argmax == self.ref

    @property
    def fdt(self) -> int:
        return first_false(self.agree, self.n_new)

    @property
    def sdt(self) -> float:
        return int((~self.agree).sum()) / len(self.ref) if len(self.ref) else 0.0

    def summary(self) -> dict:
        """The per-prompt columns of every registered metric, and ``n_tokens``."""
        out = {}
        for m in METRICS.values():
            vals = self.values.get(m.name)
            if vals is None and m.needs_distributions:    # a view without the distributions
                continue
            if vals is None:
                vals = m.per_token(self)
            for col in m.columns:
                out[col.name] = col.value(vals, self)
        out["n_tokens"] = len(self.ref)
        if "fdt" in out:
            out["fdt"] = int(out["fdt"])
        return out


def first_false(ok: torch.Tensor, n_new: int) -> int:
    bad = (~ok).nonzero()
    return int(bad[0, 0]) if len(bad) else n_new


@dataclass(frozen=True)
class Column:
    """A per-prompt value of a metric: ``reduce(per-token values, TokenMetrics)``; ``empty`` (a
    number, or a function of the TokenMetrics) for a continuation of no tokens."""

    name: str
    reduce: Callable
    empty: float | Callable
    label: str

    def value(self, vals, tm: "TokenMetrics") -> float:
        if len(tm.ref) == 0:
            return self.empty(tm) if callable(self.empty) else self.empty
        return float(self.reduce(vals, tm))


@dataclass(frozen=True)
class Aggregate:
    """A prompt-set value over the per-prompt table (``fn(table)``), and how to show it."""

    name: str
    fn: Callable[[pd.DataFrame], float]
    label: str
    needs: tuple[str, ...]          # per-prompt columns it reads
    higher_is_better: bool = False


@dataclass(frozen=True)
class TokenMetric:
    name: str
    per_token: Callable[[TokenMetrics], torch.Tensor]
    columns: tuple[Column, ...]
    aggregates: tuple[Aggregate, ...] = ()
    needs_distributions: bool = False
    description: str = ""
    # True: computed wherever the two distributions are at hand (divergence, evaluate, the
    # stream), but a sweep keeps its fast path (no vocabulary-sized dense tensor per cell) and
    # leaves the metric out of its cells instead of giving the fast path up for it
    optional: bool = False


METRICS: dict[str, TokenMetric] = {}


def register_metric(metric: TokenMetric) -> TokenMetric:
    """Add (or replace, by name) a metric; every view picks it up."""
    METRICS[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    METRICS.pop(name, None)


def needs_distributions() -> bool:
    """Whether a metric that every view must compute needs the two full distributions."""
    return any(m.needs_distributions and not m.optional for m in METRICS.values())


def metric_columns() -> list[str]:
    return [c.name for m in METRICS.values() for c in m.columns]


def aggregates() -> dict[str, Aggregate]:
    return {a.name: a for m in METRICS.values() for a in m.aggregates}


def _mean(col):
    return lambda t: float(t[col].mean())


def _pct(q):
    return lambda t: float(np.percentile(t["fdt"].to_numpy(dtype=float), q))


register_metric(TokenMetric(
    "agree", lambda t: t.comp_argmax == t.ref,
    (Column("fdt", lambda v, t: first_false(v, t.n_new), lambda t: t.n_new,
            "first divergent token"),
     Column("sdt", lambda v, t: int((~v).sum()) / len(v), 0.0, "share of divergent tokens")),
    (Aggregate("fdt_mean", _mean("fdt"), "mean FDT", ("fdt",), True),
     Aggregate("fdt_p10", _pct(10), "p10 FDT", ("fdt",), True),
     Aggregate("fdt_p25", _pct(25), "p25 FDT", ("fdt",), True),
     Aggregate("fdt_median", _pct(50), "median FDT", ("fdt",), True),
     Aggregate("fdt_p75", _pct(75), "p75 FDT", ("fdt",), True),
     Aggregate("fdt_p90", _pct(90), "p90 FDT", ("fdt",), True),
     Aggregate("sdt_mean", _mean("sdt"), "SDT", ("sdt",))),
    description="the compressed argmax equals the dense reference token"))
register_metric(TokenMetric(
    "kl", lambda t: t.kl,
    (Column("kl_mean", lambda v, t: v.mean(), 0.0, "mean KL (nats)"),
     Column("kl_max", lambda v, t: v.max(), 0.0, "max KL (nats)")),
    (Aggregate("kl_mean", _mean("kl_mean"), "KL", ("kl_mean",)),
     Aggregate("kl_max", lambda t: float(t["kl_max"].max()), "max KL", ("kl_max",))),
    description="KL(dense || compressed) of the next-token distributions"))
register_metric(TokenMetric(
    "top1", lambda t: t.dense_argmax == t.comp_argmax,
    (Column("top1_agree", lambda v, t: v.double().mean(), 1.0, "top-1 agreement"),),
    (Aggregate("top1_agree_mean", _mean("top1_agree"), "top-1 agreement", ("top1_agree",),
               True),),
    description="the two models' argmaxes agree"))
register_metric(TokenMetric(
    "dp_ref", lambda t: t.lp_comp.exp() - t.lp_dense.exp(),
    (Column("dp_ref_mean", lambda v, t: v.mean(), 0.0, "mean Δp of the reference token"),),
    description="change in the probability of the dense reference token"))
register_metric(TokenMetric(
    "nll", lambda t: torch.stack([-t.lp_dense, -t.lp_comp], -1),
    (Column("ppl_dense", lambda v, t: v[:, 0].mean().exp(), float("nan"), "perplexity, dense"),
     Column("ppl_compressed", lambda v, t: v[:, 1].mean().exp(), float("nan"),
            "perplexity, compressed")),
    (Aggregate("ppl_change", lambda t: float((t["ppl_compressed"] / t["ppl_dense"] - 1).mean()),
               "perplexity change", ("ppl_dense", "ppl_compressed")),),
    description="negative log-likelihood of the reference (perplexity on the continuation)"))
register_metric(TokenMetric(
    "dense_self_agree", lambda t: t.dense_argmax == t.ref,
    # the dense model's teacher-forced argmax should reproduce its own greedy output; less than 1
    # flags numerical near-ties between the cached and the full forward pass
    (Column("dense_self_agree", lambda v, t: v.double().mean(), 1.0, "dense self-agreement"),),
    description="the dense teacher-forced argmax reproduces the reference"))


ACCEPT_K = (1, 2, 4, 8, 16)


def acceptance(agree, k: int) -> tuple[int, int, int]:
    """(accepted, proposed, steps) when the compressed model drafts ``k`` tokens at a time for the
    dense one under greedy verification, from the teacher-forced agreement of each reference
    position (``agree``: the compressed argmax on the dense prefix equals the dense token).

    The output is the dense continuation; at each step the draft proposes min(k, tokens left) from
    the dense prefix (its proposals are its teacher-forced argmaxes as long as they are accepted),
    the verifier accepts the leading proposals equal to the dense tokens and adds its own token
    (not counted as accepted); steps go on until the continuation is complete."""
    ok = agree.tolist() if hasattr(agree, "tolist") else list(agree)
    n, p = len(ok), 0
    accepted = proposed = steps = 0
    while p < n:
        m = min(k, n - p)
        a = 0
        while a < m and ok[p + a]:
            a += 1
        accepted, proposed, steps = accepted + a, proposed + m, steps + 1
        p += a + 1
    return accepted, proposed, steps


def _accept_len(k):
    def f(v, t):
        a, _, steps = acceptance(v, k)
        return a / steps
    return f


def _accept_rate(k):
    def f(v, t):
        a, prop, _ = acceptance(v, k)
        return a / prop
    return f


register_metric(TokenMetric(
    "accept", lambda t: t.comp_argmax == t.ref,
    tuple(Column(f"accept_len_k{k}", _accept_len(k), 0.0,
                 f"mean accepted draft tokens per step, drafting {k}") for k in ACCEPT_K)
    + tuple(Column(f"accept_rate_k{k}", _accept_rate(k), 0.0,
                   f"share of {k}-token drafts' tokens accepted") for k in ACCEPT_K),
    tuple(Aggregate(f"accept_len_k{k}_mean", _mean(f"accept_len_k{k}"),
                    f"accepted per step (K={k})", (f"accept_len_k{k}",), True) for k in ACCEPT_K)
    + tuple(Aggregate(f"accept_rate_k{k}_mean", _mean(f"accept_rate_k{k}"),
                      f"acceptance rate (K={k})", (f"accept_rate_k{k}",), True)
            for k in ACCEPT_K),
    description="self-speculative decoding with the compressed model as the draft: exact "
                "greedy acceptance of K-token drafts, from the teacher-forced agreement"))


TOPK = 10                     # top tokens kept per position for the top-K metrics


def kl_per_position(d_logp: torch.Tensor, c_logp: torch.Tensor) -> torch.Tensor:
    """KL(P_d || P_c) = sum_v p_d (log p_d - log p_c) for each row of two log-softmax tensors."""
    p = d_logp.exp()
    terms = p * (d_logp - c_logp)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1).clamp(min=0)


def primitives(d_logp: torch.Tensor, c_logp: torch.Tensor, ref: torch.Tensor, n_new: int,
               dense_argmax: torch.Tensor | None = None, comp_argmax: torch.Tensor | None = None
               ) -> TokenMetrics:
    """Primitives (with the distributions attached) from two float64 log-softmax tensors (L, V);
    argmaxes default to the log-probabilities' (equal to the raw logits' argmax)."""
    idx = ref.to(d_logp.device)[:, None]
    k = min(TOPK, d_logp.shape[-1])
    return TokenMetrics(
        ref=ref.cpu(),
        dense_argmax=(d_logp.argmax(-1) if dense_argmax is None else dense_argmax).cpu(),
        comp_argmax=(c_logp.argmax(-1) if comp_argmax is None else comp_argmax).cpu(),
        kl=kl_per_position(d_logp, c_logp).float().cpu(), lp_dense=d_logp.gather(-1, idx)[:, 0].cpu(),
        lp_comp=c_logp.gather(-1, idx)[:, 0].cpu(), n_new=n_new, dense_logp=d_logp,
        comp_logp=c_logp, dense_top=d_logp.topk(k, -1).indices.cpu(),
        comp_top=c_logp.topk(k, -1).indices.cpu(), lp_dense_top=d_logp.max(-1).values.cpu())


def run_metrics(tm: TokenMetrics, distributions: bool) -> TokenMetrics:
    """Fill ``tm.values`` with the metrics that need distributions (``distributions``: tm carries
    them) or with the others."""
    for m in METRICS.values():
        if m.needs_distributions == distributions:
            tm.values[m.name] = m.per_token(tm).cpu()
    return tm


_OPTIONAL_FIELDS = ("dense_top", "comp_top", "lp_dense_top")


def concat(parts: list[TokenMetrics], n_new: int) -> TokenMetrics:
    """One TokenMetrics from consecutive chunks (distributions dropped, values joined)."""
    if not parts:
        empty_l, empty_f = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        tm = TokenMetrics(empty_l, empty_l, empty_l, empty_f.float(), empty_f, empty_f, n_new)
        for m in METRICS.values():
            if m.needs_distributions:
                tm.values[m.name] = torch.zeros(0)
        return tm
    cat = {f: torch.cat([getattr(p, f) for p in parts]) for f in
           ("ref", "dense_argmax", "comp_argmax", "kl", "lp_dense", "lp_comp")}
    for f in _OPTIONAL_FIELDS:
        if all(getattr(p, f) is not None for p in parts):
            cat[f] = torch.cat([getattr(p, f) for p in parts])
    tm = TokenMetrics(**cat, n_new=n_new)
    for name in parts[0].values:
        tm.values[name] = torch.cat([p.values[name] for p in parts])
    return tm


def slice_tokens(tm: TokenMetrics, a: int, b: int) -> TokenMetrics:
    """Positions a..b-1 of a TokenMetrics (values included, distributions dropped)."""
    out = TokenMetrics(tm.ref[a:b], tm.dense_argmax[a:b], tm.comp_argmax[a:b], tm.kl[a:b],
                       tm.lp_dense[a:b], tm.lp_comp[a:b], tm.n_new,
                       **{f: getattr(tm, f)[a:b] for f in _OPTIONAL_FIELDS
                          if getattr(tm, f) is not None})
    out.values = {k: v[a:b] for k, v in tm.values.items()}
    return out


METRIC_CHUNK = 64  # positions per float64 log-softmax (bounds memory for large vocabularies)


def token_metrics(dense_logits: torch.Tensor, comp_logits: torch.Tensor, ref: torch.Tensor,
                  n_new: int) -> TokenMetrics:
    """Every metric from the logits that predict each reference token (shape (L, V) each).

    Argmaxes are taken on the raw logits, exactly as greedy decoding picks its token. KL and
    probabilities come from float64 log-softmaxes: in float32 the log-normalizer of logits around
    30 carries an error of a few 1e-6, the size of a mild compression's KL.
    """
    ref = ref.to(dense_logits.device)
    parts = []
    for s in range(0, len(ref), METRIC_CHUNK):
        d = torch.log_softmax(dense_logits[s:s + METRIC_CHUNK].double(), -1)
        c = torch.log_softmax(comp_logits[s:s + METRIC_CHUNK].double(), -1)
        parts.append(run_metrics(primitives(
            d, c, ref[s:s + METRIC_CHUNK], n_new, dense_logits[s:s + METRIC_CHUNK].argmax(-1),
            comp_logits[s:s + METRIC_CHUNK].argmax(-1)), distributions=True))
    return run_metrics(concat(parts, n_new), distributions=False)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of targets; NaN when there is nothing to score."""
    if len(targets) == 0:
        return float("nan")
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets.to(logits.device)[:, None])
    return float(torch.exp(-logp.double().mean()))


def aggregate(df: pd.DataFrame) -> dict:
    """Prompt-set aggregates of a per-prompt table: every registered aggregate whose columns the
    table has (FDT distribution, mean SDT, mean KL, ...). ``ppl_ratio_mean`` (= 1 +
    ``ppl_change``) is kept for scripts written before the perplexity change had one name."""
    if df.empty:
        return {"prompts": 0}
    out = {"prompts": int(len(df))}
    for a in aggregates().values():
        if set(a.needs) <= set(df.columns):
            out[a.name] = a.fn(df)
    if "ppl_change" in out:
        out["ppl_ratio_mean"] = out["ppl_change"] + 1
    return out


def survival_curve(fdt, n_new: int) -> pd.DataFrame:
    """Share of prompts with no divergence up to and including position t, for t = 0..N-1."""
    fdt = np.asarray(fdt, dtype=float)
    t = np.arange(n_new)
    share = (fdt[None, :] > t[:, None]).mean(axis=1) if len(fdt) else np.zeros(n_new)
    return pd.DataFrame({"position": t, "surviving": share})
