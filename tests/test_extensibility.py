"""The seams: a method and a metric defined here, in a test file, registered, and found by every
view (recipe pair, sweep cell, level curves, plan, CLI; divergence, sweep cell, stream) without
touching any engine file. Each checks its numbers against a slow, obviously-correct computation."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from dtm_core.compression.recipe import Recipe
from dtm_core.models.components import resolve
from dtm_core.measure.divergence import divergence
from dtm_core.errors import DTMError
from dtm_core.analysis.levels import level_curves
from dtm_core.compression.methods import METHODS, Method, parse_spec, register, unregister
from dtm_core.compression.methods.registry import bad_spec, parse_sparsity
from dtm_core.measure.metrics import (METRICS, Aggregate, Column, TokenMetric, register_metric,
                                      unregister_metric)
from dtm_core.compression.pair import make_pair
from dtm_core.planning.plan import make_plan
from dtm_core.measure.streaming import stream_pair
from dtm_core.analysis.sweep import prepare, sweep

from conftest import ROOT, NumberTokenizer, make_tiny, random_prompts, WAIT_S

N = 8


@dataclass(frozen=True)
class ChannelPrune(Method):
    """Structured pruning: zero the input channels with the smallest calibration input norm."""

    sparsity: float = 0.5
    name = "chanprune"
    forms = ("chanprune:S",)
    summary = "zero the input channels with the smallest activation norm (test method)"
    family = "pruning"
    needs = ("input_norms",)
    level_axis = "sparsity"
    level_methods = ("chanprune",)

    @classmethod
    def parse(cls, head, options, spec):
        if len(options) != 1:
            raise bad_spec(spec, "chanprune takes one sparsity")
        return cls(sparsity=parse_sparsity(spec, options[0]))

    def __str__(self):
        return f"chanprune:{self.sparsity:g}"

    @property
    def level(self):
        return self.sparsity

    def with_level(self, level):
        return ChannelPrune(float(level))

    @classmethod
    def at_level(cls, level, options=""):
        return cls(float(level))

    def apply(self, w, stats, name=""):
        k = int(round(self.sparsity * w.shape[1]))
        cols = torch.topk(stats["input_norms"], k, largest=False).indices
        out = w.clone()
        out[:, cols] = 0
        return out


PLUGIN = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_extensibility import ChannelPrune
from dtm_core.methods import register
register(ChannelPrune)
"""


@pytest.fixture
def chanprune():
    register(ChannelPrune)
    yield ChannelPrune
    unregister("chanprune")


def slow_input_norms(model, module, seqs):
    """Input norms of one module, one sequence at a time, accumulated in float64."""
    total = None
    store = []
    h = module.register_forward_pre_hook(lambda m, a: store.append(a[0][0].double()))
    try:
        for s in seqs:
            store.clear()
            model(input_ids=torch.tensor([s]))
            sq = (store[0] ** 2).sum(0)
            total = sq if total is None else total + sq
    finally:
        h.remove()
    return total.sqrt()


def test_registered_method_runs_through_every_view(chanprune, tmp_path):
    tiny = make_tiny("llama", scale=4.0)
    tiny.tokenizer = NumberTokenizer()
    prompts = random_prompts(6, seed=3)
    texts = [" ".join(map(str, p)) for p in prompts]
    assert str(parse_spec("chanprune:0.25")) == "chanprune:0.25"
    assert "chanprune:S" in str(pytest.raises(DTMError, parse_spec, "chanprune:x").value)

    # a recipe pair: the statistics it was given are the slow input norms
    pair = make_pair(tiny, Recipe.single("chanprune:0.25", "1.q,2.down"), calibration=texts)
    for comp, comp_c in zip(resolve(tiny.model, "1.q,2.down"),
                            resolve(pair.compressed, "1.q,2.down")):
        norms = slow_input_norms(tiny.model, comp.module, prompts)
        torch.testing.assert_close(pair.calibration.get("input_norms", [comp.path])[comp.path]
                                   .double(), norms, rtol=1e-5, atol=1e-6)
        k = int(round(0.25 * comp.module.weight.shape[1]))
        want = comp.module.weight.clone()
        want[:, torch.topk(norms, k, largest=False).indices] = 0
        assert torch.equal(comp_c.module.weight, want)

    # a sweep cell is the single-component pair, calibrated on the same prompts
    res = sweep(tiny, "chanprune:0.5", prompts, N, cache_dir=tmp_path, layers="1")
    assert len(res.table) == 7 and res.table.fdt_mean.nunique() > 1
    for _, row in res.table.iterrows():
        d = divergence(make_pair(tiny, Recipe.single("chanprune:0.5", row.component),
                                 calibration=prompts), prompt_ids=prompts, new_tokens=N)
        assert row.fdt_mean == d.table.fdt.mean(), row.component
        assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)

    # level curves: the method at each level, one line per kind
    curves = level_curves(tiny, "chanprune", "0.25,0.75", "q,down", texts, N)
    assert list(curves.spec) == ["chanprune:0.25", "chanprune:0.75"] * 2
    pair_q = make_pair(tiny, Recipe.single("chanprune:0.75", "*.q"), calibration=texts)
    assert curves.fdt_mean[1] == divergence(pair_q, prompt_ids=prompts, new_tokens=N
                                            ).table.fdt.mean()

    # a plan over the sweep: its verified probes are real pairs of the method
    ctx = prepare(tiny, prompts, N)
    plan = make_plan(tiny, res.table, "chanprune:0.5", prompts, ctx.references, N, budget=0.5)
    chosen = make_pair(tiny, plan.recipe, calibration=prompts)
    assert plan.fdt_mean == divergence(chosen, prompt_ids=prompts, new_tokens=N,
                                       references=ctx.references).table.fdt.mean()
    assert plan.to_json()["llama_cpp_tensor_types"] == []   # no llama.cpp type: none exported


