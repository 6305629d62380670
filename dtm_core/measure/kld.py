"""Score a text the way ``llama-perplexity --kl-divergence`` does, for any pair.

The text is tokenized once and cut into ``n_chunk = len(tokens) // ctx`` chunks of ``ctx`` tokens
(the remainder is dropped, as llama.cpp does). In each chunk the logits at positions
``ctx/2 .. ctx-2`` predict the next token; for every such position we keep a handful of scalars
(KL divergence, the two models' log-likelihoods of the real next token, whether their top tokens
agree): memory is bounded by one chunk's logits per model, never the whole text's.

Statistics and their uncertainties follow llama.cpp's ``kl_divergence`` report: mean and standard
error of the mean (``sqrt(var / (n - 1))``), PPL uncertainty by the delta method, the log-PPL ratio's
uncertainty with the covariance of the two models' log-likelihoods, and percentiles of the sorted
values. Percentiles here interpolate linearly (numpy); llama.cpp picks the nearest rank, so tails of
small samples can differ in the last digits.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from dtm_core.errors import DTMError
from dtm_core.models.generation import head_logits, hidden_states_only, model_device
from dtm_core.measure.diagnostics import kl_by_confidence
from dtm_core.measure.metrics import kl_per_position
from dtm_core.compression.pair import Pair

KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


def chunk_positions(n_tokens: int, ctx: int) -> list[tuple[int, list[int]]]:
    """(chunk start, scored positions within the chunk) for every whole chunk.

    A position j predicts token j + 1 of its chunk; j runs over ctx/2 .. ctx-2.
    """
    if ctx < 4:
        raise DTMError("--ctx must be at least 4.")
    first = ctx // 2
    return [(c * ctx, list(range(first, ctx - 1))) for c in range(n_tokens // ctx)]


@dataclass
class KLDValues:
    """Per scored position: the scalars every statistic is computed from."""

    kld: list[float] = field(default_factory=list)
    logp_base: list[float] = field(default_factory=list)
    logp_comp: list[float] = field(default_factory=list)
    same_top: list[bool] = field(default_factory=list)
    p_top_base: list[float] = field(default_factory=list)   # the base's top-token probability

    def extend(self, kld, lb, lc, same, p_top=None):
        self.kld.extend(kld.tolist())
        self.logp_base.extend(lb.tolist())
        self.logp_comp.extend(lc.tolist())
        self.same_top.extend(same.tolist())
        if p_top is not None:
            self.p_top_base.extend(p_top.tolist())

    def by_confidence(self):
        """KL by the base model's top-token probability
        (:func:`dtm_core.measure.diagnostics.kl_by_confidence`), agreement = same top token."""
        return kl_by_confidence(self.kld, self.p_top_base, self.same_top)


def _mean_unc(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    mean = float(x.mean())
    var = float((x * x).mean() - mean * mean)
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def statistics(v: KLDValues, chunks: int) -> dict:
    """llama.cpp's KL-divergence report from per-position values."""
    kld = np.asarray(v.kld, float)
    lb, lc = np.asarray(v.logp_base, float), np.asarray(v.logp_comp, float)
    n = len(kld)
    if n == 0:
        raise DTMError("Nothing was scored: the text is shorter than one chunk of --ctx tokens.")
    nll_b, nll_c = -lb, -lc
    mb, ub = _mean_unc(nll_b)
    mc, uc = _mean_unc(nll_c)
    cov = float((nll_b * nll_c).mean() - mb * mc) / (n - 1) if n > 1 else 0.0
    log_ratio = mc - mb
    log_ratio_unc = math.sqrt(max(uc * uc + ub * ub - 2 * cov, 0.0))
    dp = np.exp(lc) - np.exp(lb)
    out = {
        "chunks": chunks, "positions": n,
        "ppl_base": math.exp(mb), "ppl_base_unc": math.exp(mb) * ub,
        "ppl_compressed": math.exp(mc), "ppl_compressed_unc": math.exp(mc) * uc,
        "cor_ln_ppl": _corr(nll_b, nll_c),
        "ln_ppl_ratio": log_ratio, "ln_ppl_ratio_unc": log_ratio_unc,
        "ppl_ratio": math.exp(log_ratio), "ppl_ratio_unc": math.exp(log_ratio) * log_ratio_unc,
        "ppl_diff": math.exp(mc) - math.exp(mb),
    }
    out["kld_mean"], out["kld_mean_unc"] = _mean_unc(kld)
    out["kld_max"], out["kld_min"] = float(kld.max()), float(kld.min())
    for q in KLD_PERCENTILES:
        out[f"kld_p{q:g}"] = float(np.percentile(kld, q))
    out["dp_mean"], out["dp_mean_unc"] = _mean_unc(dp)
    out["dp_max"], out["dp_min"] = float(dp.max()), float(dp.min())
    for q in DP_PERCENTILES:
        out[f"dp_p{q:g}"] = float(np.percentile(dp, q))
    ms, ms_unc = _mean_unc(dp * dp)
    out["rms_dp"] = math.sqrt(ms)
    out["rms_dp_unc"] = 0.5 * ms_unc / out["rms_dp"] if out["rms_dp"] > 0 else 0.0
    same = np.asarray(v.same_top, float)
    p = float(same.mean())
    out["same_top_p"] = 100 * p
    out["same_top_p_unc"] = 100 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
    return out


