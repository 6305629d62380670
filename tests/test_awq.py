"""AWQ: folding its scales keeps every family's function; the per-component weights it uses are the
deployed (folded, quantized) model's; its group output error is never above RTN's; the linears
that read one input share one set of scales and one Hessian (sweep cells = pairs: test_gptq)."""
from __future__ import annotations

import copy

import pytest
import torch

from dtm_core.compression.calibration import Calibration, calibration_from
from dtm_core.models.components import decoder_layers, family_of, resolve
from dtm_core.compression.recipe import Recipe, apply_recipe, gather_statistics
from dtm_core.errors import DTMError
from dtm_core.compression.methods import parse_spec
from dtm_core.compression.methods.awq import awq_quantize, fold_scales, output_error, search_scales
from dtm_core.compression.methods.rtn import quantize_weight
from dtm_core.compression.pair import make_pair

from conftest import make_tiny, random_prompts
from test_families import FAMILIES, make


def _fold_everywhere(model, scale_of) -> set[str]:
    fam = family_of(model)
    done = set()
    for n, layer in enumerate(decoder_layers(model)):
        seen = set()
        for k in fam.kinds_in(layer):
            norm = fam.input_norm(model.config, k)
            if norm and norm not in seen:
                seen.add(norm)
                done |= set(fold_scales(model, n, k, scale_of(layer.get_submodule(norm))))
    return done


@pytest.mark.parametrize("family", FAMILIES + ["llama", "gpt2", "opt"])
def test_folding_scales_without_quantizing_keeps_the_logits(family):
    lm = make(family) if family in FAMILIES else make_tiny(family, scale=4.0)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = lm.model(ids).logits
    g = torch.Generator().manual_seed(0)
    folded = _fold_everywhere(
        lm.model, lambda norm: torch.exp(torch.rand(norm.weight.shape[0], generator=g) * 3 - 1.5))
    assert folded, family
    out = lm.model(ids).logits
    assert float((out - ref).abs().max()) < 2e-5 * max(1.0, float(ref.abs().max()))


def test_folding_is_checked_by_the_logits():
    """The same scales on the weights only (the norm left alone) change the logits: the check
    above can fail."""
    lm = make_tiny("llama", scale=4.0)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = lm.model(ids).logits
    with torch.no_grad():
        lm.model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    assert float((lm.model(ids).logits - ref).abs().max()) > 1e-3


def test_gemma_norms_fold_through_their_offset():
    lm = make("gemma2")
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(2))
    ref = lm.model(ids).logits
    norm = lm.model.model.layers[1].input_layernorm
    before = norm.weight.detach().clone()
    fold_scales(lm.model, 1, "q", torch.full((before.shape[0],), 2.0))
    # (1 + w) / 2 - 1, not w / 2
    torch.testing.assert_close(norm.weight.detach(), (1 + before) / 2 - 1)
    assert float((lm.model(ids).logits - ref).abs().max()) < 1e-4


def test_awq_weights_are_the_folded_quantized_model():
    """A whole-model AWQ pair computes what the deployed model (scales folded into the norms,
    Q(W diag(s)) stored) computes, within fp32 rounding; where no norm precedes (o, down) the
    effective weight Q(W s)/s is all there is."""
    lm = make_tiny("llama", scale=4.0)
    prompts = random_prompts(6, seed=3, lo=6, hi=14)
    calib = calibration_from(lm, prompts)
    spec = parse_spec("awq:int4:g16")
    pair = make_pair(lm, Recipe.single(spec), calibration=calib, sequential=False)
    pairs = [(c, spec) for c in resolve(lm.model, "*.*")]
    stats = gather_statistics(lm.model, pairs, calib)
    deployed = copy.deepcopy(lm.model)
    fam = family_of(deployed)
    for c, _ in pairs:
        s = stats[(c.path, spec)]["group"]["scales"]
        if c.kind in ("q", "gate"):          # one fold per norm
            fold_scales(deployed, c.layer, c.kind, s)
    with torch.no_grad():
        for c, _ in pairs:
            mod = deployed.get_submodule(c.path)
            if fam.input_norm(deployed.config, c.kind):
                mod.weight.copy_(quantize_weight(mod.weight, 4, 16))
            else:
                s = stats[(c.path, spec)]["group"]["scales"]
                mod.weight.copy_(awq_quantize(mod.weight, s, 4, 16, False))
    ids = torch.tensor([prompts[0]])
    want = deployed(ids).logits
    got = pair.compressed(ids).logits
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
    assert float((got - lm.model(ids).logits).abs().max()) > 1e-3   # it did quantize


