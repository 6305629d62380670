"""GPTQ and SparseGPT against slow, obviously-correct references written here: optimal brain
surgeon one column at a time, with the inverse Hessian of the still-free columns recomputed by a
plain matrix inverse at every step (no Cholesky, no blocks, no lazy batching). And on real layer
inputs: their output error is at most that of RTN / magnitude with the same grid / sparsity."""
from __future__ import annotations

import pytest
import torch

from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.errors import DTMError
from dtm_core.compression.methods import parse_spec
from dtm_core.compression.methods.gptq import gptq_quantize
from dtm_core.compression.methods.rtn import grid_params, on_grid
from dtm_core.compression.methods.sparsegpt import sparsegpt_prune
from dtm_core.compression.pair import make_pair
from dtm_core.analysis.sweep import sweep

from conftest import make_tiny, random_prompts


def problem(rows=12, cols=48, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # correlated inputs, like a layer's: a random mixing of independent features
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ \
        (torch.eye(cols, dtype=torch.float64) + 0.5 * torch.randn(cols, cols, generator=g,
                                                                  dtype=torch.float64))
    h = 2 / n * x.t() @ x
    return w, x, h


def damped(h, damp=0.01):
    return h + damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)


def obs_reference(w, h, fix, order=None, on_block=None, block=128):
    """Fix columns one at a time in ``order``; after each, the remaining columns move by the OBS
    update with the inverse of the Hessian restricted to the columns still free."""
    w = w.clone()
    cols = w.shape[1]
    order = list(range(cols)) if order is None else list(order)
    q = torch.zeros_like(w)
    for step, c in enumerate(order):
        if on_block is not None and step % block == 0:
            free = order[step:]
            hinv = torch.linalg.inv(h[free][:, free])
            on_block(step, order[step:step + block], w, hinv)
        free = order[step:]
        hinv = torch.linalg.inv(h[free][:, free])      # (H_F)^-1, F = free columns, c first
        qc = fix(step, c, w)
        q[:, c] = qc
        err = (w[:, c] - qc) / hinv[0, 0]
        w[:, free] -= err[:, None] * hinv[0][None, :]
    return q


