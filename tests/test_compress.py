"""Compression specs against slow, obviously-correct references, and reversible application."""
import itertools

import pytest
import torch

from dtm_core import DTMError
from dtm_core.compression.recipe import (Recipe, apply_recipe, parse_spec,
                                         quantize_activation_per_token, transform_weight)
from dtm_core.models.components import all_components, resolve
from dtm_core.compression.pair import make_pair, shared_copy, tensor_bytes

from conftest import make_tiny


def rand(rows=12, cols=40, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# ---- slow references: loops over rows / groups / elements ----------------------------------

def ref_quant(w, bits, group, asym):
    out = torch.empty_like(w)
    rows, cols = w.shape
    g = group or cols
    for r in range(rows):
        for start in range(0, cols, g):
            vals = [float(v) for v in w[r, start:start + g]]
            if asym:
                lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                qmax = 2 ** bits - 1
                scale = torch.tensor((hi - lo) / qmax, dtype=torch.float32)
                scale = scale if scale != 0 else torch.tensor(1.0)
                zero = torch.round(-torch.tensor(lo, dtype=torch.float32) / scale)
                for k, v in enumerate(vals):
                    q = min(max(torch.round(torch.tensor(v) / scale) + zero, 0), qmax)
                    out[r, start + k] = (q - zero) * scale
            else:
                qmax = 2 ** (bits - 1) - 1
                scale = torch.tensor(max(abs(v) for v in vals), dtype=torch.float32) / qmax
                scale = scale if scale != 0 else torch.tensor(1.0)
                for k, v in enumerate(vals):
                    q = min(max(torch.round(torch.tensor(v) / scale), -qmax - 1), qmax)
                    out[r, start + k] = q * scale
    return out


@pytest.mark.parametrize("bits,group,asym", [(8, None, False), (4, None, False), (4, 16, False),
                                             (3, 16, True), (2, None, True), (4, 12, False),
                                             (5, 7, True)])
def test_int_quant_matches_reference(bits, group, asym):
    w = rand()
    spec = parse_spec(f"int{bits}" + (f":g{group}" if group else "") + (":asym" if asym else ""))
    got = transform_weight(w, spec)
    want = ref_quant(w, bits, group, asym)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # grid: every group holds at most 2**bits distinct values
    g = group or w.shape[1]
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            assert len(set(got[r, s:s + g].tolist())) <= 2 ** bits


def test_magnitude_exact_sparsity_and_keeps_largest():
    w = rand(16, 50, seed=1)
    for s in (0.0, 0.1, 0.5, 0.9, 1.0):
        got = transform_weight(w, parse_spec(f"magnitude:{s}"))
        k = round(s * w.numel())
        assert int((got == 0).sum()) == k
        kept = got != 0
        assert torch.equal(got[kept], w[kept])
        if 0 < k < w.numel():  # every pruned weight is no larger than every kept one
            assert w[~kept].abs().max() <= w[kept].abs().min()


def test_nm_pattern():
    w = rand(8, 32, seed=2)
    got = transform_weight(w, parse_spec("nm:2:4"))
    for r, start in itertools.product(range(8), range(0, 32, 4)):
        block, orig = got[r, start:start + 4], w[r, start:start + 4]
        assert int((block != 0).sum()) == 2
        top2 = set(orig.abs().argsort(descending=True)[:2].tolist())
        assert {i for i in range(4) if block[i] != 0} == top2
    with pytest.raises(DTMError, match="multiple of 4"):
        transform_weight(rand(4, 30), parse_spec("nm:2:4"))


def test_wanda_per_row_reference():
    w = rand(10, 20, seed=3)
    norm = torch.rand(20, generator=torch.Generator().manual_seed(4)) * 5
    got = transform_weight(w, parse_spec("wanda:0.5"), in_norm=norm)
    for r in range(10):
        score = [abs(float(w[r, j])) * float(norm[j]) for j in range(20)]
        pruned = set(sorted(range(20), key=lambda j: score[j])[:10])
        assert {j for j in range(20) if got[r, j] == 0} == pruned
        assert all(got[r, j] == w[r, j] for j in range(20) if j not in pruned)


def test_activation_quant_per_token():
    x = torch.randn(2, 5, 16)
    q = quantize_activation_per_token(x)
    for b, t in itertools.product(range(2), range(5)):
        scale = x[b, t].abs().max() / 127
        steps = q[b, t] / scale
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
        assert float((q[b, t] - x[b, t]).abs().max()) <= float(scale) / 2 + 1e-6


@pytest.mark.parametrize("bad", ["int9", "int1", "magnitude", "magnitude:1.5", "nm:4:2", "foo",
                                 "int4:g0", "int4:x", "wanda:abc", "", "int4:asym:asym"])
def test_bad_specs_name_the_accepted_forms(bad):
    with pytest.raises(DTMError, match="Accepted forms"):
        parse_spec(bad)


def test_spec_round_trip():
    for s in ["none", "magnitude:0.9", "nm:2:4", "wanda:0.5", "int4", "int4:g128",
              "int3:g64:asym", "int8:asym", "w8a8"]:
        assert str(parse_spec(s)) == s


def test_conv1d_orientation_gpt2():
    lm = make_tiny("gpt2")
    comp = resolve(lm.model, "0.up")[0]
    w = comp.module.weight.detach().clone()  # Conv1D: (in, out)
    with apply_recipe(lm.model, Recipe.single("nm:2:4", "0.up")):
        new = comp.module.weight
        assert new.shape == w.shape
        # the N:M pattern runs along the input dimension, which is dim 0 for Conv1D
        blocks = (new.t() != 0).reshape(new.shape[1], -1, 4).sum(-1)
        assert bool((blocks == 2).all())
        want = transform_weight(w.t().float(), parse_spec("nm:2:4")).t()
        assert torch.equal(new, want)
    assert torch.equal(comp.module.weight, w)


@pytest.mark.parametrize("spec", ["int4:g16", "magnitude:0.5", "nm:2:4", "w8a8", "int3:asym"])
def test_apply_restore_bit_exact_and_copies_only_changed(tiny, spec):
    model = tiny.model
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    x = torch.randint(3, 500, (2, 9))
    ref_out = model(x).logits
    sel = "0.*,2.o"
    changed = {c.path + ".weight" for c in resolve(model, sel)}
    applied = apply_recipe(model, Recipe.single(spec, sel))
    for n, p in model.named_parameters():
        if n in changed:
            assert p.data_ptr() != before[n][0]
        else:
            assert p.data_ptr() == before[n][0], f"{n} was copied"
    assert not torch.equal(model(x).logits, ref_out)
    applied.restore()
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1])
    assert torch.equal(model(x).logits, ref_out)


def test_pair_shares_untouched_tensors(default_model):
    pair = make_pair(default_model, Recipe.single("int4:g128", "*.q,3.down"))
    dense_bytes = tensor_bytes(default_model.model)
    extra = tensor_bytes(default_model.model, pair.compressed) - dense_bytes
    assert extra == pair.applied.changed_bytes > 0
    comps = resolve(default_model.model, "*.q,3.down")
    assert extra == sum(c.module.weight.numel() * 4 for c in comps)
    # the dense side is untouched
    names = {c.path for c in comps}
    for c_d, c_c in zip(all_components(default_model.model), all_components(pair.compressed)):
        same = c_d.module.weight.data_ptr() == c_c.module.weight.data_ptr()
        assert same == (c_d.path not in names)


def test_shared_copy_shares_everything():
    lm = make_tiny("llama")
    cp = shared_copy(lm.model)
    assert cp is not lm.model
    assert tensor_bytes(lm.model, cp) == tensor_bytes(lm.model)
