"""Why a token diverged (issue 19): the logit lens and component patching are faithful on every
kind of family (plain, GPT-2's Conv1D, fused slices, sliding windows with soft-capping,
mixture-of-experts): an identical pair has no effect anywhere, a pair with exactly one compressed
component is restored exactly by patching that component (which ranks first), patching every
component at once is the dense model, and the lens of the last layer is each model's own
logits."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from dtm_core.compression.recipe import Recipe
from dtm_core.models.components import all_components
from dtm_core.measure.divergence import divergence
from dtm_core.errors import DTMError
from dtm_core.analysis.explain import explain, explain_set, first_divergence
from dtm_core.compression.pair import make_pair
from test_families import make, prompts

N = 10


MODELS = {}


def model(name):
    if name not in MODELS:
        MODELS[name] = make_tiny(name, scale=8.0) if name in ("llama", "gpt2") else make(name)
    return MODELS[name]


def _diverging(pair, n=40, seed=5, least=0):
    """A prompt of the pair whose continuation diverges (at position ``least`` or later), with
    its first divergent position."""
    for ids in prompts(n, seed=seed):
        res = divergence(pair, prompt_ids=[ids], new_tokens=N)
        if least <= res.table.fdt.iloc[0] < N:
            return ids, int(res.table.fdt.iloc[0])
    raise AssertionError("no prompt diverges where the test needs it")


def _logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3", "gemma2", "qwen3_moe"])
def test_identical_pair_has_no_effect_anywhere(name):
    lm = model(name)
    pair = make_pair(lm, Recipe.single("none"))
    ids = prompts(1, seed=2)[0]
    with pytest.raises(DTMError, match="nothing diverges"):
        explain(pair, ids, N)
    e = explain(pair, ids, N, position=3)
    assert e.kl == 0 and (e.lens.kl == 0).all() and e.lens_flip_layer is None
    assert (e.patching.kl_after_patch == 0).all() and e.patching.restores_argmax.all()
    assert (e.patching.reverse_kl == 0).all() and not e.patching.reverse_flips_argmax.any()
    assert len(e.patching) == len(all_components(lm.model))


# one component of each sort: a plain linear, GPT-2's fused Conv1D qkv, a slice of Phi-3's fused
# qkv, a sliding-window soft-capped family's MLP, one expert of a mixture-of-experts layer
ONE = {"llama": "1.down", "gpt2": "1.qkv", "phi3": "1.q", "gemma2": "0.gate",
       "qwen3_moe": "1.e2.down"}


@pytest.mark.parametrize("name,spec", [(n, "int2") for n in ONE]
                         + [("llama", "magnitude:0.9"), ("phi3", "nm:2:4")])
def test_patching_the_one_compressed_component_restores_the_dense_model_exactly(name, spec):
    lm = model(name)
    pair = make_pair(lm, Recipe.single(spec, ONE[name]))
    ids, fdt = _diverging(pair)
    e = explain(pair, ids, N)
    assert e.position == fdt and e.dense_token != e.compressed_token
    d = _logp(lm.model, ids + e.reference[:fdt])
    c = _logp(pair.compressed, ids + e.reference[:fdt])
    assert e.logp_dense == pytest.approx(float(d[e.dense_token]), abs=1e-5)
    assert int(c.argmax()) == e.compressed_token
    top = e.ranked().iloc[0]
    assert top.component == ONE[name]
    assert top.kl_after_patch < 1e-9 and top.restores_argmax
    assert top.restored_logp == pytest.approx(e.logp_dense, abs=1e-9)
    assert top.restored_share == pytest.approx(1.0, abs=1e-9)
    # components before it compute the same outputs in both models: patching them changes
    # nothing (later ones carry the divergence on, so patching them does)
    layer = int(ONE[name].split(".")[0])
    before = e.patching[e.patching.layer < layer]
    assert (before.restored_share.abs() < 1e-9).all() and (before.kl_after_patch > 0).all()
    # the reverse: the dense model with that one compressed component is the compressed model
    rev = e.patching.set_index("component").loc[ONE[name]]
    assert rev.reverse_flips_argmax
    assert rev.reverse_logp_compressed_token == pytest.approx(float(c[e.compressed_token]),
                                                              abs=1e-5)
    assert ONE[name] in e.ranking() and "restores 100%" in e.ranking()
    # the lens of the last layer is each model's own logits (a full forward's, to float32
    # rounding of the head applied to all positions at once)
    last = e.lens.iloc[-1]
    assert last.dense_logp_dense_token == pytest.approx(float(d[e.dense_token]), abs=1e-5)
    assert last.compressed_logp_compressed_token == pytest.approx(
        float(c[e.compressed_token]), abs=1e-5)
    assert last.kl == pytest.approx(e.kl, abs=1e-9)
    assert last.compressed_rank_compressed_token == 1
    assert (e.lens.kl[e.lens.layer < layer] == 0).all()       # nothing differs before it
    assert e.lens_flip_layer is None or e.lens_flip_layer >= layer


@pytest.mark.parametrize("name", ["llama", "phi3", "qwen3_moe"])
def test_patching_every_component_at_once_is_the_dense_model(name):
    lm = model(name)
    pair = make_pair(lm, Recipe.single("int2", "*"))
    ids, fdt = _diverging(pair)
    e = explain(pair, ids, N, granularity="model")
    assert len(e.patching) == 1
    row = e.patching.iloc[0]
    assert row.kl_after_patch < 1e-9 and row.restores_argmax
    assert row.reverse_flips_argmax and row.reverse_kl == pytest.approx(e.kl, abs=1e-9)
    layers = explain(pair, ids, N, granularity="layer", reverse=False)
    assert list(layers.patching.component) == [f"{n}.*" for n in range(3)]


def test_position_scope_separates_the_direct_effect():
    """Patching only the chosen position restores less than patching every position up to it
    (the effect carried through earlier positions), for the one compressed component."""
    lm = model("llama")
    pair = make_pair(lm, Recipe.single("int3", "0.v"))
    ids, fdt = _diverging(pair, seed=7, least=2)
    every = explain(pair, ids, N, reverse=False).patching.set_index("component").loc["0.v"]
    direct = explain(pair, ids, N, scope="position",
                     reverse=False).patching.set_index("component").loc["0.v"]
    assert every.kl_after_patch < 1e-9
    assert direct.kl_after_patch > every.kl_after_patch


def test_prompt_set_ranking_counts_the_first_component_of_each_divergence():
    lm = model("llama")
    pair = make_pair(lm, Recipe.single("int2", "2.up"))
    ps = prompts(6, seed=4)
    table, found = explain_set(pair, ps, N)
    diverging = [p for p in ps if first_divergence(
        pair, p, divergence(pair, prompt_ids=[p], new_tokens=N).references[0]) is not None]
    assert len(found) == len(diverging) > 0
    assert table.iloc[0].component == "2.up" and table.iloc[0]["first"] == len(found)
    assert table["first"].sum() == len(found)


def test_cli_explain_writes_the_patching_map_and_the_json(tmp_path, capsys, default_model,
                                                           monkeypatch):
    """The explain command on the default model: the CSV has one row per component with the
    named columns (the recipe's own slices none here: 210 rows), the JSON the position's tokens,
    the lens of every layer and the ranking; the first row is the ranking's first component."""
    import json

    import pandas as pd

    from dtm_core import jobs
    from dtm_core.__main__ import main

    monkeypatch.setattr(jobs.PairCache, "dense", lambda self, source: default_model)
    out, js = tmp_path / "explain.csv", tmp_path / "explain.json"
    assert main(["explain", "--model", "default", "--compress", "int4:g64", "--prompt",
                 "The capital of France is", "--new-tokens", "16", "--no-reverse",
                 "--out", str(out), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out)
    assert list(table.columns[:6]) == ["component", "layer", "kind", "restored_logp",
                                       "restores_argmax", "kl_after_patch"]
    assert len(table) == 210
    data = json.loads(js.read_text())
    assert {"dense", "compressed", "before"} <= set(data["tokens"])
    assert len(data["lens"]) == 30 and data["position"] >= 0
    assert data["patching"][0]["component"] == table.component.iloc[0]
    assert f"is carried by: {table.component.iloc[0]} (restores" in printed
    assert main(["explain", "--model", "default", "--compress", "none", "--prompt", "Hi",
                 "--new-tokens", "4"]) == 2
    assert "nothing diverges" in capsys.readouterr().err


def test_prompt_set_view_and_explain_handlers(tmp_path, monkeypatch, default_model):
    """The Sensitivity tab's prompt-set view and the Compare panel's handler on the default
    model: bars and a table of how often each component ranks first, and the lens, heatmap,
    table, sentence and CSV of one explanation."""
    import pandas as pd

    from ui import common, explain as explain_ui

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    common.CACHE._dense = ("default", default_model)
    common.CACHE._pairs.clear()
    f = tmp_path / "few.txt"
    f.write_text("The capital of France is\nWater boils at\nOnce upon a time\n")
    bars, table, msg = explain_ui.run_explain_set("default", "int3:g64", str(f), "general", False,
                                                  12, "20-29", "down",
                                                  progress=lambda *a, **k: None)
    assert "prompts diverge with int3:g64 on 20-29.down" in msg, msg
    assert bars is not None and "ranked first (prompts)" in table.columns
    assert table["ranked first (prompts)"].sum() == int(msg.split(" of ")[0])
    lens, heat, ranked, sentence, csv = explain_ui.run_explain(
        "default", common.CUSTOM, "int3:g64", "20-29.down", "", "The capital of France is",
        False, 12, -1, "every position up to it", "component", progress=lambda *a, **k: None)
    assert "is carried by" in sentence and lens is not None and heat is not None
    saved = pd.read_csv(csv)
    assert len(saved) == 210 and saved.component.iloc[0] in sentence
    *_, bad, _ = explain_ui.run_explain("default", common.CUSTOM, "int3:g64", "*", "", "Hi",
                                        False, 12, 99, "this position only", "component",
                                        progress=lambda *a, **k: None)
    assert "outside the dense continuation" in bad