def test_registered_method_in_the_cli_by_plugin(tmp_path):
    """DTM_PLUGINS imports modules that register methods before the CLI parses its arguments."""
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(PLUGIN)
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nWater boils at\n")
    env = dict(os.environ, DTM_PLUGINS="my_methods",
               PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "dtm_core", "divergence", "--compress", "chanprune:0.3",
           "--components", "0-2.down", "--prompts", str(prompts), "--new-tokens", "6"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S, env=env)
    assert r.returncode == 0, r.stderr
    assert "chanprune:0.3@0-2.down" in r.stdout and "fdt_mean" in r.stdout
    assert "Calibration statistics from the evaluated prompts (2 prompts)" in r.stderr
    h = subprocess.run([sys.executable, "-m", "dtm_core", "divergence", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=WAIT_S, env=env)
    assert "chanprune:S" in h.stdout
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S,
                         env=dict(env, DTM_PLUGINS="no_such_plugin"))
    assert bad.returncode == 2 and "no_such_plugin" in bad.stderr
    assert "Traceback" not in bad.stderr


def top5_ref(t):
    """The reference token is among the compressed model's five most likely tokens."""
    top = t.comp_logp.topk(5, dim=-1).indices.cpu()
    return (top == t.ref[:, None]).any(-1)


TOP5 = TokenMetric(
    "top5", top5_ref,
    (Column("top5_ref", lambda v, t: v.double().mean(), 1.0, "reference in compressed top-5"),),
    (Aggregate("top5_ref_mean", lambda tb: float(tb["top5_ref"].mean()), "top-5 hit",
               ("top5_ref",), True),),
    needs_distributions=True)


@pytest.fixture
def top5():
    register_metric(TOP5)
    yield TOP5
    unregister_metric("top5")


def test_registered_metric_in_divergence_sweep_and_stream(top5, tmp_path):
    tiny = make_tiny("llama", scale=2.0)
    prompts = random_prompts(5, seed=8)
    pair = make_pair(tiny, Recipe.single("int3", "1.*"))
    res = divergence(pair, prompt_ids=prompts, new_tokens=N)
    assert "top5_ref" in res.table.columns and "top5_ref_mean" in res.summary
    # slow reference: full forward passes, one prompt at a time
    for i, (p, ref) in enumerate(zip(prompts, res.references)):
        logits = pair.compressed(input_ids=torch.tensor([p + ref])).logits[0]
        hits = [int(ref[t]) in logits[len(p) - 1 + t].topk(5).indices.tolist()
                for t in range(len(ref))]
        assert res.table.top5_ref[i] == pytest.approx(sum(hits) / len(hits))
    assert 0 < res.summary["top5_ref_mean"] < 1
    # a sweep cell (the sweep takes its exact slow path for a metric that needs distributions)
    cells = sweep(tiny, "int3", prompts, N, cache_dir=tmp_path, layers="1", kinds="q,up")
    for _, row in cells.table.iterrows():
        d = divergence(make_pair(tiny, Recipe.single("int3", row.component)), prompt_ids=prompts,
                       new_tokens=N)
        assert row.top5_ref_mean == pytest.approx(d.summary["top5_ref_mean"], abs=1e-12)
        assert row.fdt_mean == d.table.fdt.mean()
        assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-6, abs=1e-9)
    # the stream: every step carries the metric, equal to the engine's per-token values
    st = list(stream_pair(pair, prompt_ids=prompts[0], new_tokens=N))[-1]
    live = [s.metrics["top5"] for s in st.steps if s.dense_token is not None]
    assert live == res.tokens[0].values["top5"].tolist()
    assert set(st.steps[0].metrics) == set(METRICS)


def test_metric_registry_defines_the_builtin_columns():
    from dtm_core.measure.divergence import COLUMNS, table_columns
    from dtm_core.analysis.sweep import CELL_COLUMNS, cell_columns

    assert table_columns() == COLUMNS      # built-ins only: the documented order
    assert set(CELL_COLUMNS) <= set(cell_columns())
    assert "chanprune" not in METHODS
