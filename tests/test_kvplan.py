"""KV plans (issue 26): one kv: spec per layer's key or value cache under a budget of bits per
cached value, verified by real evaluations, with the cache's memory per 1000 tokens of context
counted as transformers' own cache holds it (sliding-window layers included); bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import NumberTokenizer
from dtm_core.compression.kvcache import cache_layout, head_dim, resolve_cache
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.errors import DTMError
from dtm_core.measure.divergence import divergence, reference_continuations
from dtm_core.measure.prompts import PromptRecord, PromptSet
from dtm_core.planning.allocation import KEEP, KV_BYTES, KV_DENSE, Budget
from dtm_core.planning.budget_plan import BudgetPlan, make_budget_plan
from test_families import make, prompts

N = 8


def number_set(n: int, seed: int) -> PromptSet:
    return PromptSet("numbers", [PromptRecord(" ".join(map(str, p)), line=i + 1)
                                 for i, p in enumerate(prompts(n, seed=seed))])


@pytest.mark.parametrize("family", ["gemma2", "qwen2", "mistral", "gpt_neox"])
def test_cache_memory_is_what_transformers_cache_holds(family):
    """Each cache's values per token and window, read from a one-token pass, give exactly the
    bytes a real DynamicCache holds after a 200-token prefill (sliding layers hold window - 1)."""
    m = make(family).model
    comps = resolve_cache(m, "*")
    slots = cache_layout(m, comps)
    with torch.no_grad():
        out = m(input_ids=torch.tensor([prompts(1, seed=2)[0] * 40][:1])[:, :200], use_cache=True)
    layers = out.past_key_values.layers
    real = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    assert sum(slots[c.name].values * slots[c.name].tokens(200) * 4 for c in comps) == real
    for c in comps:
        t = layers[c.layer].keys if c.kind == "kcache" else layers[c.layer].values
        assert slots[c.name].values == t.shape[1] * t.shape[-1]
        assert slots[c.name].tokens(200) == t.shape[-2]


@pytest.fixture(scope="module")
def kv_planned(tmp_path_factory):
    m = make("gemma2")
    m.tokenizer = NumberTokenizer()
    pset = number_set(9, seed=4)
    plan = make_budget_plan(m, "kv:int8,kv:int4,kv:int2", pset, N, budget=Budget("bits", 5.0),
                            holdout=0.34, cache_dir=tmp_path_factory.mktemp("cells"),
                            planner="fdt")
    return m, pset, plan


def test_kv_plan_is_within_bits_per_cached_value_and_verified_by_its_pair(kv_planned):
    m, pset, plan = kv_planned
    assert plan.measure["avg_bits"] <= 5.0
    assert set(plan.assignments) == {c.name for c in resolve_cache(m.model, "*")}
    assert set(plan.assignments.values()) <= {KEEP, "kv:int8", "kv:int4", "kv:int2"}
    # bits per cached value, scales included, averaged over the caches' values per token
    comps = resolve_cache(m.model, "*")
    slots = cache_layout(m.model, comps)
    bits = {KEEP: lambda c: 32.0, "kv:int8": lambda c: 8 + 16 / head_dim(m.model, c),
            "kv:int4": lambda c: 4 + 16 / head_dim(m.model, c),
            "kv:int2": lambda c: 2 + 16 / head_dim(m.model, c)}
    per_token = {c.name: bits[plan.assignments[c.name]](c) * slots[c.name].values for c in comps}
    total = sum(slots[c.name].values for c in comps)
    assert plan.measure["avg_bits"] == pytest.approx(sum(per_token.values()) / total)
    # memory per 1000 tokens: sliding layers (window 8) hold 7 tokens, the others 1000
    want = sum(per_token[c.name] * (7 if slots[c.name].window else 1000) for c in comps) / 8
    assert plan.measure[KV_BYTES] == int(np.ceil(want))
    assert plan.measure[KV_DENSE] == sum(32 * slots[c.name].values * slots[c.name].tokens(1000)
                                         for c in comps) / 8
    assert "bits per cached value" in plan.summary_line() and "per 1000 tokens" in \
        plan.summary_line()
    # the verified number is the plan's own pair on the fit prompts
    ids = [[int(w) for w in pset.prompts[i].split()] for i in plan.fit_prompts]
    refs = reference_continuations(m, ids, N)
    again = divergence(make_pair(m, Recipe.from_json(plan.to_json())), prompt_ids=ids,
                       references=refs, new_tokens=N)
    assert plan.fdt_mean == pytest.approx(float(again.table.fdt.mean()))
    assert plan.recipe.has_cache_specs
    # the held-out table: the cache's memory per row, the dense row at the working dtype
    t = plan.holdout
    assert KV_BYTES in t and (t[t.config == "dense"][KV_BYTES] == plan.measure[KV_DENSE]).all()
    assert t[KV_BYTES].iloc[0] == plan.measure[KV_BYTES]
    u2 = t[t.config.str.startswith("uniform kv:int2")].iloc[0]
    assert u2.avg_bits == pytest.approx(2 + 16 / 16) and u2[KV_BYTES] < plan.measure[KV_BYTES]
    # a plan.json reads back as the same plan
    data = json.loads(json.dumps(plan.to_json()))
    assert data["budget"] == {"kind": "bits", "value": 5.0, "per": "cached value"}
    assert json.loads(json.dumps(BudgetPlan.from_json(data).to_json())) == data


def test_kv_plans_refuse_mixed_specs_and_other_budgets_in_one_sentence():
    m = make("qwen2")
    m.tokenizer = NumberTokenizer()
    pset = number_set(4, seed=1)
    with pytest.raises(DTMError, match="over weights or over KV caches"):
        make_budget_plan(m, "int4:g16,kv:int4", pset, 4, budget=Budget("bits", 5.0))
    with pytest.raises(DTMError, match="bits per cached value"):
        make_budget_plan(m, "kv:int8,kv:int4", pset, 4, budget=Budget("bytes", 1e6))
    with pytest.raises(DTMError, match="bits per cached value"):
        make_budget_plan(m, "kv:int8,kv:int4", pset, 4, budget=Budget("sparsity", 0.5))


def test_app_mixed_plan_handler_shows_a_kv_plan(kv_planned, monkeypatch):
    """The Mixed plan handler on a KV plan: the summary says bits per cached value and the cache
    memory; the table shows the cache's MiB per 1000 tokens instead of size and sparsity."""
    from ui import budget_plan as ui_plan
    from ui import common

    m, pset, plan = kv_planned
    monkeypatch.setattr(common.CACHE, "dense", lambda name: m)
    monkeypatch.setattr(common, "load_set", lambda upload, builtin: pset)
    monkeypatch.setattr(ui_plan, "plan_under_budget", lambda *a, **k: plan)
    msg, fig, table, path, state, curves = ui_plan.run_budget_plan(
        "tiny", None, "numbers", False, N, "", "", "kv:int8,kv:int4,kv:int2",
        "bits per weight", 5.0, 0, 0.34, "fdt", progress=lambda *a, **k: None)
    assert "bits per cached value" in msg and "MiB per 1000 tokens" in msg, msg
    assert "KV cache per 1000 tokens (MiB)" in table.columns and "size (MiB)" not in table.columns
    assert table["KV cache per 1000 tokens (MiB)"][0] == pytest.approx(
        plan.measure[KV_BYTES] / 2 ** 20, rel=1e-2)
    assert "bits per cached value" in fig.layout.xaxis.title.text


def test_kv_plans_export_as_recipes_only_and_save_nothing(kv_planned, tmp_path):
    from dtm_core.planning.plan import save_compressed
    from dtm_core.planning.plan_exports import export_plan

    m, _, plan = kv_planned
    files = export_plan(plan, "recipe", tmp_path / "r")
    assert Recipe.load(str(files[0])).to_json() == plan.recipe.to_json()
    for kind in ("llama.cpp", "llmcompressor", "torchao"):
        with pytest.raises(DTMError, match="export it as a recipe"):
            export_plan(plan, kind, tmp_path / kind, m.model)
    with pytest.raises(DTMError, match="nothing to save"):
        save_compressed(m, plan.recipe, str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()
