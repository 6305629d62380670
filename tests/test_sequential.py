"""--sequential: each layer's calibration statistics come from the outputs of the layers before it
as already compressed. Checked against the slow, obviously-correct way: compress layer by layer,
each time with a fresh calibration pass of the whole partially compressed model."""
from __future__ import annotations

import pytest
import torch

from dtm_core.compression.calibration import Calibration, calibration_from
from dtm_core.models.components import num_layers
from dtm_core.compression.recipe import Recipe, apply_recipe
from dtm_core.compression.pair import make_pair, shared_copy

from conftest import make_tiny, random_prompts
from test_families import make


def slow_sequential(lm, items, prompts):
    """``items``: [(spec, layer)], applied layer by layer; each layer's statistics from a full
    forward pass of the model compressed so far."""
    work = shared_copy(lm.model)
    for n in range(num_layers(work)):
        here = [(spec, sel) for spec, sel, layer in items if layer == n]
        if here:
            calib = Calibration(work, prompts)       # a fresh pass, not the shared one
            apply_recipe(work, Recipe.parse(";".join(f"{s}@{sel}" for s, sel in here)), calib)
    return work


def weights(model):
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,spec", [("llama", "gptq:int3:g16"), ("llama", "awq:int3"),
                                         ("llama", "sparsegpt:0.6"), ("gemma2", "gptq:int3"),
                                         ("phi3", "awq:int3:g16")])
def test_sequential_equals_compressing_layer_by_layer(family, spec):
    lm = make_tiny(family, scale=4.0) if family == "llama" else make(family)
    prompts = random_prompts(6, seed=3, lo=6, hi=16)
    layers = num_layers(lm.model)
    pair = make_pair(lm, Recipe.single(spec), calibration=prompts, sequential=True)
    want = weights(slow_sequential(lm, [(spec, f"{n}.*", n) for n in range(layers)], prompts))
    got = weights(pair.compressed)
    changed = 0
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-5, rtol=1e-5, msg=name)
        changed += not torch.equal(w, dict(lm.model.named_parameters())[name])
    assert changed
    # and it is not --no-sequential (dense inputs everywhere): later layers differ
    plain = weights(make_pair(lm, Recipe.single(spec), calibration=prompts,
                              sequential=False).compressed)
    last = [n for n in want if f".{layers - 1}." in n and n in plain]
    assert any(not torch.allclose(plain[n], got[n]) for n in last)
    first = [n for n in want if ".0." in n and n in plain]
    assert all(torch.equal(plain[n], got[n]) for n in first)   # layer 0 sees dense inputs
    assert "sequential" in pair.label


def test_layers_without_calibration_count_for_the_layers_after():
    """int3 on layer 0 (no statistics) changes what GPTQ on layer 1 is calibrated on."""
    lm = make_tiny("llama", scale=4.0)
    prompts = random_prompts(6, seed=5, lo=6, hi=16)
    recipe = Recipe.parse("int3@0.*;gptq:int4@1.*")
    pair = make_pair(lm, recipe, calibration=prompts, sequential=True)
    want = weights(slow_sequential(lm, [("int3", "0.*", 0), ("gptq:int4", "1.*", 1)], prompts))
    for name, w in want.items():
        torch.testing.assert_close(weights(pair.compressed)[name], w, atol=1e-5, rtol=1e-5)
    plain = weights(make_pair(lm, recipe, calibration=prompts, sequential=False).compressed)
    assert not torch.allclose(plain["model.layers.1.mlp.down_proj.weight"],
                              weights(pair.compressed)["model.layers.1.mlp.down_proj.weight"])


def test_one_layer_recipes_are_the_same_either_way():
    lm = make_tiny("llama", scale=4.0)
    prompts = random_prompts(5, seed=7)
    calib = calibration_from(lm, prompts)
    for sel in ("1.q", "1.*"):
        a = make_pair(lm, Recipe.single("gptq:int3", sel), calibration=calib, sequential=True)
        b = make_pair(lm, Recipe.single("gptq:int3", sel), calibration=calib, sequential=False)
        for name, w in weights(b.compressed).items():
            torch.testing.assert_close(weights(a.compressed)[name], w, atol=1e-6, rtol=1e-6)
        assert "sequential" not in a.label        # nothing was gathered layer by layer


@pytest.mark.parametrize("spec,default", [("gptq:int3:g16", True), ("sparsegpt:0.6", True),
                                          ("wanda:0.5", True), ("awq:int3", True),
                                          ("nvfp4:a", False), ("int4:g16", False)])
def test_the_default_is_llm_compressors(spec, default):
    """A whole-model pair of GPTQ, SparseGPT, Wanda or AWQ is calibrated layer by layer unless
    --no-sequential (as llm-compressor's sequential pipeline runs them); other methods are not."""
    lm = make_tiny("llama", scale=4.0)
    prompts = random_prompts(6, seed=11, lo=6, hi=16)
    calib = calibration_from(lm, prompts)
    recipe = Recipe.single(spec)
    assert recipe.sequential_default is default
    got = weights(make_pair(lm, recipe, calibration=calib).compressed)
    want = weights(make_pair(lm, recipe, calibration=calib, sequential=default).compressed)
    other = weights(make_pair(lm, recipe, calibration=calib, sequential=not default).compressed)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=0, rtol=0, msg=name)
    if recipe.needs_calibration and default:
        assert any(not torch.equal(got[n], other[n]) for n in got)


def test_cli_and_page_flags():
    from dtm_core.cli import build_parser
    from dtm_core.cli.options import pair_request
    from ui.common import pair_request as page_request

    parse = build_parser().parse_args
    base = ["divergence", "--compress", "gptq:int4", "--prompts", "x"]
    assert pair_request(parse(base)).sequential is None
    assert pair_request(parse(base + ["--sequential"])).sequential is True
    assert pair_request(parse(base + ["--no-sequential"])).sequential is False
    ticked = page_request("default", "custom spec", "gptq:int4", "*.*", None)
    assert ticked.sequential is None
    assert page_request("default", "custom spec", "gptq:int4", "*.*", None,
                        sequential=False).sequential is False
