"""The diagnostics engineers compare quantizations with (issue 29): top-K agreement and overlap,
reverse KL, Jensen-Shannon and KL by the dense model's confidence, each checked against a slow,
obviously-correct computation from the two models' logits, in divergence, in sweep cells (the
fast path and the full one) and in the stream."""
from __future__ import annotations

import math

import pytest
import torch

from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.measure.diagnostics import (CONFIDENCE_EDGES, kl_by_confidence,
                                          tokens_by_confidence)
from dtm_core.models.generation import teacher_forced_logits
from test_families import make, prompts

N = 10


def slow_rows(pair, ps, refs):
    """Per prompt, per position: every diagnostic computed position by position in float64."""
    out = []
    for p, r in zip(ps, refs):
        seq = p + r
        zd = teacher_forced_logits(pair.dense.model, [seq], 0)[0, len(p) - 1:len(seq) - 1]
        zc = teacher_forced_logits(pair.compressed, [seq], 0)[0, len(p) - 1:len(seq) - 1]
        rows = []
        for t, ref in enumerate(r):
            pd_ = torch.softmax(zd[t].double(), -1)
            pc = torch.softmax(zc[t].double(), -1)
            kl = sum(float(a * math.log(a / b)) for a, b in zip(pd_, pc) if a > 0)
            rkl = sum(float(b * math.log(b / a)) for a, b in zip(pd_, pc) if b > 0)
            m = (pd_ + pc) / 2
            js = 0.5 * sum(float(a * math.log(a / c)) for a, c in zip(pd_, m) if a > 0) + \
                0.5 * sum(float(b * math.log(b / c)) for b, c in zip(pc, m) if b > 0)
            rank_c = sorted(range(len(pc)), key=lambda v: -float(zc[t][v]))
            rank_d = sorted(range(len(pd_)), key=lambda v: -float(zd[t][v]))
            row = {"kl": kl, "rkl": rkl, "js": js, "ptop": float(pd_.max()),
                   "agree": rank_c[0] == ref}
            for k in (5, 10):
                row[f"hit{k}"] = ref in rank_c[:k]
                row[f"ov{k}"] = len(set(rank_c[:k]) & set(rank_d[:k])) / k
            rows.append(row)
        out.append(rows)
    return out


@pytest.mark.parametrize("family", ["qwen3", "mixtral", "gpt_neox"])
def test_diagnostics_equal_the_slow_computation(family):
    lm = make(family)
    pair = make_pair(lm, Recipe.single("int3", "*"))
    ps = prompts(4, seed=11, lo=3, hi=9)
    res = divergence(pair, prompt_ids=ps, new_tokens=N)
    slow = slow_rows(pair, ps, res.references)
    for i, rows in enumerate(slow):
        got = res.table.iloc[i]
        mean = lambda key: sum(float(r[key]) for r in rows) / len(rows)   # noqa: E731
        assert got.reverse_kl_mean == pytest.approx(mean("rkl"), rel=1e-6, abs=1e-9)
        assert got.js_mean == pytest.approx(mean("js"), rel=1e-6, abs=1e-9)
        assert got.top1_hit == pytest.approx(mean("agree"))
        assert got.top1_hit == pytest.approx(1 - got.sdt)
        assert got.top1_overlap == pytest.approx(got.top1_agree)
        for k in (5, 10):
            assert got[f"top{k}_hit"] == pytest.approx(mean(f"hit{k}")), (i, k)
            assert got[f"top{k}_overlap"] == pytest.approx(mean(f"ov{k}")), (i, k)
        assert 0 <= got.js_mean <= math.log(2)
    assert 0 < res.summary["js_mean"] and res.summary["top10_hit_mean"] >= \
        res.summary["top5_hit_mean"] >= res.summary["top1_hit_mean"]
    assert res.table.top5_overlap.nunique() > 1        # the test can tell values apart

    # KL by the dense model's confidence, against bucketing the slow values by hand
    table = tokens_by_confidence(res.tokens)
    flat = [r for rows in slow for r in rows]
    assert int(table.positions.sum()) == len(flat)
    for j, (lo, hi) in enumerate(zip(CONFIDENCE_EDGES[:-1], CONFIDENCE_EDGES[1:])):
        inside = [r for r in flat if lo <= r["ptop"] < hi or (hi == 1.0 and r["ptop"] == 1.0)]
        assert table.positions[j] == len(inside), table
        if inside:
            want = sum(r["kl"] for r in inside) / len(inside)
            assert table.kl_mean[j] == pytest.approx(want, rel=1e-5, abs=1e-8)
            assert table.agree[j] == pytest.approx(sum(r["agree"] for r in inside) / len(inside))
    assert table.kl_share.sum() == pytest.approx(1.0)


