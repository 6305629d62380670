"""KV-cache quantization (issue 26): keys after the rotary embedding and values quantized as they
are stored, read by every query (its own position included). On every family, teacher-forced FDT
equals the first divergence of a real step-by-step greedy decode of the dense model with a cache
that quantizes what it stores (written here, independently of the engine's attention wrapper);
selections, mixed weight + cache recipes, static FP8 scales from calibration, restore, bad input."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import greedy_fdt, make_tiny
from dtm_core.compression.kvcache import fp8_quantize, resolve_cache
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.errors import DTMError
from dtm_core.measure.divergence import divergence
from dtm_core.models.load import eos_ids
from test_families import FAMILIES, make, prompts

N = 10


def slow_int(x: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """Symmetric absmax quantization of each stored vector (or group), one vector at a time."""
    qmax = 2 ** (bits - 1) - 1
    x = x.contiguous()
    out = torch.empty_like(x)
    flat, res = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    g = group or x.shape[-1]
    for r in range(flat.shape[0]):
        for s in range(0, flat.shape[1], g):
            v = flat[r, s:s + g].double()
            m = float(v.abs().max())
            scale = torch.tensor(m / qmax if m > 0 else 1.0, dtype=torch.float32).double()
            res[r, s:s + g] = (torch.round(v / scale).clamp(-qmax, qmax) * scale).float()
    return out


class QuantizingCache(DynamicCache):
    """A cache that stores quantized keys and values (only for ``layers``): what a serving
    engine with a quantized KV cache keeps."""

    def __init__(self, quant_k, quant_v, layers, **kw):
        super().__init__(**kw)
        self.qk, self.qv, self.qlayers = quant_k, quant_v, set(layers)
        self.enabled = True

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.qlayers and self.enabled:
            if self.qk is not None:
                key_states = self.qk(key_states)
            if self.qv is not None:
                value_states = self.qv(value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def decode_with_quantized_cache(model, ids, n, eos, qk, qv, layers, intact: int = 0):
    """Greedy decoding one token at a time with the quantizing cache; ``intact``: the first
    tokens' entries stored dense (IntactKV's pivots)."""
    cache = QuantizingCache(qk, qv, layers, config=model.config)
    out = []
    x = torch.tensor([ids])
    with torch.no_grad():
        if intact:
            cache.enabled = False
            logits = model(input_ids=x[:, :intact], past_key_values=cache, use_cache=True).logits
            cache.enabled = True
            x = x[:, intact:]
            if x.shape[1] == 0:      # the whole prompt is pivot: its last logits are dense
                tok = int(logits[0, -1].argmax())
                out.append(tok)
                if tok in eos:
                    return out
                x = torch.tensor([[tok]])
        for _ in range(n - len(out)):
            logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            if tok in eos:
                break
            x = torch.tensor([[tok]])
    return out


def _model(family):
    return make_tiny(family, scale=8.0) if family in ("llama", "gpt2", "opt") else make(family)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"] + FAMILIES)
def test_fdt_equals_a_decode_with_a_quantizing_cache_on_every_family(family):
    lm = _model(family)
    n_layers = lm.model.config.num_hidden_layers
    ps = prompts(6, seed=5)
    eos = eos_ids(lm)
    res = divergence(make_pair(lm, Recipe.single("kv:int2", "*")), prompt_ids=ps, new_tokens=N,
                     batch_size=3, generate_compressed=True)
    want = []
    for p, ref in zip(ps, res.references):
        got = decode_with_quantized_cache(lm.model, p, N, eos, lambda x: slow_int(x, 2),
                                          lambda x: slow_int(x, 2), range(n_layers))
        want.append(greedy_fdt(ref, got, N))
    assert res.table.fdt.tolist() == want
    assert res.table.fdt.tolist() == res.table.fdt_generated.tolist()
    assert min(want) < N, "a 2-bit cache must show a divergence somewhere"


def test_keys_or_values_of_some_layers_and_a_mixed_recipe():
    lm = make("qwen3")
    ps = prompts(6, seed=8)
    eos = eos_ids(lm)
    # keys of layer 1 only (a sliding-window layer in this config is layer 0)
    res = divergence(make_pair(lm, Recipe.single("kv:int2:g8", "1.kcache")), prompt_ids=ps,
                     new_tokens=N, batch_size=2)
    want = [greedy_fdt(ref, decode_with_quantized_cache(
        lm.model, p, N, eos, lambda x: slow_int(x, 2, 8), None, [1]), N)
        for p, ref in zip(ps, res.references)]
    assert res.table.fdt.tolist() == want
    # weights and caches in one recipe: the compressed weights' model decoding with the cache
    pair = make_pair(lm, Recipe.parse("int4@*;kv:int3@0-1.kv"))
    res = divergence(pair, prompt_ids=ps, new_tokens=N, batch_size=2)
    weights_only = make_pair(lm, Recipe.parse("int4@*")).compressed
    want = [greedy_fdt(ref, decode_with_quantized_cache(
        weights_only, p, N, eos, lambda x: slow_int(x, 3), lambda x: slow_int(x, 3), [0, 1]), N)
        for p, ref in zip(ps, res.references)]
    assert res.table.fdt.tolist() == want


def test_selections_name_layers_keys_and_values():
    lm = make("mistral")
    names = lambda sel: [c.name for c, _ in Recipe.single("kv:int8", sel).components(lm.model)]
    assert names("*") == ["0.kcache", "0.vcache", "1.kcache", "1.vcache", "2.kcache", "2.vcache"]
    assert names("*.kcache") == ["0.kcache", "1.kcache", "2.kcache"]
    assert names("1-2.kv") == ["1.kcache", "1.vcache", "2.kcache", "2.vcache"]
    assert names("2.vcache, 0.kcache") == ["0.kcache", "2.vcache"]
    for spec, sel, words in [("kv:int8", "*.q", "not a KV cache"),
                             ("int4", "*.kcache", "weight spec"),
                             ("kv:int8", "5.kv", "out of range"),
                             ("kv:int4:g5", "*", "divides 16")]:
        with pytest.raises(DTMError, match=words):
            make_pair(lm, Recipe.single(spec, sel))


def test_the_dense_side_is_untouched_and_restore_is_exact():
    lm = make("gemma2")
    x = torch.tensor([prompts(1, seed=2, lo=12, hi=13)[0]])
    with torch.no_grad():
        before = lm.model(input_ids=x).logits
        pair = make_pair(lm, Recipe.single("kv:int2", "*"))
        comp = pair.compressed(input_ids=x).logits
        assert torch.equal(lm.model(input_ids=x).logits, before)
        assert not torch.equal(comp, before)
        pair.applied.restore()
        assert torch.equal(pair.compressed(input_ids=x).logits, before)


def test_fp8_per_vector_is_the_float8_cast_and_static_scales_come_from_calibration():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16) * torch.logspace(-3, 3, 7)[:, None]
    scale = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(fp8_quantize(x), (x / scale).to(torch.float8_e4m3fn).float() * scale)

    lm = make("mistral")
    calib = prompts(4, seed=11)
    with pytest.raises(DTMError, match="calibration"):
        make_pair(lm, Recipe.single("kv:fp8:tensor", "*"))
    pair = make_pair(lm, Recipe.single("kv:fp8:tensor", "*"), calibration=calib)
    # the scale of layer 1's keys: max |key| over the calibration prompts / 448
    seen = []
    comp = resolve_cache(lm.model, "1.kcache")[0]
    from dtm_core.compression.kvcache import KVHandle
    h = KVHandle()
    h.add(comp, lambda k: seen.append(k.abs().amax()) or k)
    with torch.no_grad():
        for p in calib:
            lm.model(input_ids=torch.tensor([p]))
    h.remove()
    s = torch.tensor(float(max(seen)) / 448)
    fn = pair.compressed.model.layers[1].self_attn._dtm_kv_quant["k"]
    k = torch.randn(1, 2, 5, 16) * float(max(seen))
    assert torch.equal(fn(k), (k / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kv_sweep_cells_equal_single_cache_pairs(family, tmp_path):
    """A sweep over caches: a layers x {kcache, vcache} table whose every cell (the layer's
    recorded inputs onward) equals the pair of that one cache component."""
    from dtm_core.analysis.sweep import sweep

    lm = _model(family)
    ps = prompts(5, seed=11)
    res = sweep(lm, "kv:int2", ps, N, cache_dir=tmp_path)
    n = lm.model.config.num_hidden_layers
    assert res.table.component.tolist() == [f"{i}.{k}" for i in range(n)
                                            for k in ("kcache", "vcache")]
    assert res.table.kind.tolist() == ["kcache", "vcache"] * n
    assert res.table.fdt_mean.min() < N
    for _, row in res.table.iterrows():
        d = divergence(make_pair(lm, Recipe.single("kv:int2", row.component)), prompt_ids=ps,
                       new_tokens=N)
        assert row.fdt_mean == d.table.fdt.mean(), row.component
        assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)
    keys = sweep(lm, "kv:int2", ps, N, cache_dir=tmp_path, kinds="kcache", layers="1")
    assert keys.table.component.tolist() == ["1.kcache"] and keys.computed == 0
    # with IntactKV: the pivot entries stay dense in the cell as in the pair
    ikv = sweep(lm, "kv:int2", ps, N, cache_dir=tmp_path, layers="1", intactkv=2)
    for _, row in ikv.table.iterrows():
        d = divergence(make_pair(lm, Recipe.single("kv:int2", row.component)), prompt_ids=ps,
                       new_tokens=N, intactkv=2)
        assert row.fdt_mean == d.table.fdt.mean(), row.component
        assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"] + FAMILIES)
def test_intactkv_keeps_the_pivot_entries_dense_in_a_quantized_cache(family):
    """IntactKV with kv:int2: FDT equals a decode whose cache holds the dense model's entries
    for the first K tokens and quantizes every later entry as it is stored; the free-running
    compressed text (the engine's decoder with IntactKV) too."""
    lm = _model(family)
    n_layers = lm.model.config.num_hidden_layers
    ps = prompts(6, seed=9, lo=4)
    eos = eos_ids(lm)
    k = 3
    res = divergence(make_pair(lm, Recipe.single("kv:int2", "*")), prompt_ids=ps, new_tokens=N,
                     batch_size=3, intactkv=k, generate_compressed=True)
    want = [greedy_fdt(ref, decode_with_quantized_cache(
        lm.model, p, N, eos, lambda x: slow_int(x, 2), lambda x: slow_int(x, 2),
        range(n_layers), intact=k), N) for p, ref in zip(ps, res.references)]
    assert res.table.fdt.tolist() == want
    assert res.table.fdt.tolist() == res.table.fdt_generated.tolist()
    plain = divergence(make_pair(lm, Recipe.single("kv:int2", "*")), prompt_ids=ps,
                       new_tokens=N, batch_size=3)
    assert plain.table.kl_mean.tolist() != res.table.kl_mean.tolist(), \
        "keeping the pivots dense must change something"


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt_neox"])
def test_estimated_kv_cells_rank_as_the_exact_sweep(family, tmp_path):
    """Estimated KV cells (issue 30 over issue 26's caches): the same order as the exact cells
    (Spearman on KL >= 0.8; 1.0 measured) and the same size (the sum within a factor 1.5)."""
    from dtm_core.analysis.sweep import sweep
    from dtm_core.analysis.sweep.estimate import estimate_sweep

    lm = make(family)
    ps = prompts(8, seed=3)
    for spec in ("kv:int4", "kv:int3"):
        exact = sweep(lm, spec, ps, 12, cache_dir=tmp_path)
        est = estimate_sweep(lm, spec, ps, 12, cache_dir=tmp_path)
        assert set(est.table.component) == set(exact.table.component)
        assert est.table.exact.all() and est.agreement()["spearman_kl"] >= 0.8
        ratio = est.table.kl_estimate.sum() / exact.table.kl_mean.sum()
        assert 1 / 1.5 < ratio < 1.5, ratio


def test_cache_fisher_gradients_are_finite_differences_of_the_probe_sum():
    """The squared gradient kept for a stored entry is the square of the derivative of sum u . z
    (the argmax probe, fixed) with respect to that entry, by finite differences in float64: an
    entry of the first layer (a leaf) and one of a later layer (inside the graph)."""
    from dtm_core.analysis.sweep.estimate_kv import cache_fisher
    from dtm_core.compression.kvcache import cache_hooks
    from dtm_core.measure.divergence import reference_continuations

    lm = make("qwen2")
    lm.model.double()
    ids = prompts(1, seed=4)[0]
    ref = reference_continuations(lm, [ids], 4)[0]
    comps = resolve_cache(lm.model, "0.vcache,1.kcache")
    f = cache_fisher(lm, [ids], [ref], comps, probe="argmax")
    seq = torch.tensor([ids + ref])
    pos = torch.arange(len(ref)) + len(ids) - 1
    with torch.no_grad():
        z0 = lm.model(input_ids=seq, use_cache=False).logits[0, pos]
    p = torch.softmax(z0, -1)
    u = torch.zeros_like(p).scatter_(-1, p.argmax(-1, keepdim=True), 1.0) - p

    def probe_sum(comp, at, h):
        def make(c, own):
            def fn(x):
                if c.name != comp.name:
                    return x
                x = x.clone()
                x[at] += h
                return x
            return fn
        with cache_hooks([comp], make), torch.no_grad():
            z = lm.model(input_ids=seq, use_cache=False).logits[0, pos]
        return float((z * u).sum())
    # (the families' norms and rotary tables compute in float32 even in a float64 model, so
    # a wide five-point stencil: its float32 noise and its O(h^4) error both stay near 1e-4)
    for comp, at in ((comps[0], (0, 1, 2, 3)), (comps[1], (0, 0, len(ids), 5))):
        h = 1e-2
        fd = (-probe_sum(comp, at, 2 * h) + 8 * probe_sum(comp, at, h)
              - 8 * probe_sum(comp, at, -h) + probe_sum(comp, at, -2 * h)) / (12 * h)
        got = float(f["g2"][comp.name][0][at])
        assert abs(fd) > 1e-3
        assert got ** 0.5 == pytest.approx(abs(fd), rel=0.01), (comp.name, got ** 0.5, fd)

def test_app_sweep_over_caches_and_the_cell_opened_in_compare(tmp_path, monkeypatch,
                                                              default_model):
    """The Sensitivity tab's handler with a kv spec on the default model: a kcache and a vcache
    cell for the layer; the clicked cell opens as the pair that was measured."""
    import pandas as pd

    from ui import common, sensitivity

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    common.CACHE._dense = ("default", default_model)
    common.CACHE._pairs.clear()
    f = tmp_path / "few.txt"
    f.write_text("The capital of France is\nWater boils at\nOnce upon a time\n")
    heat, table, msg, csv, state, parquet = sensitivity.run_sweep(
        "default", "kv:int2", str(f), "general", False, 8, "4", "", "fdt_mean",
        progress=lambda *a, **k: None)
    assert "Done" in msg, msg
    cells = pd.read_csv(csv).set_index("component")
    assert sorted(cells.index) == ["4.kcache", "4.vcache"]
    opened = sensitivity._open_cell(state, "4.kcache")
    assert opened[3] == "4.kcache"
    req = common.pair_request("default", opened[1], opened[2], opened[3], "", opened[5],
                              opened[7]["value"])
    pair = common.CACHE.open(req, [opened[4]])
    d = divergence(pair, f.read_text().splitlines(), 8)
    assert cells.loc["4.kcache"].fdt_mean == d.table.fdt.mean()
    assert cells.loc["4.kcache"].kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-4,
                                                          abs=1e-9)
    # the Run sweep button (Estimate first, the default): the caches' estimates drawn first
    # (marked ≈), then the exact cells; the estimate drawn is the engine's
    from dtm_core.analysis.sweep.estimate import estimate_sweep
    from dtm_core.models.generation import encode_prompts
    from ui.estimate import sweep_handler

    frames = list(sweep_handler(sensitivity.run_sweep)(
        "default", "kv:int2", str(f), "general", False, 8, "2-3", "", "kl_mean",
        settle=1, progress=lambda *a, **k: None))
    first = frames[0]
    assert "Estimated 4 cells" in first[2], first[2]
    z = first[0].data[0]
    assert "≈" in str(z.text) or "≈" in str(first[0].layout.title.text)
    est = estimate_sweep(default_model, "kv:int2",
                         encode_prompts(default_model.tokenizer, f.read_text().splitlines()), 8,
                         layers="2-3")
    want = est.table.set_index("component").kl_estimate
    got = {f"{y}.{x}": v for y, row in zip(z.y, z.z) for x, v in zip(z.x, row)}
    for name in want.index:
        assert got[name] == pytest.approx(want[name], rel=1e-6), name
    assert "Done" in frames[-1][2] or "settled" in frames[-1][2], frames[-1][2]