@torch.no_grad()
def score_text(pair: Pair, text: str, ctx: int = 512,
               progress: Callable[[float, str], None] | None = None, store=None
               ) -> tuple[dict, KLDValues]:
    """Statistics of llama.cpp's KL-divergence mode for ``pair`` on ``text``. With ``store``
    (torchrun's c10d store) the chunks are shared out over the ranks and rank 0 gets exactly the
    one-process statistics; the other ranks get (None, None)."""
    tok = pair.tokenizer
    if not text or not text.strip():
        raise DTMError("The text is empty.")
    ids = tok(text, add_special_tokens=False).input_ids
    limit = getattr(pair.dense.model.config, "max_position_embeddings", None)
    if limit and ctx > limit:
        raise DTMError(f"--ctx {ctx} exceeds the model's context of {limit} tokens.")
    chunks = chunk_positions(len(ids), ctx)
    if not chunks:
        raise DTMError(f"The text has {len(ids)} tokens, fewer than one chunk of {ctx}; "
                       "lower --ctx or give a longer text.")
    bos = tok.bos_token_id
    probe = text[:64]
    add_bos = bos is not None and tok(probe).input_ids[:1] == [bos] != \
        tok(probe, add_special_tokens=False).input_ids[:1]
    values = KLDValues()
    dev = model_device(pair.dense.model)

    def inputs(k):
        start, positions = chunks[k]
        chunk = list(ids[start:start + ctx])
        if add_bos:  # llama.cpp puts BOS in place of each chunk's first token
            chunk[0] = bos
        x = torch.tensor([chunk], device=dev)
        return x, torch.tensor(positions, device=dev)

    def one(k, dense_hidden=None):
        x, pos = inputs(k)
        tgt = x[0, pos + 1]
        if dense_hidden is None:
            dense_logits = pair.dense_model()(input_ids=x).logits
        else:   # kept by the dense pass of an in-place pair: the head as the forward applies it
            with pair.dense_head():
                dense_logits = head_logits(pair.dense.model, dense_hidden.to(dev))
        # float64 log-softmax, as llama.cpp sums its softmax in double
        lb = torch.log_softmax(dense_logits[0, pos].double(), -1)
        lc = torch.log_softmax(pair.compressed_model()(input_ids=x).logits[0, pos].double(), -1)
        return (kl_per_position(lb, lc).cpu(), lb.gather(-1, tgt[:, None])[:, 0].cpu(),
                lc.gather(-1, tgt[:, None])[:, 0].cpu(), (lb.argmax(-1) == lc.argmax(-1)).cpu(),
                lb.max(-1).values.exp().cpu())

    from dtm_core.distributed import shared_map

    key = hashlib.sha256(json.dumps([pair.label, len(ids), ctx]).encode() + text[:4096].encode()
                         ).hexdigest()[:16]
    if pair.in_place is not None and store is None:
        # one model's memory: every chunk's final hidden states from the dense model (a chunk x
        # hidden size each), then the model compressed in place once, restored at the end
        with pair.session():
            dm, kept = pair.dense_model(), []
            for k in range(len(chunks)):
                calls: list = []
                with hidden_states_only([dm], calls):
                    dm(input_ids=inputs(k)[0])
                kept.append(calls[-1].cpu() if calls[-1].device.type != "cpu" else calls[-1])
                if progress is not None:
                    progress((k + 1) / len(chunks) / 2, f"dense model: chunk {k + 1}/{len(chunks)}")
            got = []
            for k in range(len(chunks)):
                got.append(one(k, kept[k]))
                kept[k] = None
                if progress is not None:
                    progress(0.5 + (k + 1) / len(chunks) / 2,
                             f"compressed model: chunk {k + 1}/{len(chunks)}")
    else:
        with pair.session():
            got = shared_map(len(chunks), one, f"kld-{key}", store,
                             each=None if progress is None else
                             (lambda k, n: progress(n / len(chunks),
                                                    f"chunk {n}/{len(chunks)}")))
    if got is None:       # another rank of a torchrun job: rank 0 reports
        return None, None
    for part in got:
        values.extend(*part)
    return statistics(values, len(chunks)), values


def format_report(s: dict) -> str:
    """The report as llama-perplexity prints it."""
    lines = [
        f"chunks: {s['chunks']}, scored positions: {s['positions']}",
        f"Mean PPL(Q)                   : {s['ppl_compressed']:10.6f} ± {s['ppl_compressed_unc']:.6f}",
        f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_unc']:.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor_ln_ppl']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {s['ln_ppl_ratio_unc']:.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_unc']:.6f}",
        f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_mean_unc']:.6f}",
        f"Maximum KLD: {s['kld_max']:10.6f}",
    ]
    lines += [f"{q:>5.1f}%   KLD: {s[f'kld_p{q:g}']:10.6f}" for q in KLD_PERCENTILES]
    lines += [f"Minimum KLD: {s['kld_min']:10.6f}", "",
              "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['dp_mean']:6.3f} ± {100 * s['dp_mean_unc']:.3f} %",
              f"Maximum Δp: {100 * s['dp_max']:6.3f}%"]
    lines += [f"{q:>5.1f}%   Δp: {100 * s[f'dp_p{q:g}']:6.3f}%" for q in DP_PERCENTILES]
    lines += [f"Minimum Δp: {100 * s['dp_min']:6.3f}%",
              f"RMS Δp    : {100 * s['rms_dp']:6.3f} ± {100 * s['rms_dp_unc']:.3f} %",
              f"Same top p: {s['same_top_p']:6.3f} ± {s['same_top_p_unc']:.3f} %"]
    return "\n".join(lines)


def statistics_table(stats: dict):
    """The statistics as a two-column table (statistic, value), for CSV / Parquet exports."""
    import pandas as pd

    return pd.DataFrame({"statistic": list(stats), "value": [float(v) for v in stats.values()]})