def gptq_reference(w, h, bits, group, asym, act):
    h = damped(h)
    cols = w.shape[1]
    order = torch.argsort(torch.diag(h), descending=True).tolist() if act else list(range(cols))
    static = {g: grid_params(w[:, g:g + group], bits, asym) for g in range(0, cols, group)} \
        if group else None
    chan = grid_params(w, bits, asym)
    state = {}

    def fix(step, c, cur):
        if group and act:
            scale, zero = static[c // group * group]
        elif group:
            if c % group == 0:
                state["p"] = grid_params(cur[:, c:c + group], bits, asym)
            scale, zero = state["p"]
        else:
            scale, zero = chan
        return on_grid(cur[:, c:c + 1], scale, zero, bits, asym)[:, 0]
    return obs_reference(w, h, fix, order)


@pytest.mark.parametrize("bits,group,asym,act", [(4, None, False, False), (3, 16, False, False),
                                                 (4, 16, True, False), (3, None, False, True),
                                                 (4, 16, False, True), (2, 12, True, False)])
def test_gptq_equals_the_slow_reference(bits, group, asym, act):
    w, x, h = problem(cols=48 if group != 12 else 60)
    got = gptq_quantize(w.float(), h.float(), bits, group, asym, act)
    want = gptq_reference(w, h, bits, group, asym, act)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    rtn = parse_spec(f"int{bits}" + (f":g{group}" if group else "") + (":asym" if asym else ""))
    err = lambda q: float(((x @ w.t() - x @ q.double().t()) ** 2).sum())  # noqa: E731
    assert err(got) <= err(rtn.apply(w.float(), {}))


def test_gptq_over_many_blocks_equals_the_reference():
    """Lazy batching across block boundaries (3 blocks of 128 columns)."""
    w, x, h = problem(rows=6, cols=300, n=600, seed=3)
    got = gptq_quantize(w.float(), h.float(), 4, 64)
    want = gptq_reference(w, h, 4, 64, False, False)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def sparsegpt_reference(w, h, sparsity=0.5, n=0, m=0):
    h = damped(h)
    cols = w.shape[1]
    # the OBS scale of column j when it is fixed: [(H_F)^-1]_00 with F = {j, ..., last}
    d = torch.stack([torch.sqrt(torch.linalg.inv(h[j:, j:])[0, 0]) for j in range(cols)])
    mask = torch.zeros_like(w, dtype=torch.bool)

    def on_block(step, block_cols, cur, hinv):
        if n:
            return
        score = cur[:, block_cols] ** 2 / d[block_cols][None, :] ** 2
        k = int(round(sparsity * score.numel()))
        idx = torch.topk(score.flatten(), k, largest=False).indices
        blk = torch.zeros(score.numel(), dtype=torch.bool)
        blk[idx] = True
        mask[:, block_cols] = blk.view(score.shape)

    def fix(step, c, cur):
        if n and c % m == 0:
            score = cur[:, c:c + m] ** 2 / d[c:c + m][None, :] ** 2
            drop = torch.topk(score, m - n, dim=1, largest=False).indices
            mask[:, c:c + m].scatter_(1, drop, True)
        return torch.where(mask[:, c], torch.zeros_like(cur[:, c]), cur[:, c])
    return obs_reference(w, h, fix, on_block=on_block)


@pytest.mark.parametrize("sparsity,n,m,cols", [(0.5, 0, 0, 48), (0.7, 0, 0, 200),
                                               (0.5, 2, 4, 48), (0.75, 1, 4, 64)])
def test_sparsegpt_equals_the_slow_reference(sparsity, n, m, cols):
    w, x, h = problem(cols=cols, n=400, seed=5)
    got = sparsegpt_prune(w.float(), h.float(), sparsity, n, m)
    want = sparsegpt_reference(w, h, sparsity, n, m)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    zeros = (got == 0)
    if n:
        assert bool((zeros.view(w.shape[0], -1, m).sum(-1) == m - n).all())
    else:
        blocks = [(0, min(128, cols))] + ([(128, cols)] if cols > 128 else [])
        assert int(zeros.sum()) == sum(round(sparsity * w.shape[0] * (b - a)) for a, b in blocks)
    spec = f"nm:{n}:{m}" if n else f"magnitude:{sparsity}"
    err = lambda q: float(((x @ w.t() - x @ q.double().t()) ** 2).sum())  # noqa: E731
    assert err(got) <= err(parse_spec(spec).apply(w.float(), {}))


def test_a_singular_hessian_raises_the_dampening_and_says_so(caplog):
    w, _, _ = problem(cols=16)
    h = torch.zeros(16, 16, dtype=torch.float64)
    h[:4, :4] = 1.0                       # rank 1 on live inputs, 12 dead inputs
    with caplog.at_level("WARNING", logger="dtm_core"):
        q = gptq_quantize(w.float(), h.float(), 4, damp=1e-12, name="3.q")
    assert torch.isfinite(q).all() and bool((q[:, 4:] == 0).all())   # dead inputs are zero
    assert "3.q" in caplog.text and "dampening" in caplog.text


def test_specs_parse_and_refuse_in_one_sentence():
    # act-order (static groups) is the default, as in llm-compressor's GPTQModifier
    assert str(parse_spec("gptq:int4:g128:asym:act")) == "gptq:int4:g128:asym"
    assert parse_spec("gptq:int4").act and not parse_spec("gptq:int4:noact").act
    assert str(parse_spec("gptq:int4:g128:noact")) == "gptq:int4:g128:noact"
    assert str(parse_spec("gptq:int3:damp0.05")) == "gptq:int3:damp0.05"
    assert str(parse_spec("sparsegpt:2:4")) == "sparsegpt:2:4"
    assert parse_spec("gptq:int3:g64").llama_cpp_type() == "q3_K"
    for bad in ("gptq", "gptq:int9", "gptq:int4:g64:g32", "gptq:int4:foo", "sparsegpt:2:3",
                "sparsegpt:1.5", "gptq:int4:damp2"):
        with pytest.raises(DTMError, match="Accepted forms"):
            parse_spec(bad)


@pytest.mark.parametrize("spec", ["gptq:int4:g16", "gptq:int3:act", "sparsegpt:0.5",
                                  "sparsegpt:2:4", "awq:int4:g16", "awq:int3"])
def test_pairs_and_sweep_cells_with_hessian_methods(spec, tmp_path):
    """A sweep cell equals the single-component pair calibrated on the same prompts; the pair
    is reversible and shares untouched tensors."""
    tiny = make_tiny("llama", scale=4.0)
    prompts = random_prompts(6, seed=4, lo=6, hi=14)
    res = sweep(tiny, spec, prompts, 8, cache_dir=tmp_path, layers="1", kinds="k,up,down")
    for _, row in res.table.iterrows():
        pair = make_pair(tiny, Recipe.single(spec, row.component), calibration=prompts)
        d = divergence(pair, prompt_ids=prompts, new_tokens=8)
        assert row.fdt_mean == d.table.fdt.mean(), row.component
        assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)
    assert res.table.kl_mean.max() > 0


def test_in_place_lapack_factor_equals_the_torch_factor(monkeypatch):
    """On CPU the factor is computed by LAPACK inside the Hessian's own memory; it is the torch
    computation's factor (upper triangle), also when the first tries fail and H is restored."""
    import dtm_core.compression.methods.obs as obs

    _, _, h = problem(cols=300, n=400, seed=7)
    bad = h.clone()
    bad[0, 0] = -0.5 * float(torch.diag(h).mean())   # indefinite: fails until damped enough
    for hess, dtype, damp in ((h, torch.float32, 0.01), (bad, torch.float64, 0.01)):
        a = hess.to(dtype).clone()
        u_lapack, d1 = obs.inverse_hessian_factor(a, damp)
        assert u_lapack.data_ptr() == a.data_ptr()      # the same memory, nothing else
        monkeypatch.setattr(obs, "_factor_in_place", lambda *x: None)
        u_torch, d2 = obs.inverse_hessian_factor(hess.to(dtype).clone(), damp)
        monkeypatch.undo()
        assert d1 == d2 and (d1 > damp) == (hess is bad)
        torch.testing.assert_close(torch.triu(u_lapack), torch.triu(u_torch), rtol=1e-4,
                                   atol=1e-5)
