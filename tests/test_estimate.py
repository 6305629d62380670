"""Estimated sweep cells (Fisher diagonal from one forward and backward a batch) against the exact
cells and against a slow, obviously correct second-order KL; refinement order and stopping."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dtm_core.analysis.sweep import sweep
from dtm_core.analysis.sweep.estimate import (Settled, _probe, estimate_sweep, fisher_diagonal,
                                              spearman)
from dtm_core.analysis.sweep.refine import estimate_and_refine
from dtm_core.measure.divergence import reference_continuations
from dtm_core.models.components import resolve

from conftest import NumberTokenizer, make_tiny, random_prompts
from test_families import FAMILIES, make


@pytest.mark.parametrize("probe", ["gauss", "sample"])
def test_probes_have_the_logits_fisher_as_covariance(probe):
    """E[u u'] = diag(p) - p p' for the unbiased probes (200,000 draws of six logits)."""
    z = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 3.0]).repeat(200_000, 1)
    u = _probe(z, probe, torch.Generator().manual_seed(0)).double()
    p = torch.softmax(z[0].double(), -1)
    want = torch.diag(p) - torch.outer(p, p)
    got = u.T @ u / len(u)
    assert torch.allclose(got, want, atol=4e-3), (got - want).abs().max()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", *FAMILIES])
def test_the_head_at_probed_positions_gives_the_full_logits_there(family):
    """The Fisher passes run the LM head only at continuation positions (probes.head_at): the
    logits there equal the full pass's, the family's post-processing included (Gemma's
    soft-capping), and the head is whole again after the block."""
    from dtm_core.analysis.sweep.probes import head_at

    dense = make(family) if family in FAMILIES else make_tiny(family)
    ids = torch.tensor([[1, 5, 9, 4, 7, 3], [1, 8, 2, 6, 0, 0]])
    rows, pos = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 5, 1, 3])
    with torch.no_grad():
        full = dense.model(input_ids=ids, use_cache=False).logits
        with head_at(dense.model, rows, pos):
            cut = dense.model(input_ids=ids, use_cache=False).logits
        again = dense.model(input_ids=ids, use_cache=False).logits
    assert cut.shape == (1, 4, full.shape[-1])
    torch.testing.assert_close(cut[0], full[rows, pos], rtol=1e-5, atol=1e-5)
    assert again.shape == full.shape


def _kl_exact(dense, changed_model, ids, refs) -> float:
    """Mean over continuation positions of KL(p_dense || p_changed), teacher forced, one
    sequence at a time (no batching, no fast path)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for p, r in zip(ids, refs):
            seq = torch.tensor([p + r])
            a = torch.log_softmax(dense.model(seq).logits[0].double(), -1)
            b = torch.log_softmax(changed_model(seq).logits[0].double(), -1)
            rows = torch.arange(len(r)) + len(p) - 1
            total += float((a[rows].exp() * (a[rows] - b[rows])).sum())
            n += len(r)
    return total / n


def test_the_estimate_is_the_second_order_kl_of_a_small_change():
    """Averaged over probes, 1/2 sum F d^2 / positions equals the exact KL of a small weight
    change d (second order: the change is a tenth of int4's error)."""
    from dtm_core.compression.pair import shared_copy

    dense = make_tiny("llama", scale=8.0)
    ids = random_prompts(6, seed=2)
    refs = reference_continuations(dense, ids, 8)
    comps = resolve(dense.model, "1.down")
    w = comps[0].weight.detach()
    q = torch.round(w / (w.abs().amax(-1, keepdim=True) / 7)) * (w.abs().amax(-1, keepdim=True) / 7)
    d = 0.1 * (q - w)
    changed = shared_copy(dense.model)
    changed.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(w + d, requires_grad=False)
    exact = _kl_exact(dense, changed, ids, refs)
    est = []
    for seed in range(48):
        f = fisher_diagonal(dense, ids, refs, comps, batch_size=16, seed=seed)
        est.append(0.5 * float((f.of(comps[0]) * d.square()).sum()) / f.positions)
    mean = sum(est) / len(est)
    assert exact > 0 and abs(mean - exact) / exact < 0.15, (mean, exact)
    # the weights' requires_grad flags are as they were
    assert not any(p.requires_grad for p in dense.model.parameters())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_estimates_rank_cells_as_the_exact_sweep(family, tmp_path):
    """Spearman's rank correlation of estimated and exact KL over every cell (target 0.8)."""
    dense = make_tiny(family, scale=8.0)
    ids = random_prompts(10, seed=1)
    for spec in ("int3:g32", "magnitude:0.5"):
        exact = sweep(dense, spec, ids, 12, cache_dir=tmp_path)
        est = estimate_sweep(dense, spec, ids, 12, cache_dir=tmp_path)
        assert est.table.exact.all() and len(est.table) == len(exact.table)
        a = est.agreement()
        assert a["spearman_kl"] >= 0.8, (spec, a)
        assert a["spearman_fdt"] > 0.5, (spec, a)
        t = est.table.set_index("component")
        e = exact.table.set_index("component")
        assert t.kl_mean.to_dict() == e.kl_mean.to_dict()
        # stored beside the exact cells
        saved = json.loads((exact.folder / "estimate-gauss.json").read_text())
        assert [c["component"] for c in saved["cells"]] == list(est.table.component)


def test_refinement_measures_the_most_sensitive_first_and_stops_when_settled(tmp_path):
    dense = make_tiny("llama", scale=8.0)
    ids = random_prompts(8, seed=4)
    seen = []
    res = estimate_and_refine(dense, "int3:g32", ids, 10, refine=4, cache_dir=tmp_path,
                              on_table=lambda t: seen.append(int(t.exact.sum())))
    t = res.table
    assert len(t) == 21 and int(t.exact.sum()) == 4 and seen == [1, 2, 3, 4]
    top4 = res.estimate.table.sort_values("kl_estimate", ascending=False).component[:4]
    assert set(t[t.exact].component) == set(top4)
    assert list(t.component) == list(res.estimate.table.component)      # model order
    # the exact cells are the sweep's own (same store, same numbers)
    full = sweep(dense, "int3:g32", ids, 10, cache_dir=tmp_path)
    assert full.reused == 4 and full.computed == 17
    ex = t[t.exact].set_index("component").kl_mean
    assert ex.to_dict() == full.table.set_index("component").kl_mean[ex.index].to_dict()
    # settled: exact cells from the store first, then by estimate until the top-2 holds
    res = estimate_and_refine(dense, "int3:g32", ids, 10, settle=2, cache_dir=tmp_path / "s")
    assert res.sweep.settled and 5 <= int(res.table.exact.sum()) < 21
    exact_top = res.table[res.table.exact].sort_values("kl_mean", ascending=False).component[:2]
    assert set(exact_top) == set(full.table.sort_values("kl_mean", ascending=False)
                                 .component[:2])
    assert res.agreement()["cells"] == int(res.table.exact.sum())


def test_settled_needs_the_same_top_over_a_window():
    s = Settled(2, window=3)
    rows = [("a", 5), ("b", 4), ("c", 1), ("f", 6), ("d", 2), ("e", 0.5), ("g", 1)]
    out = [s({"component": n, "kl_mean": v}) for n, v in rows]
    assert out == [False] * 6 + [True]      # f entered the top: three more cells from there
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_cli_sweep_estimate_refine_and_bad_input(tmp_path, monkeypatch, capsys):
    import dtm_core.cli as cli
    import dtm_core.cli.options as options
    from dtm_core.jobs import PairCache

    lm = make_tiny("llama", scale=8.0)
    lm.tokenizer = NumberTokenizer()
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": " ".join(str(t) for t in p)})
                           for p in random_prompts(6, seed=3)) + "\n", encoding="utf-8")
    cache = PairCache()
    cache._dense = ("tiny", lm)
    monkeypatch.setattr(options, "pair_cache", lambda args: cache)
    out = tmp_path / "est.csv"
    base = ["sweep", "--model", "tiny", "--compress", "int4:g32", "--prompts", str(f),
            "--new-tokens", "6", "--cache-dir", str(tmp_path / "c")]
    assert cli.main(base + ["--estimate", "--out", str(out)]) == 0
    t = pd.read_csv(out)
    assert {"kl_estimate", "fdt_estimate", "exact", "kl_mean", "fdt_mean"} <= set(t.columns)
    assert len(t) == 21 and not t.exact.any() and (t.kl_estimate > 0).all()
    assert ((t.fdt_estimate >= 0) & (t.fdt_estimate <= 6)).all()
    from dtm_core.measure.exports import sidecar_path
    side = json.loads(sidecar_path(out).read_text())["config"]["estimate"]
    assert side["probe"] == "gauss" and side["positions"] > 0
    assert cli.main(base + ["--refine", "5", "--out", str(out)]) == 0
    t = pd.read_csv(out)
    assert int(t.exact.sum()) == 5
    assert "Spearman KL" in capsys.readouterr().out
    assert cli.main(base + ["--refine", "all", "--out", str(out)]) == 0
    t = pd.read_csv(out)
    assert t.exact.all() and t.kl_mean.notna().all()
    assert cli.main(base + ["--refine", "lots"]) != 0
    err = capsys.readouterr().err
    assert "--refine takes a number of cells or 'all', not 'lots'." in err
