"""Mixed plans under a budget: storage costs, the solvers against brute force, verification,
the held-out table, and the exports (llama.cpp, llm-compressor, torchao, recipe)."""
from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import NumberTokenizer, make_tiny, random_prompts, WAIT_S
from dtm_core.planning.allocation import (KEEP, Budget, ChoiceTable, choice_table, dtm_allocation,
                                          knapsack, losses, random_allocation)
from dtm_core.planning.budget_plan import (HOLDOUT_COLUMNS, make_budget_plan, parse_specs,
                                           recipe_of, split_prompts)
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence, reference_continuations
from dtm_core.errors import DTMError
from dtm_core.measure.evaluate import evaluate
from dtm_core.compression.methods import parse_spec
from dtm_core.compression.pair import make_pair
from dtm_core.planning.plan_exports import (export_plan, llama_cpp_arguments, llmcompressor_recipe,
                                            tensor_type_patterns, torchao_config)
from dtm_core.measure.prompts import PromptRecord, PromptSet

ROOT = Path(__file__).resolve().parent.parent


def tiny_llama():
    m = make_tiny("llama", scale=8.0)
    m.tokenizer = NumberTokenizer()
    return m


def number_set(n: int, seed: int = 3) -> PromptSet:
    return PromptSet("numbers", [PromptRecord(" ".join(map(str, p)), line=i + 1)
                                 for i, p in enumerate(random_prompts(n, seed=seed))])


def synthetic(n: int, m: int, seed: int, integer: bool = False) -> ChoiceTable:
    """A choice table with random costs and cells (choice 0 = kept: dearest, no loss)."""
    rng = np.random.default_rng(seed)
    params = rng.integers(10, 100, n).astype(float)
    per = np.sort(rng.uniform(1, 16, (n, m - 1)), axis=1)[:, ::-1]
    bits = np.concatenate([np.full((n, 1), 32.0), per], axis=1) * params[:, None]
    if integer:
        bits = np.round(bits)
    fdt = np.concatenate([np.full((n, 1), 16.0), rng.integers(0, 17, (n, m - 1))], axis=1)
    kl = np.concatenate([np.zeros((n, 1)), rng.uniform(0, 1, (n, m - 1))], axis=1)
    return ChoiceTable([f"{i}.q" for i in range(n)], params, [KEEP] + [f"int{8 - j}" for j in
                                                                      range(m - 1)],
                       bits, params[:, None] * np.ones((n, m)), fdt.astype(float), kl, 16, 4, 32,
                       0.0)


def brute_force(table: ChoiceTable, cap: float, loss) -> float:
    n, m = loss.shape
    best = np.inf
    for a in itertools.product(range(m), repeat=n):
        a = np.array(a)
        if table.bits[np.arange(n), a].sum() <= cap + 1e-9:
            best = min(best, loss[np.arange(n), a].sum())
    return best


# -- costs -------------------------------------------------------------------------------------

def test_storage_bits_count_scales_zero_points_masks_and_the_working_dtype():
    assert parse_spec("int4:g64").storage_bits(576, 32) == 4 + 16 / 64
    assert parse_spec("int3:g64:asym").storage_bits(576, 32) == 3 + (16 + 3) / 64
    assert parse_spec("int8").storage_bits(576, 32) == 8 + 16 / 576      # per channel
    assert parse_spec("int4:g1024").storage_bits(576, 16) == 4 + 16 / 576   # group > inputs
    assert parse_spec("gptq:int4:g128").storage_bits(1536, 16) == 4.125
    assert parse_spec("awq:int4:g128:asym").storage_bits(1536, 16) == 4 + 20 / 128
    assert parse_spec("magnitude:0.5").storage_bits(576, 32) == 17.0      # values + bitmask
    assert parse_spec("nm:2:4").storage_bits(576, 16) == 9.0
    assert parse_spec("none").storage_bits(576, 16) == 16.0
    assert parse_spec("wanda:0.7").sparsity_share == 0.7
    assert parse_spec("int4").sparsity_share == 0.0


