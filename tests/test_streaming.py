"""Lockstep streaming: agrees with the batch engine, uses the KV cache, reuses loaded pairs."""
import threading

import pytest
import torch

from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.compression.pair import make_pair
from dtm_core.registry import Registry
from dtm_core.measure.streaming import stream_pair

from conftest import random_prompts


@pytest.mark.parametrize("spec", ["int4:g16", "magnitude:0.4", "none"])
def test_stream_matches_engine(tiny, spec):
    pair = make_pair(tiny, Recipe.single(spec, "1.*,2.up"))
    for ids in random_prompts(4, seed=7):
        states = list(stream_pair(pair, prompt_ids=ids, new_tokens=12))
        st = states[-1]
        res = divergence(pair, prompt_ids=[ids], new_tokens=12)
        assert st.dense_tokens == res.references[0]
        assert st.fdt == res.table.fdt[0]
        assert st.sdt == pytest.approx(res.table.sdt[0])
        tm = res.tokens[0]
        assert [s.forced_token for s in st.steps if s.dense_token is not None] == \
            tm.comp_argmax.tolist()
        kl = [s.kl for s in st.steps if s.dense_token is not None]
        torch.testing.assert_close(torch.tensor(kl), tm.kl, atol=1e-4, rtol=1e-3)
        # the compressed column is the compressed model's own greedy output
        from dtm_core.models.generation import greedy_generate
        own = greedy_generate(pair.compressed, [ids], 12, 0, {2})[0]
        assert st.comp_tokens == own
        assert len(states) >= 2


def test_stream_uses_kv_cache_one_token_per_step(tiny):
    pair = make_pair(tiny, Recipe.single("int4:g16"))
    seen = {"dense": [], "comp": []}
    hooks = [m.get_input_embeddings().register_forward_hook(
        lambda mod, a, out, k=k: seen[k].append(tuple(a[0].shape)))
        for k, m in (("dense", tiny.model), ("comp", pair.compressed))]
    try:
        ids = random_prompts(1, seed=3, lo=9, hi=10)[0]
        list(stream_pair(pair, prompt_ids=ids, new_tokens=10))
    finally:
        for h in hooks:
            h.remove()
    # one prefill of the whole prompt, then one new token per row and step: the prefix is never
    # recomputed (the compressed model runs its free and its teacher-forced row together)
    assert seen["dense"][0] == (1, len(ids)) and seen["comp"][0] == (2, len(ids))
    assert set(seen["dense"][1:]) == {(1, 1)} and set(seen["comp"][1:]) == {(2, 1)}
    assert len(seen["dense"]) >= 5


def test_stop_event_ends_stream(tiny):
    pair = make_pair(tiny, Recipe.single("int8"))
    stop = threading.Event()
    states = []
    for st in stream_pair(pair, prompt_ids=[5, 6, 7], new_tokens=50, stop=stop):
        states.append(len(st.steps))
        if len(st.steps) == 3:
            stop.set()
    assert states[-1] == 3 and st.stopped


def test_registry_reuses_loaded_pair():
    reg = Registry()
    a = reg.pair("default", compress="int8", components="*.q")
    b = reg.pair("default", compress="int8", components="*.q")
    c = reg.pair("default", compress="int4:g128", components="*.q")
    assert a is b and c is not a
    assert reg.loads == 1
    assert c.dense is a.dense
