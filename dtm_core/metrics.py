"""Teacher-forced token metrics from two logit tensors: FDT, SDT, KL, top-1, Δp, perplexity.

Definitions (Deiseroth et al., NAACL 2024), for a reference continuation ``ref`` of L <= N tokens (the
dense model's greedy continuation, ending at the first EOS, EOS included):

* FDT: the number of leading positions where the compressed argmax equals ``ref``; N when all L agree
  (the two greedy outputs are then identical, both stopping at the same EOS or both running to N).
* SDT: the share of the L positions where the compressed argmax differs from ``ref``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


@dataclass
class TokenMetrics:
    """Per-position values over one continuation (tensors of length L, on the CPU)."""

    ref: torch.Tensor            # reference token ids
    dense_argmax: torch.Tensor
    comp_argmax: torch.Tensor
    kl: torch.Tensor             # KL(dense || compressed) per position, nats
    p_dense_ref: torch.Tensor    # probability each model gives the reference token
    p_comp_ref: torch.Tensor
    n_new: int

    @property
    def agree(self) -> torch.Tensor:
        return self.comp_argmax == self.ref

    @property
    def fdt(self) -> int:
        bad = (~self.agree).nonzero()
        return int(bad[0, 0]) if len(bad) else self.n_new

    @property
    def sdt(self) -> float:
        return int((~self.agree).sum()) / len(self.ref) if len(self.ref) else 0.0

    def summary(self) -> dict:
        L = len(self.ref)
        if L == 0:
            return dict(fdt=self.n_new, sdt=0.0, kl_mean=0.0, kl_max=0.0, top1_agree=1.0,
                        dp_ref_mean=0.0, ppl_dense=float("nan"), ppl_compressed=float("nan"),
                        dense_self_agree=1.0, n_tokens=0)
        return dict(
            fdt=self.fdt,
            sdt=self.sdt,
            kl_mean=float(self.kl.mean()),
            kl_max=float(self.kl.max()),
            top1_agree=int((self.dense_argmax == self.comp_argmax).sum()) / L,
            dp_ref_mean=float((self.p_comp_ref - self.p_dense_ref).mean()),
            ppl_dense=float(torch.exp(-torch.log(self.p_dense_ref.double()).mean())),
            ppl_compressed=float(torch.exp(-torch.log(self.p_comp_ref.double()).mean())),
            # the dense model's teacher-forced argmax should reproduce its own greedy output; less
            # than 1 flags numerical near-ties between the cached and the full forward pass
            dense_self_agree=int((self.dense_argmax == self.ref).sum()) / L,
            n_tokens=L,
        )


def kl_per_position(d_logp: torch.Tensor, c_logp: torch.Tensor) -> torch.Tensor:
    """KL(P_d || P_c) = sum_v p_d (log p_d - log p_c) for each row of two log-softmax tensors."""
    p = d_logp.exp()
    terms = p * (d_logp - c_logp)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1).clamp(min=0)


METRIC_CHUNK = 64  # positions per float64 log-softmax (bounds memory for large vocabularies)


def token_metrics(dense_logits: torch.Tensor, comp_logits: torch.Tensor, ref: torch.Tensor,
                  n_new: int) -> TokenMetrics:
    """Metrics from the logits that predict each reference token (shape (L, V) each).

    Argmaxes are taken on the raw logits, exactly as greedy decoding picks its token. KL and
    probabilities come from float64 log-softmaxes: in float32 the log-normalizer of logits around
    30 carries an error of a few 1e-6, the size of a mild compression's KL.
    """
    ref = ref.to(dense_logits.device)
    kl, p_d, p_c = [], [], []
    for s in range(0, len(ref), METRIC_CHUNK):
        d = torch.log_softmax(dense_logits[s:s + METRIC_CHUNK].double(), -1)
        c = torch.log_softmax(comp_logits[s:s + METRIC_CHUNK].double(), -1)
        idx = ref[s:s + METRIC_CHUNK, None]
        kl.append(kl_per_position(d, c).float().cpu())
        p_d.append(d.gather(-1, idx)[:, 0].exp().float().cpu())
        p_c.append(c.gather(-1, idx)[:, 0].exp().float().cpu())
    empty = torch.zeros(0)
    return TokenMetrics(
        ref=ref.cpu(), dense_argmax=dense_logits.argmax(-1).cpu(),
        comp_argmax=comp_logits.argmax(-1).cpu(), kl=torch.cat(kl) if kl else empty,
        p_dense_ref=torch.cat(p_d) if p_d else empty, p_comp_ref=torch.cat(p_c) if p_c else empty,
        n_new=n_new)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of targets; NaN when there is nothing to score."""
    if len(targets) == 0:
        return float("nan")
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets.to(logits.device)[:, None])
    return float(torch.exp(-logp.double().mean()))


QUANTILES = {"p10": 10, "p25": 25, "fdt_median": 50, "p75": 75, "p90": 90}


def aggregate(df: pd.DataFrame) -> dict:
    """Prompt-set aggregates of a per-prompt table: FDT distribution, mean SDT, mean KL, ..."""
    if df.empty:
        return {"prompts": 0}
    fdt = df["fdt"].to_numpy(dtype=float)
    out = {"prompts": int(len(df)), "fdt_mean": float(fdt.mean())}
    for key, q in QUANTILES.items():
        name = key if key == "fdt_median" else f"fdt_{key}"
        out[name] = float(np.percentile(fdt, q))
    for col in ("sdt", "kl_mean", "top1_agree"):
        out[f"{col}_mean" if not col.endswith("_mean") else col] = float(df[col].mean())
    out["kl_max"] = float(df["kl_max"].max())
    if {"ppl_dense", "ppl_compressed"} <= set(df.columns):
        out["ppl_ratio_mean"] = float((df["ppl_compressed"] / df["ppl_dense"]).mean())
    return out


def survival_curve(fdt, n_new: int) -> pd.DataFrame:
    """Share of prompts with no divergence up to and including position t, for t = 0..N-1."""
    fdt = np.asarray(fdt, dtype=float)
    t = np.arange(n_new)
    share = (fdt[None, :] > t[:, None]).mean(axis=1) if len(fdt) else np.zeros(n_new)
    return pd.DataFrame({"position": t, "surviving": share})