def test_choice_table_of_a_real_model_counts_every_matrix():
    m = make_tiny("llama")
    import pandas as pd
    from dtm_core.models.components import all_components

    comps = all_components(m.model)
    cells = pd.DataFrame({"component": [c.name for c in comps], "fdt_mean": 5.0, "kl_mean": 0.1})
    t = choice_table(m.model, {"int4:g16": cells, "magnitude:0.5": cells}, 10, 4)
    assert t.choices == [KEEP, "int4:g16", "magnitude:0.5"]
    total = sum(c.params for c in comps)
    assert t.total_params == total
    keep = t.measure(np.zeros(len(comps), dtype=int))
    assert keep["avg_bits"] == 32 and keep["sparsity"] == 0
    assert keep["bytes"] == sum(p.numel() for p in m.model.parameters()) * 4
    q = t.measure(t.uniform("int4:g16"))
    assert q["avg_bits"] == pytest.approx(4 + 16 / 16)         # every input dim is a multiple
    assert t.measure(t.uniform("magnitude:0.5"))["sparsity"] == pytest.approx(0.5)
    with pytest.raises(DTMError, match="no known storage size"):
        choice_table(m.model, {"from:/nowhere": cells}, 10, 4)


# -- solvers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_knapsack_equals_brute_force_with_integer_costs(seed):
    t = synthetic(5, 4, seed, integer=True)
    loss = losses(t, "fdt")
    base = t.bits.min(axis=1).sum()
    for share in (0.1, 0.4, 0.8):
        cap = float(np.floor(base + share * (t.bits.max(axis=1).sum() - base)))
        budget = Budget("bits", cap / t.total_params)
        a = knapsack(t, budget, "fdt", steps=int(cap - base))     # one unit = one bit: exact
        rows = np.arange(5)
        assert t.bits[rows, a].sum() <= cap + 1e-6
        assert loss[rows, a].sum() == pytest.approx(brute_force(t, cap, loss), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_with_real_valued_costs_never_exceeds_and_is_near_optimal(seed):
    t = synthetic(6, 3, seed)
    loss = losses(t, "kl")
    budget = Budget("bits", 9.0)
    cost, cap = budget.costs(t)
    a = knapsack(t, budget, "kl")
    rows = np.arange(6)
    assert cost[rows, a].sum() <= cap * (1 + 1e-12)
    # at least as good as the best plan that leaves the discretization's margin unused
    margin = brute_force(t, cap - 6 * (cap - cost.min(axis=1).sum()) / 20000, loss)
    assert loss[rows, a].sum() <= margin + 1e-12


def test_fdt_signal_uses_kl_only_to_break_ties():
    t = synthetic(4, 3, 1)
    t.fdt[:, 1:] = 16.0          # every cell keeps all tokens: only KL can tell them apart
    loss = losses(t, "fdt")
    assert (loss[:, 1:] > 0).all() and loss.max() < 0.5 / t.prompts + 1e-12
    t2 = synthetic(4, 3, 1)
    loss2 = losses(t2, "fdt")
    # one FDT step (1/prompts of a token) outweighs every KL term together
    assert (loss2 - (16 - t2.fdt)).sum() < 1.0 / t2.prompts


def test_dtm_allocation_is_the_papers_threshold_procedure():
    t = synthetic(6, 4, 7)
    budget = Budget("bits", 10.0)
    cost, cap = budget.costs(t)
    a, thr = dtm_allocation(t, budget)
    assert cost[np.arange(6), a].sum() <= cap
    order = np.argsort(-cost, axis=1, kind="stable")
    for i in range(6):      # the strongest choice before the first one below the threshold
        seq = [j for j in order[i]]
        k = 0
        while k + 1 < len(seq) and t.fdt[i, seq[k + 1]] >= thr:
            k += 1
        assert a[i] == seq[k]
    higher = [v for v in set(t.fdt.ravel()) if v > thr]
    if higher:      # the next higher threshold does not fit the budget
        t_hi = min(higher)
        worse = []
        for i in range(6):
            seq, k = list(order[i]), 0
            while k + 1 < len(seq) and t.fdt[i, seq[k + 1]] >= t_hi:
                k += 1
            worse.append(seq[k])
        assert cost[np.arange(6), worse].sum() > cap


def test_random_allocation_fits_and_differs_by_seed():
    t = synthetic(12, 4, 2)
    budget = Budget("bits", 12.0)
    cost, cap = budget.costs(t)
    plans = [random_allocation(t, budget, s) for s in range(4)]
    for a in plans:
        assert cost[np.arange(12), a].sum() <= cap * (1 + 1e-12)
    assert len({tuple(a) for a in plans}) > 1


def test_a_budget_below_the_cheapest_plan_is_one_sentence():
    t = synthetic(4, 3, 0)
    with pytest.raises(DTMError, match="No plan fits 0.5 bits per weight"):
        knapsack(t, Budget("bits", 0.5))
    with pytest.raises(DTMError, match="reaches 0.0% sparsity at most"):
        knapsack(t, Budget("sparsity", 0.5))
    with pytest.raises(DTMError, match="sparsity budget"):
        Budget("sparsity", 1.5)
    with pytest.raises(DTMError, match="Unknown budget"):
        Budget("gigabytes", 3)


def test_split_is_seeded_and_disjoint():
    fit, held = split_prompts(10, 0.3, seed=0)
    assert len(held) == 3 and not set(fit) & set(held) and sorted(fit + held) == list(range(10))
    assert split_prompts(10, 0.3, seed=0) == (fit, held)
    assert split_prompts(10, 0.3, seed=1) != (fit, held)
    assert split_prompts(5, 0.0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(DTMError, match="cannot be split"):
        split_prompts(1, 0.3)
    assert parse_specs("int8, INT4:g64,int8,none") == ["int8", "int4:g64"]
    with pytest.raises(DTMError, match="at least one candidate"):
        parse_specs(" , ")


# -- whole plans on a model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    m = tiny_llama()
    pset = number_set(10)
    cache = tmp_path_factory.mktemp("cells")
    plan = make_budget_plan(m, "int8,int4:g16,int3:g16", pset, 10, budget=Budget("bits", 5.0),
                            cache_dir=cache, planner="fdt")
    return m, pset, plan, cache


def test_budget_plan_is_verified_by_a_real_evaluation(planned):
    m, pset, plan, _ = planned
    assert plan.measure["avg_bits"] <= 5.0
    ids = [[int(w) for w in pset.prompts[i].split()] for i in plan.fit_prompts]
    refs = reference_continuations(m, ids, 10)
    again = divergence(make_pair(m, Recipe.from_json(plan.to_json())), prompt_ids=ids,
                       references=refs, new_tokens=10)
    assert plan.fdt_mean == pytest.approx(float(again.table.fdt.mean()))
    assert plan.evaluations[0]["fdt_mean"] == plan.fdt_mean
    data = plan.to_json()
    assert set(data["assignments"].values()) <= {KEEP, "int8", "int4:g16", "int3:g16"}
    for key in ("recipe", "assignments", "avg_bits", "sparsity", "bytes", "holdout"):
        assert key in data
    assert recipe_of(data["assignments"]).to_json() == data["recipe"]
    import pandas as pd
    cells = pd.DataFrame(data["cells"])      # the choice table: every component x choice
    assert len(cells) == len(data["assignments"]) * 4
    assert (cells[cells.spec == KEEP].fdt_mean == 10).all()
    assert (cells[cells.spec == "int4:g16"].bits_per_weight == 5).all()
    # a plan.json reads back as the same plan (the app's exports start from it)
    from dtm_core.planning.budget_plan import BudgetPlan
    again = json.loads(json.dumps(BudgetPlan.from_json(json.loads(json.dumps(data))).to_json()))
    assert again == json.loads(json.dumps(data))
    with pytest.raises(DTMError, match="not a mixed plan"):
        BudgetPlan.from_json({"recipe": []})


def test_holdout_table_rows_are_what_evaluate_gives(planned):
    m, pset, plan, _ = planned
    t = plan.holdout
    assert list(t.columns) == HOLDOUT_COLUMNS
    assert list(t.config[:4]) == ["plan", "dtm planner", "KL-ranked", "random"]
    assert {"uniform int8", "uniform int3:g16"} <= set(t.config) | {
        c.replace(" (closest)", "") for c in t.config}
    assert (t.config == "uniform int4:g16 (closest)").any()    # 5.0 bits: int4:g16 is 5.0
    dense = t[t.config == "dense"].iloc[0]                     # the ceiling, measured
    assert dense.fdt_mean == 10 and dense.kl_mean == 0 and dense.avg_bits == 32
    for _, row in t.iterrows():
        if row.planner in ("fdt", "dtm", "kl", "random"):
            assert row.avg_bits <= plan.measure["avg_bits"] + 1e-9
    sub = PromptSet("h", [pset.records[i] for i in plan.holdout_prompts])
    ev = evaluate(make_pair(m, plan.recipe), sub, 10)
    assert t.fdt_mean[0] == pytest.approx(ev.summary["fdt_mean"])
    assert t.kl_mean[0] == pytest.approx(ev.summary["kl_mean"])
    assert t.fdt_vs_plan[0] == 0
    u8 = t[t.config.str.startswith("uniform int8")].iloc[0]
    ev8 = evaluate(make_pair(m, Recipe.single("int8")), sub, 10)
    assert u8.fdt_mean == pytest.approx(ev8.summary["fdt_mean"])
    assert u8.fdt_vs_plan == pytest.approx(ev8.summary["fdt_mean"] - ev.summary["fdt_mean"])


def test_sweeps_are_cached_per_cell(planned, tmp_path):
    m, pset, plan, cache = planned
    import dtm_core.analysis.sweep.run as sw

    calls = []
    orig = sw._cell_row
    sw._cell_row = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        again = make_budget_plan(m, "int8,int4:g16,int3:g16", pset, 10,
                                 budget=Budget("bits", 5.0), cache_dir=cache, holdout=0.3,
                                 planner="fdt")
    finally:
        sw._cell_row = orig
    assert calls == [] and again.assignments == plan.assignments


def test_sparsity_and_bytes_budgets(tmp_path):
    m = tiny_llama()
    pset = number_set(6)
    p = make_budget_plan(m, "magnitude:0.3,magnitude:0.6,magnitude:0.9", pset, 8,
                         budget=Budget("sparsity", 0.5), cache_dir=tmp_path, holdout=0)
    assert p.measure["sparsity"] >= 0.5 - 1e-9 and p.holdout is None
    assert p.to_json()["llama_cpp_tensor_types"] is None       # no sparse llama.cpp tensors
    size = p.measure["bytes"]
    q = make_budget_plan(m, "int8,int4:g16", pset, 8, budget=Budget("bytes", size * 0.8),
                         cache_dir=tmp_path, holdout=0, planner="dtm")
    assert q.measure["bytes"] <= size * 0.8 and q.planner == "dtm" and q.threshold is not None


def test_target_fdt_finds_a_small_plan_that_reaches_it_within_the_evaluations(tmp_path):
    m = tiny_llama()
    pset = number_set(6)
    p = make_budget_plan(m, "int8,int4:g16,int3:g16", pset, 8, target_fdt=0.75,
                         cache_dir=tmp_path, holdout=0, max_evals=6)
    assert p.fdt_mean >= 0.75 * 8 and len(p.evaluations) <= 6
    assert p.measure["avg_bits"] < 32        # something was compressed
    # a budget with a target it cannot reach is repaired past the budget, and says so
    r = make_budget_plan(m, "int8,int4:g16,int3:g16", pset, 8, budget=Budget("bits", 4.2),
                         target_fdt=0.75, cache_dir=tmp_path, holdout=0, max_evals=4,
                         planner="fdt")
    assert len(r.evaluations) <= 4
    assert r.evaluations[0]["why"].startswith("fdt plan within")
    if r.fdt_mean >= 6:
        assert "repaired" in r.note and "exceeds the budget" in r.note
    else:
        assert "below the target" in r.note
    assert [e["avg_bits"] for e in r.evaluations] == sorted(e["avg_bits"] for e in r.evaluations)


def test_auto_planner_keeps_the_best_verified_plan(planned):
    m, pset, fdt_plan, cache = planned
    p = make_budget_plan(m, "int8,int4:g16,int3:g16", pset, 10, budget=Budget("bits", 5.0),
                         cache_dir=cache, holdout=0.3)
    tried = {e["why"].split()[0]: e["fdt_mean"] for e in p.evaluations}
    assert set(tried) <= {"fdt", "dtm", "kl"} and "fdt" in tried
    assert p.fdt_mean == max(tried.values()) and p.planner in tried
    assert p.note.startswith("auto: the best of fdt, dtm, kl")
    assert tried["fdt"] == fdt_plan.fdt_mean          # the same knapsack, the same number
    # the held-out table lists the two planners the plan is not, then random
    rest = [c for c in p.holdout.config[1:4]]
    assert "random" in rest and len(set(rest)) == 3 and "plan" == p.holdout.config[0]


def test_bad_plan_requests_are_sentences(tmp_path):
    m = tiny_llama()
    pset = number_set(4)
    with pytest.raises(DTMError, match="Give a budget"):
        make_budget_plan(m, "int8", pset, 8)
    with pytest.raises(DTMError, match="target-fdt"):
        make_budget_plan(m, "int8", pset, 8, target_fdt=1.5)
    with pytest.raises(DTMError, match="Unknown planner"):
        make_budget_plan(m, "int8", pset, 8, budget=Budget("bits", 8), planner="greedy")
    import threading
    stop = threading.Event()
    stop.set()
    with pytest.raises(DTMError, match="Stopped during the sweep of int8; the finished cells"):
        make_budget_plan(m, "int8", pset, 8, budget=Budget("bits", 8), stop=stop,
                         cache_dir=tmp_path)


# -- exports -------------------------------------------------------------------------------------

def default_gguf_names() -> list[str]:
    from gguf import GGUFReader

    from dtm_core.models.sources import default_gguf_path
    return [t.name for t in GGUFReader(str(default_gguf_path())).tensors]


def test_llama_cpp_regexes_match_exactly_the_intended_gguf_tensors():
    names = default_gguf_names()                 # written by llama.cpp's converter
    from dtm_core.models.families import FAMILIES
    fam = next(f for f in FAMILIES if f.name == "llama")
    rng = np.random.default_rng(0)
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    specs = [KEEP, "int8", "int4:g64", "int3:g64", "int4:g32:asym"]
    assign = {f"{l}.{k}": specs[int(rng.integers(len(specs)))] for l in range(30) for k in kinds}
    got = llama_cpp_arguments(assign, "llama", 32)
    assert got["base_type"] == "F32"
    wanted: dict[str, str] = {fam.gguf_tensor(*_lk(c)): parse_spec(s).llama_cpp_type()
                              for c, s in assign.items() if s != KEEP}
    assert set(wanted) <= set(names)
    matched: dict[str, str] = {}
    for pattern, qtype in tensor_type_patterns(got["tensor_types"]):
        hits = [n for n in names if re.search(pattern, n)]     # llama.cpp: regex_search
        assert hits, pattern
        for n in hits:
            assert n not in matched, f"{n} matched twice"
            matched[n] = qtype
    assert matched == wanted
    # one pattern per (tensor kind, type), not one per tensor
    assert len(got["tensor_types"]) <= len(kinds) * 4
    with pytest.raises(DTMError, match="no tensor type"):
        llama_cpp_arguments({"0.q": "magnitude:0.5"}, "llama", 32)


def _lk(name):
    layer, kind = name.split(".")
    return int(layer), kind


def test_llmcompressor_recipe_parses_and_names_only_existing_modules(tmp_path):
    import yaml

    m = make_tiny("llama")
    modules = {n for n, _ in m.model.named_modules()}
    assign = {"0.q": "int4:g16", "0.k": "int4:g16", "1.down": "int8", "1.up": "gptq:int4:g16:act",
              "2.q": KEEP, "2.o": "sparsegpt:0.5", "2.gate": "magnitude:0.7", "0.v": "w8a8"}

    class P:
        assignments, family, dtype_bits = assign, "llama", 32
        recipe = recipe_of(assign)
    files = export_plan(P, "llmcompressor", tmp_path, m.model)
    data = yaml.safe_load(files[0].read_text())
    assert data == llmcompressor_recipe(m.model, assign)
    quant = data["quant_stage"]["quant_modifiers"]
    rtn = quant["QuantizationModifier"]
    assert "model.layers.2.self_attn.q_proj" in rtn["ignore"] and "lm_head" in rtn["ignore"]
    groups = list(rtn["config_groups"].values())
    assert [g["weights"]["num_bits"] for g in groups] == [4, 8, 8]
    assert groups[0]["targets"] == ["model.layers.0.self_attn.q_proj",
                                    "model.layers.0.self_attn.k_proj"]
    assert groups[0]["weights"]["group_size"] == 16 and groups[1]["weights"]["strategy"] == \
        "channel"
    assert groups[2]["input_activations"]["strategy"] == "token"
    assert quant["GPTQModifier"]["config_groups"]["group_0"]["weights"]["actorder"] == "static"
    prune = [s["sparsity_modifiers"] for k, s in data.items() if k.startswith("sparsity_stage")]
    assert prune[0]["SparseGPTModifier"]["sparsity"] == 0.5
    assert prune[1]["MagnitudePruningModifier"]["final_sparsity"] == 0.7
    named = []
    for stage in data.values():
        for mods in stage.values():
            for args in mods.values():
                named += args["ignore"]
                named += args.get("targets", [])
                for g in args.get("config_groups", {}).values():
                    named += g["targets"]
    assert {n for n in named if n != "lm_head"} <= modules


def test_torchao_config_quantizes_exactly_the_planned_modules(tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    import importlib.util

    import torch
    from torchao.quantization import quantize_

    m = make_tiny("llama")
    assign = {"0.q": "int4:g16", "1.down": "int8", "2.up": KEEP, "0.k": "int3:g16:asym"}

    class P:
        assignments, family, dtype_bits = assign, "llama", 32
        recipe = recipe_of(assign)
    cfg, snippet = export_plan(P, "torchao", tmp_path, m.model)
    assert json.loads(cfg.read_text()) == torchao_config(m.model, assign)
    spec = importlib.util.spec_from_file_location("apply_torchao", snippet)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    monkeypatch.chdir(tmp_path)
    quantize_(m.model, mod.plan_config(), filter_fn=None)
    changed = {}
    for n, module in m.model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and hasattr(w, "dequantize") and type(w) not in (
                torch.Tensor, torch.nn.Parameter):
            changed[n] = float((w.dequantize() - before[n + ".weight"]).norm()
                               / before[n + ".weight"].norm())
    assert set(changed) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                            "model.layers.0.self_attn.k_proj"}
    assert changed["model.layers.1.mlp.down_proj"] < 0.02 < changed[
        "model.layers.0.self_attn.q_proj"] < 0.2
    with pytest.raises(DTMError, match="does not prune"):
        torchao_config(m.model, {"0.q": "wanda:0.5"})


def test_cli_plan_with_specs_and_a_bits_budget_writes_plan_json_and_exports(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("The capital of France is\nWater boils at\nThe largest planet is\n"
                 "Once upon a time\nTo make bread you need\nThe speed of light is\n")
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-m", "dtm_core", "plan", "--specs",
                        "int8,int4:g64,int3:g64", "--budget-bits", "5", "--layers", "0-1",
                        "--kinds", "q,down", "--prompts", str(p), "--new-tokens", "8",
                        "--holdout", "0.34", "--cache-dir", str(tmp_path / "c"), "--out",
                        str(out), "--export", "llama.cpp", str(tmp_path / "l"), "--export",
                        "recipe", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert len(data["assignments"]) == 4 and data["avg_bits"] <= 5
    assert len(data["holdout_prompts"]) == 2 and len(data["holdout"]) == 8
    assert "uniform int4:g64 (closest)" in [row["config"] for row in data["holdout"]]
    assert "held out (2 prompts" in r.stdout and "uniform int3:g64" in r.stdout
    args = (tmp_path / "l" / "llama_cpp_tensor_types.txt").read_text().split("\n")
    assert all(a.startswith("--tensor-type ^blk\\.") for a in args if a)
    # the plan JSON and the exported recipe load as recipes (--recipe)
    assert Recipe.load(str(out)).to_json() == data["recipe"]
    assert Recipe.load(str(tmp_path / "r" / "recipe.json")).to_json() == data["recipe"]
    bad = subprocess.run([sys.executable, "-m", "dtm_core", "plan", "--specs", "int8",
                          "--budget-bits", "5", "--budget-sparsity", "0.5", "--prompts", str(p)],
                         cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert bad.returncode != 0 and "Give one budget" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cell_curves_are_per_kind_means_of_the_cells(planned):
    from ui.charts import cell_curves, cells_figure

    _, _, plan, _ = planned
    curves = cell_curves(plan.cells)
    assert set(curves.spec) == {"int8", "int4:g16", "int3:g16"}
    for _, row in curves.iterrows():
        mine = [r for _, r in plan.cells.iterrows()
                if r.spec == row.spec and r.component.split(".")[1] == row.kind]
        assert len(mine) == 3                                  # one per layer
        assert row.fdt_mean == pytest.approx(sum(r.fdt_mean for r in mine) / 3)
    assert [t.name for t in cells_figure(plan.cells).data] == ["q", "k", "v", "o", "gate", "up",
                                                                "down"]


# -- draft plans (issue 29): the mixed planner with acceptance as its objective ---------------

def test_draft_plan_verifies_acceptance_and_reports_the_expected_speed_up(tmp_path):
    """A draft plan (objective accept_len_k4) is verified by the exact acceptance of its own
    pair on the fit prompts, reaches a target accepted length as the cheapest plan the
    evaluations find, and its held-out table carries each row's acceptance and the expected
    speed-up (accept + 1) / (K cost + 1) with cost = bits over the dense model's or as given."""
    from dtm_core.planning.budget_plan import DRAFT_COLUMNS, BudgetPlan
    from dtm_core.planning.draft_plan import ceiling, speedup

    m = tiny_llama()
    pset = number_set(10)
    p = make_budget_plan(m, "int8,int4:g16,int3:g16", pset, 10, budget=Budget("bits", 5.0),
                         cache_dir=tmp_path, planner="fdt", objective="accept_len_k4")
    ids = [[int(w) for w in pset.prompts[i].split()] for i in p.fit_prompts]
    refs = reference_continuations(m, ids, 10)
    again = divergence(make_pair(m, p.recipe), prompt_ids=ids, references=refs, new_tokens=10)
    assert p.fdt_mean == pytest.approx(float(again.table.accept_len_k4.mean()))
    assert p.objective == "accept_len_k4" and p.measure["avg_bits"] <= 5.0
    assert "draft plan" in p.summary_line() and "accepted per step drafting 4" in p.summary_line()
    cells = p.cells
    top = ceiling(refs, 4)
    assert (cells[cells.spec == KEEP].accept_len_k4_mean == top).all() and 2 < top <= 4
    t = p.holdout
    assert list(t.columns[-3:]) == DRAFT_COLUMNS
    sub = PromptSet("h", [pset.records[i] for i in p.holdout_prompts])
    ev = evaluate(make_pair(m, p.recipe), sub, 10)
    row = t.iloc[0]
    assert row.accept_len == pytest.approx(ev.summary["accept_len_k4_mean"])
    assert row.draft_cost == pytest.approx(row.avg_bits / 32)
    assert row.speedup == pytest.approx((row.accept_len + 1) / (4 * row.draft_cost + 1))
    dense = t[t.config == "dense"].iloc[0]
    assert dense.draft_cost == 1 and dense.speedup == pytest.approx(speedup(dense.accept_len,
                                                                            4, 1.0))
    data = json.loads(json.dumps(p.to_json()))
    assert "fdt_mean" not in data and data["accept_len_k4_mean"] == p.fdt_mean
    assert BudgetPlan.from_json(data).objective == "accept_len_k4"

    # a target accepted length: the cheapest plan reaching it; a given draft cost
    q = make_budget_plan(m, "int8,int4:g16,int3:g16", pset, 10, cache_dir=tmp_path, holdout=0.3,
                         objective="accept_len_k4", target_accept=0.9 * top, max_evals=6,
                         draft_cost=0.25)
    assert q.fdt_mean >= 0.9 * top and q.measure["avg_bits"] < 32
    assert q.holdout.draft_cost.eq(0.25).all()
    back = BudgetPlan.from_json(json.loads(json.dumps(q.to_json())))     # the target survives
    assert back.target_fdt == pytest.approx(0.9 * top) and back.draft_cost == 0.25
    for bad, kw in (("target is --target-accept", dict(target_fdt=0.5)),
                    ("between 0 and the draft length 4", dict(target_accept=5.0)),
                    ("Unknown objective", dict(objective="accept_len_k3", target_accept=1))):
        with pytest.raises(DTMError, match=bad):
            make_budget_plan(m, "int8", pset, 10, cache_dir=tmp_path,
                             **{"objective": "accept_len_k4", **kw})
    with pytest.raises(DTMError, match="draft plan's target"):
        make_budget_plan(m, "int8", pset, 10, cache_dir=tmp_path, target_accept=2.0)


def test_the_mixed_plan_tab_makes_a_draft_plan(tmp_path, monkeypatch):
    """The page's handler with the Objective set to draft acceptance: the status states the
    held-out acceptance and speed-up, the table carries them, the JSON names the objective."""
    from dtm_core.jobs import PairCache
    from ui import budget_plan as page, common

    m = tiny_llama()
    monkeypatch.setattr(common, "CACHE", PairCache())
    common.CACHE._dense = ("tiny", m)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    f = tmp_path / "numbers.txt"
    f.write_text("\n".join(number_set(10).prompts))
    out = page.run_budget_plan("tiny", str(f), "general", False, 10, "", "", "int8,int4:g16",
                               "bits per weight", 6.0, 0, 0.3, "fdt",
                               objective="accept_len_k4", draft_cost=0.5,
                               progress=lambda *a, **k: None)
    status, chart, table, path, state, curves = out
    assert "accepted per step on the held-out prompts" in status, status
    assert "speed-up" in status and state["objective"] == "accept_len_k4"
    assert {"accept_len", "speedup"} <= set(table.columns), list(table.columns)


def test_shortlisted_plan_measures_k_cells_per_spec_and_is_verified(tmp_path):
    """--shortlist K (issue 30, point 4): every cell estimated, only the K most sensitive by
    estimate of each spec measured exactly (the store holds just those), the others planned with
    their estimates; the plan is still verified by a real evaluation of its pair."""
    from dtm_core.analysis.sweep.estimate import estimate_sweep
    from dtm_core.analysis.sweep.run import sweep_store

    m = tiny_llama()
    pset = number_set(8, seed=5)
    plan = make_budget_plan(m, "int4:g16,int3:g16", pset, 8, budget=Budget("bits", 5.0),
                            holdout=0.0, cache_dir=tmp_path, planner="fdt", shortlist=3,
                            kinds="q,k,v,o,down")
    ids = [[int(w) for w in pset.prompts[i].split()] for i in plan.fit_prompts]
    n_cells = len(plan.assignments)
    assert f"shortlist: 6 of {2 * n_cells} cells exact" in plan.note
    cells = plan.cells.set_index(["component", "spec"])
    for spec in ("int4:g16", "int3:g16"):
        est = estimate_sweep(m, spec, ids, 8, cache_dir=tmp_path, kinds="q,k,v,o,down")
        top = list(est.table.sort_values("kl_estimate", ascending=False).component[:3])
        assert sorted(est.table[est.table.exact].component) == sorted(top)
        _, store, _ = sweep_store(m, spec, ids, 8, None, None, tmp_path)
        for r in est.table.itertuples():
            got = cells.loc[(r.component, spec)]
            if r.exact:     # measured: the stored cell
                assert got.kl_mean == store.get(r.component)["kl_mean"]
            else:           # planned from the estimate
                assert store.get(r.component) is None
                assert got.kl_mean == pytest.approx(r.kl_estimate)
    refs = reference_continuations(m, ids, 8)
    again = divergence(make_pair(m, plan.recipe), prompt_ids=ids, references=refs, new_tokens=8)
    assert plan.fdt_mean == pytest.approx(float(again.table.fdt.mean()))
    with pytest.raises(DTMError, match="leave out --shortlist"):
        make_budget_plan(m, "int4:g16", pset, 8, budget=Budget("bits", 5.0), shortlist=2,
                         objective="accept_len_k4")
