"""Token metrics against a slow float64 reference, and the FDT/SDT definitions on edge cases."""
import math

import numpy as np
import pandas as pd
import torch

from dtm_core.measure.metrics import aggregate, perplexity, survival_curve, token_metrics


def slow_reference(dl, cl, ref, n_new):
    L = len(ref)
    fdt, dis, kls, top1, dps, nll_d, nll_c = None, 0, [], 0, [], 0.0, 0.0
    for t in range(L):
        pd_ = [math.exp(v) for v in dl[t].double().tolist()]
        pc_ = [math.exp(v) for v in cl[t].double().tolist()]
        zd, zc = sum(pd_), sum(pc_)
        pd_, pc_ = [p / zd for p in pd_], [p / zc for p in pc_]
        ca = max(range(len(pc_)), key=lambda v: pc_[v])
        da = max(range(len(pd_)), key=lambda v: pd_[v])
        if ca != ref[t]:
            dis += 1
            if fdt is None:
                fdt = t
        top1 += ca == da
        kls.append(sum(p * (math.log(p) - math.log(q)) for p, q in zip(pd_, pc_) if p > 0))
        dps.append(pc_[ref[t]] - pd_[ref[t]])
        nll_d -= math.log(pd_[ref[t]])
        nll_c -= math.log(pc_[ref[t]])
    return dict(fdt=n_new if fdt is None else fdt, sdt=dis / L, kl_mean=sum(kls) / L,
                kl_max=max(kls), top1_agree=top1 / L, dp_ref_mean=sum(dps) / L,
                ppl_dense=math.exp(nll_d / L), ppl_compressed=math.exp(nll_c / L))


def test_token_metrics_match_slow_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        L, V = 9, 30
        dl = torch.randn(L, V, generator=g) * 3
        cl = dl + torch.randn(L, V, generator=g) * (0.3 * trial + 0.1)
        ref = dl.argmax(-1)
        got = token_metrics(dl, cl, ref, n_new=12).summary()
        want = slow_reference(dl, cl, ref.tolist(), 12)
        for k, v in want.items():
            assert got[k] == (v if isinstance(v, int) else got[k])
            assert math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-6), (k, got[k], v)


def test_fdt_is_n_when_identical_even_if_eos_ends_early():
    dl = torch.randn(5, 10)
    ref = dl.argmax(-1)          # a 5-token continuation ending (say) at EOS, N = 32
    tm = token_metrics(dl, dl.clone(), ref, n_new=32)
    s = tm.summary()
    assert s["fdt"] == 32 and s["sdt"] == 0.0 and s["kl_mean"] == 0.0 and s["top1_agree"] == 1.0


def test_fdt_first_mismatch_and_sdt_share():
    V = 6
    ref = torch.tensor([1, 2, 3, 4, 5])
    comp_choice = [1, 2, 0, 4, 0]
    dl = torch.full((5, V), -5.0)
    cl = torch.full((5, V), -5.0)
    for t in range(5):
        dl[t, ref[t]] = 5.0
        cl[t, comp_choice[t]] = 5.0
    s = token_metrics(dl, cl, ref, n_new=8).summary()
    assert s["fdt"] == 2
    assert s["sdt"] == 2 / 5


def test_perplexity_reference():
    logits = torch.randn(7, 11)
    tgt = torch.randint(0, 11, (7,))
    lp = torch.log_softmax(logits.double(), -1)
    want = math.exp(-sum(float(lp[i, tgt[i]]) for i in range(7)) / 7)
    assert math.isclose(perplexity(logits, tgt), want, rel_tol=1e-6)
    assert math.isnan(perplexity(logits[:0], tgt[:0]))


def test_aggregate_and_survival():
    fdt = [0, 3, 8, 8, 5]
    df = pd.DataFrame({"fdt": fdt, "sdt": [1, .5, 0, 0, .2], "kl_mean": [1, 2, 3, 4, 5],
                       "kl_max": [2, 3, 4, 5, 9], "top1_agree": [0, .5, 1, 1, .8],
                       "ppl_dense": [2, 2, 2, 2, 2], "ppl_compressed": [4, 2, 2, 2, 3]})
    agg = aggregate(df)
    assert agg["fdt_mean"] == np.mean(fdt)
    assert agg["fdt_median"] == 5
    assert agg["fdt_p10"] == np.percentile(fdt, 10) and agg["fdt_p90"] == np.percentile(fdt, 90)
    assert abs(agg["sdt_mean"] - 0.34) < 1e-12 and agg["kl_max"] == 9
    surv = survival_curve(fdt, 8)
    assert list(surv.position) == list(range(8))
    for t in range(8):   # share of prompts with no divergence at positions 0..t
        assert surv.surviving[t] == sum(f > t for f in fdt) / 5
    assert surv.surviving[0] == 0.8


def test_small_kl_of_large_logits_is_accurate():
    """Logits around 30 over a large vocabulary with a mild perturbation: the KL (about 4e-5) must
    match a float64 computation to 1e-8; a float32 log-softmax is off by about 1e-6 here."""
    g = torch.Generator().manual_seed(3)
    L, V = 6, 50000
    dl = torch.randn(L, V, generator=g) * 3 + 30
    dl[:, 7] += 12                      # peaked, like a language model's next-token distribution
    cl = dl + torch.randn(L, V, generator=g) * 0.01
    tm = token_metrics(dl, cl, torch.full((L,), 7), 8)
    d, c = torch.log_softmax(dl.double(), -1), torch.log_softmax(cl.double(), -1)
    exact = (d.exp() * (d - c)).sum(-1)
    assert float(exact.mean()) > 1e-5
    torch.testing.assert_close(tm.kl.double(), exact, atol=1e-8, rtol=1e-4)