def _outlier_problem(seed=0, rows=24, cols=64, n=300):
    g = torch.Generator().manual_seed(seed)
    # a few input channels carry large activations, as in LLMs (the case AWQ is built for)
    gain = torch.ones(cols)
    gain[torch.randperm(cols, generator=g)[:4]] = 20.0
    x = torch.randn(n, cols, generator=g) * gain
    ws = {f"m{i}": torch.randn(rows, cols, generator=g) for i in range(3)}
    return ws, x, 2 / n * x.t() @ x


@pytest.mark.parametrize("bits,group", [(4, None), (3, 16), (4, 32)])
def test_awq_group_error_is_at_most_rtn(bits, group):
    ws, x, h = _outlier_problem()
    found = search_scales(ws, x.abs().mean(0), h, bits, group, False)
    err = lambda w, q: float(((x.double() @ (w - q).double().t()) ** 2).sum())  # noqa: E731
    awq = sum(err(w, awq_quantize(w, found["scales"], bits, group, False)) for w in ws.values())
    rtn = sum(err(w, quantize_weight(w, bits, group)) for w in ws.values())
    assert awq <= rtn * (1 + 1e-6)
    assert len(found["errors"]) == 20 and found["errors"][0] == pytest.approx(
        sum(output_error(w, quantize_weight(w, bits, group), h) for w in ws.values()), rel=1e-6)
    if bits == 3:
        assert awq < 0.9 * rtn and found["alpha"] > 0     # outliers: scaling pays


def test_linears_reading_one_input_share_statistics_and_scales():
    lm = make_tiny("llama", scale=4.0)
    prompts = random_prompts(5, seed=6)
    calib = Calibration(lm.model, prompts)
    layer = lm.model.model.layers[1]
    q, k, v, o = (f"model.layers.1.self_attn.{n}_proj" for n in "qkvo")
    got = calib.many(["input_hessian"], [q, k, v, o])
    assert calib.passes == 1
    assert got[q]["input_hessian"] is got[k]["input_hessian"] is got[v]["input_hessian"]
    assert got[o]["input_hessian"] is not got[q]["input_hessian"]
    assert calib.peers(k) == [q, k, v] and calib.peers(o) == [o]
    # the shared accumulator is the statistic each would have had alone
    alone = Calibration(lm.model, prompts)
    torch.testing.assert_close(alone.get("input_hessian", [v])[v], got[v]["input_hessian"],
                               rtol=0, atol=0)
    assert layer is not None
    # AWQ of q alone uses the q/k/v group's scales: q's weight is the one of the whole recipe
    spec = parse_spec("awq:int3:g16")
    one = make_pair(lm, Recipe.single(spec, "1.q"), calibration=prompts)
    every = make_pair(lm, Recipe.single(spec, "1.q,1.k,1.v"), calibration=prompts)
    torch.testing.assert_close(one.compressed.model.layers[1].self_attn.q_proj.weight,
                               every.compressed.model.layers[1].self_attn.q_proj.weight,
                               rtol=0, atol=0)
    assert one.compressed.model.layers[1].self_attn.k_proj.weight is layer.self_attn.k_proj.weight


def test_fused_projections_are_one_group():
    """Phi-3's q is rows of the fused qkv: its scales are searched on the whole fused matrix
    (the group that reads the input), and only q's rows change."""
    lm = make("phi3")
    prompts = random_prompts(4, seed=2)
    spec = parse_spec("awq:int3")
    calib = calibration_from(lm, prompts)
    qkv = "model.layers.0.self_attn.qkv_proj"
    mod = lm.model.get_submodule(qkv)
    dense = mod.weight.detach().clone()
    st = calib.many(list(spec.needs), [qkv])[qkv]
    want = search_scales({qkv: dense.float()}, st["input_absmean"], st["input_hessian"], 3, None,
                         False)["scales"]
    rows = family_of(lm.model).kind("q").rows(lm.model.config)
    with apply_recipe(lm.model, Recipe.single(spec, "0.q"), calib):
        w = mod.weight.detach().clone()
    torch.testing.assert_close(w[rows], awq_quantize(dense[rows], want, 3, None, False))
    others = torch.ones(len(dense), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(w[others], dense[others]) and not torch.equal(w[rows], dense[rows])


def test_awq_specs_parse_and_refuse_in_one_sentence():
    assert str(parse_spec("awq:int4:g128")) == "awq:int4:g128"
    assert str(parse_spec("awq:int3:g64:asym")) == "awq:int3:g64:asym"
    assert parse_spec("awq:int4").level == 4 and parse_spec("awq:int4").needs
    for bad in ("awq", "awq:int9", "awq:int4:g64:g32", "awq:int4:foo"):
        with pytest.raises(DTMError, match="Accepted forms"):
            parse_spec(bad)
    with pytest.raises(DTMError, match="calibration"):
        make_pair(make_tiny("llama"), Recipe.single("awq:int4"))
