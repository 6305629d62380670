"""Explain with KV caches (issue 26): patching one layer's key or value cache back to dense puts
the dense model's stored entries into the compressed model's attention (every position up to the
chosen one, or that position only), and the reverse puts the compressed model's quantized entries
into the dense model. Held to pairs whose recipes leave that cache out (where the two must agree
exactly) on several families, and to the dense model when every cache is patched."""
from __future__ import annotations

import math

import pytest
import torch

from dtm_core.analysis.explain import explain, explain_set, first_divergence
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.errors import DTMError
from dtm_core.measure.divergence import reference_continuations
from test_families import make, prompts

N = 10


def logp_at(model, seq, tok) -> float:
    with torch.no_grad():
        z = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
    return float(torch.log_softmax(z.double(), -1)[tok])


def diverging(lm, spec, seed=3):
    """A prompt whose continuation the pair (``spec`` on every cache) diverges on."""
    pair = make_pair(lm, Recipe.single(spec, "*"))
    for ids in prompts(12, seed=seed):
        ref = reference_continuations(lm, [ids], N)[0]
        t = first_divergence(pair, ids, ref)
        if t is not None:
            return pair, ids, ref, t
    raise AssertionError("no prompt diverges")


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt_neox"])
def test_patching_a_cache_back_equals_the_pair_without_it(family):
    lm = make(family)
    n = lm.model.config.num_hidden_layers
    pair, ids, ref, t = diverging(lm, "kv:int2")
    e = explain(pair, ids, N, position=t, reference=ref)
    rows = e.patching.set_index("component")
    assert {f"{i}.{k}" for i in range(n) for k in ("kcache", "vcache")} <= set(rows.index)
    assert set(rows.loc[rows.kind.isin(["kcache", "vcache"]), "patched_by"]) == {"cache"}
    seq = ids + ref[:t]
    # layer 0's inputs are the same in both models: its dense keys are the keys the compressed
    # model would compute itself, so patching them back is the pair that leaves them unquantized
    for name, rest in (("0.kcache", "0.vcache," + ",".join(f"{i}.kv" for i in range(1, n))),
                       ("0.vcache", "0.kcache," + ",".join(f"{i}.kv" for i in range(1, n)))):
        without = make_pair(lm, Recipe.single("kv:int2", rest))
        assert rows.loc[name, "restored_logp"] == pytest.approx(
            logp_at(without.compressed, seq, e.dense_token), abs=1e-5)
        # the reverse: the dense model with the compressed model's quantized layer-0 entries
        only = make_pair(lm, Recipe.single("kv:int2", name))
        assert rows.loc[name, "reverse_logp_compressed_token"] == pytest.approx(
            logp_at(only.compressed, seq, e.compressed_token), abs=1e-5)
    # every cache patched at once: the dense model exactly
    whole = explain(pair, ids, N, position=t, reference=ref, granularity="model",
                    components="*.kv", reverse=False).patching.iloc[0]
    assert whole.restores_argmax and whole.kl_after_patch == pytest.approx(0, abs=1e-9)
    assert whole.restored_logp == pytest.approx(e.logp_dense, abs=1e-6)
    assert whole.restored_share == pytest.approx(1, abs=1e-6)


def test_position_scope_patches_one_entry_and_layers_group_weights_with_caches():
    lm = make("qwen3")
    pair, ids, ref, t = diverging(lm, "kv:int2", seed=5)
    seq = ids + ref[:t]
    at = len(seq) - 1
    e = explain(pair, ids, N, position=t, reference=ref, scope="position",
                components="0.kcache", reverse=False)
    row = e.patching.set_index("component").loc["0.kcache"]
    # by hand: the quantized keys of layer 0 with the dense key at the position put back
    from dtm_core.compression.kvcache import cache_hooks, int_quantize, resolve_cache

    comp = resolve_cache(pair.compressed, "0.kcache")[0]
    dense_k = {}

    def grab(c, own):
        def fn(x):
            dense_k["k"] = x.detach()
            return x
        return fn
    with cache_hooks(resolve_cache(lm.model, "0.kcache"), grab), torch.no_grad():
        lm.model(input_ids=torch.tensor([seq]), use_cache=False)

    def one(c, own):
        def fn(x):
            y = int_quantize(x, 2)
            y[..., at, :] = dense_k["k"][..., at, :]
            return y
        return fn
    with cache_hooks([comp], one):
        want = logp_at(pair.compressed, seq, e.dense_token)
    assert row.restored_logp == pytest.approx(want, abs=1e-5)
    # a mixed recipe: weights and caches in one layer's row
    mixed = make_pair(lm, Recipe.parse("int3:g16@*;kv:int4@*"))
    ex = explain(mixed, ids, N, position=0, reference=ref, granularity="layer", reverse=False)
    assert set(ex.patching.patched_by) == {"output and cache"}
    assert math.isfinite(ex.patching.kl_after_patch.sum())


def test_explain_set_ranks_caches_and_bad_names_get_one_sentence():
    lm = make("qwen2")
    pair = make_pair(lm, Recipe.single("kv:int2", "*"))
    table, found = explain_set(pair, prompts(4, seed=2), N)
    assert found and set(table.component) >= {"0.kcache", "0.vcache"}
    assert table["first"].sum() == len(found)
    with pytest.raises(DTMError, match="out of range"):
        explain(pair, prompts(1, seed=2)[0], N, position=0, components="9.kcache")