def test_kl_by_confidence_edges():
    t = kl_by_confidence([1.0, 2.0, 3.0, 4.0], [0.1, 0.3, 0.995, 1.0], [1, 0, 1, 1])
    assert t.positions.tolist() == [1, 1, 0, 0, 0, 2]
    assert t.kl_mean[5] == 3.5 and t.agree[1] == 0 and math.isnan(t.kl_mean[2])
    assert t.kl_share.tolist()[5] == pytest.approx(0.7)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sweep_cells_carry_the_top_k_columns(family):
    """A sweep's cells (the fast path on llama, the full one on gemma2's soft-capped logits)
    equal divergence of the one-component pair for the top-K columns; reverse KL and JS only
    where the distributions are at hand (the full path), so the fast path stays fast."""
    from conftest import make_tiny
    from dtm_core.analysis.sweep import sweep
    from dtm_core.analysis.sweep.record import prepare

    lm = make_tiny("llama", scale=4.0) if family == "llama" else make(family)
    ps = prompts(4, seed=3, lo=3, hi=9)
    ctx = prepare(lm, ps, N)
    assert ctx.fast == (family == "llama")
    res = sweep(lm, "int3", ps, N, layers="1", kinds="down,q", ctx=ctx)
    for _, cell in res.table.iterrows():
        one = divergence(make_pair(lm, Recipe.single("int3", f"1.{cell.kind}")), prompt_ids=ps,
                         new_tokens=N).summary
        for k in (1, 5, 10):
            assert cell[f"top{k}_hit_mean"] == pytest.approx(one[f"top{k}_hit_mean"])
            assert cell[f"top{k}_overlap_mean"] == pytest.approx(one[f"top{k}_overlap_mean"])
        if ctx.fast:
            assert "js_mean" not in res.table or math.isnan(cell.get("js_mean", float("nan")))
        else:
            assert cell["js_mean"] == pytest.approx(one["js_mean"], rel=1e-6)


@pytest.mark.parametrize("family,kind,spec", [("llama", "1.down", "int3"),
                                              ("phi3", "1.k", "int3"),
                                              ("llama", "0.q", "fp8:dyn")])
def test_sweep_output_error_equals_the_slow_computation(family, kind, spec):
    """A cell's output SQNR and cosine error: the component's dense and compressed outputs on
    the dense model's inputs at the scored positions (a fused slice on its own rows; a spec's
    activation quantization applies to the compressed side only)."""
    from conftest import make_tiny
    from dtm_core.analysis.sweep import sweep
    from dtm_core.compression.recipe import parse_spec
    from dtm_core.measure.divergence import reference_continuations
    from dtm_core.models.components import resolve

    lm = make_tiny("llama", scale=4.0) if family == "llama" else make(family)
    ps = prompts(3, seed=5, lo=3, hi=9)
    layer, k = kind.split(".")
    res = sweep(lm, spec, ps, N, layers=layer, kinds=k)
    cell = res.table.iloc[0]
    refs = reference_continuations(lm, ps, N)
    comp = resolve(lm.model, kind)[0]
    pair = make_pair(lm, Recipe.single(spec, kind))
    w_c = resolve(pair.compressed, kind)[0]
    signal = noise = cos = n = 0.0
    for p, r in zip(ps, refs):
        xs = []
        h = comp.module.register_forward_pre_hook(lambda m, a: xs.append(a[0][0]))
        teacher_forced_logits(lm.model, [p + r], 0)
        h.remove()
        x = xs[0][len(p) - 1:len(p) - 1 + len(r)].double()
        hook = parse_spec(spec).runtime_hook_at(w_c)
        xq = x if hook is None else hook(w_c.module, (x.float(),))[0].double()
        y = x @ comp.weight.double().t()
        yc = xq @ w_c.weight.double().t()
        if comp.rows is not None:
            y, yc = y[:, comp.rows], yc[:, comp.rows]
        signal += float(y.pow(2).sum())
        noise += float((y - yc).pow(2).sum())
        cos += float((1 - torch.nn.functional.cosine_similarity(y, yc, dim=-1)).sum())
        n += len(y)
    assert cell.output_sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert cell.output_cos_error == pytest.approx(cos / n, rel=1e-6)
    assert 0 < cell.output_sqnr_db < 60 and cell.output_cos_error > 0