def test_level_curves_over_cache_bits(default_model):
    """Level curves of kv:int over 2, 4 and 8 bits for the keys and the values of every layer:
    each point is the pair of that spec on *.kcache or *.vcache."""
    from dtm_core.analysis.levels import level_curves
    from dtm_core.models.generation import encode_prompts

    texts = ["The capital of France is", "Water boils at"]
    t = level_curves(default_model, "kv:int", "2,4,8", "kcache,vcache", texts, 6)
    assert t.spec.tolist() == ["kv:int2", "kv:int4", "kv:int8"] * 2
    assert t.kind.tolist() == ["kcache"] * 3 + ["vcache"] * 3
    ids = encode_prompts(default_model.tokenizer, texts)
    d = divergence(make_pair(default_model, Recipe.single("kv:int4", "*.vcache")),
                   prompt_ids=ids, new_tokens=6)
    row = t[(t.kind == "vcache") & (t.spec == "kv:int4")].iloc[0]
    assert row.fdt_mean == d.summary["fdt_mean"]
    assert row.kl_mean == pytest.approx(d.summary["kl_mean"], rel=1e-6)
    k = t[t.kind == "kcache"].set_index("spec").kl_mean
    assert k["kv:int2"] > k["kv:int4"] > k["kv:int8"]
