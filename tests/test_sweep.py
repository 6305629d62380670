"""Sensitivity sweeps: cells equal single-component divergence, resume after SIGKILL, torchrun
sharding, and plans found by bisection."""
import csv
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.compression.pair import make_pair
from dtm_core.planning.plan import llama_cpp_overrides, make_plan
from dtm_core.analysis.sweep import prepare, sweep

from conftest import ROOT, random_prompts, WAIT_S


@pytest.mark.parametrize("spec", ["int4:g16", "magnitude:0.5", "w8a8"])
def test_cells_equal_single_component_divergence(tiny, spec, tmp_path):
    """Rerunning only the layers at and after the component gives the full forward's numbers,
    for every family (Llama, GPT-2 Conv1D, OPT)."""
    prompts = random_prompts(6, seed=11)
    res = sweep(tiny, spec, prompts, 10, cache_dir=tmp_path)
    assert len(res.table) == len(res.table.component.unique()) > 10
    for _, row in res.table.iterrows():
        d = divergence(make_pair(tiny, Recipe.single(spec, row.component)), prompt_ids=prompts,
                       new_tokens=10)
        assert row.fdt_mean == d.table.fdt.mean(), row.component
        assert row.sdt_mean == pytest.approx(d.table.sdt.mean(), abs=1e-12)
        assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)
        assert row.ppl_change == pytest.approx(
            (d.table.ppl_compressed / d.table.ppl_dense - 1).mean(), rel=1e-4, abs=1e-6)
    assert res.table.fdt_mean.nunique() > 1
    again = sweep(tiny, spec, prompts, 10, cache_dir=tmp_path)
    assert again.computed == 0 and again.reused == len(res.table)
    assert again.table.equals(res.table)


@pytest.mark.parametrize("spec", ["int4:g16", "kv:int4"])
def test_the_dense_side_forms_logits_a_chunk_of_positions_at_a_time(tiny, spec, tmp_path,
                                                                     monkeypatch):
    """Long N: the sweep's dense pass keeps hidden states and forms the continuation logits a
    few positions at a time (never all of them per batch), with the one-chunk pass's cells."""
    import dtm_core.analysis.sweep.record as record

    prompts = random_prompts(5, seed=12)
    whole = sweep(tiny, spec, prompts, 14, cache_dir=tmp_path / "a")
    seen = []
    real = record.head_logits
    monkeypatch.setattr(record, "head_logits", lambda m, h: seen.append(len(h)) or real(m, h))
    monkeypatch.setattr(record, "ROW_CHUNK", 6)
    cut = sweep(tiny, spec, prompts, 14, cache_dir=tmp_path / "b")
    assert seen and max(seen) == 6
    cols = [c for c in whole.table.columns if c != "seconds" and
            whole.table[c].dtype.kind in "fiub"]
    assert (cut.table.fdt_mean == whole.table.fdt_mean).all()
    for c in cols:
        assert cut.table[c].to_numpy() == pytest.approx(whole.table[c].to_numpy(), rel=1e-6,
                                                         abs=1e-9, nan_ok=True), c


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dtm_core", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT_S, **kw)


def test_cli_sweep_cell_equals_cli_divergence(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("The capital of France is\nOnce upon a time\nWater boils at\nMachine learning is\n")
    out = tmp_path / "s.csv"
    r = cli("sweep", "--model", "default", "--compress", "int4:g128", "--prompts", str(p),
            "--new-tokens", "16", "--layers", "5", "--kinds", "q,down", "--out", str(out),
            "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    rows = {r["component"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"5.q", "5.down"}
    for col in ["layer", "kind", "params", "fdt_mean", "fdt_median", "sdt_mean", "kl_mean"]:
        assert col in rows["5.q"]
    for comp in rows:
        dout = tmp_path / f"d{comp}.csv"
        r = cli("divergence", "--compress", "int4:g128", "--components", comp, "--prompts",
                str(p), "--new-tokens", "16", "--out", str(dout))
        assert r.returncode == 0, r.stderr
        fdts = [int(x["fdt"]) for x in csv.DictReader(dout.open())]
        assert float(rows[comp]["fdt_mean"]) == sum(fdts) / len(fdts)


def test_cli_sweep_with_intactkv_equals_divergence(tmp_path, default_model):
    p = tmp_path / "p.txt"
    p.write_text("The capital of France is\nOnce upon a time\nWater boils at\n")
    out = tmp_path / "s.csv"
    r = cli("sweep", "--compress", "int4:g128", "--prompts", str(p), "--new-tokens", "12",
            "--layers", "3", "--kinds", "v,up", "--intactkv", "1", "--out", str(out),
            "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert "IntactKV 1" in r.stdout
    texts = p.read_text().splitlines()
    for row in csv.DictReader(out.open()):
        d = divergence(make_pair(default_model, Recipe.single("int4:g128", row["component"])),
                       texts, 12, intactkv=1)
        assert float(row["fdt_mean"]) == d.table.fdt.mean(), row["component"]
        # float64 where it matters: agrees to ~1e-7 nats (float32 was off by ~1e-4 here)
        assert float(row["kl_mean"]) == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)


def test_sweep_resumes_after_sigkill(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("The capital of France is\nOnce upon a time\n")
    cache = tmp_path / "c"
    args = ["sweep", "--compress", "int8", "--prompts", str(p), "--new-tokens", "6",
            "--layers", "0-11", "--cache-dir", str(cache), "--out", str(tmp_path / "o.csv")]
    proc = subprocess.Popen([sys.executable, "-m", "dtm_core", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(glob.glob(str(cache / "sweeps" / "*" / "cells" / "*.json"))) < 6:
        assert proc.poll() is None, "the sweep finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = glob.glob(str(cache / "sweeps" / "*" / "cells" / "*.json"))
    assert 6 <= len(done) < 84
    for f in done:
        json.loads(open(f).read())   # every stored cell is whole
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} from the store" in r.stdout
    assert len(list(csv.DictReader(open(tmp_path / "o.csv")))) == 84


def test_torchrun_shards_cells_across_two_ranks(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("The capital of France is\nWater boils at\n")
    out = tmp_path / "o.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dtm_core", "sweep", "--compress", "int8", "--prompts", str(p),
           "--new-tokens", "6", "--layers", "0-1", "--cache-dir", str(tmp_path / "c"),
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    # cells are handed out dynamically from the queue in the c10d store: the split varies
    import re
    m = re.search(r"\((\d+) computed here, (\d+) from the store", r.stdout)
    assert m and int(m.group(1)) + int(m.group(2)) == 14 and "2 ranks" in r.stdout, r.stdout
    rows = list(csv.DictReader(out.open()))
    assert sorted(x["component"] for x in rows) == sorted(
        f"{l}.{k}" for l in range(2) for k in ["q", "k", "v", "o", "gate", "up", "down"])


def test_plan_bisection(tiny, tmp_path):
    prompts = random_prompts(5, seed=2)
    res = sweep(tiny, "int4:g16", prompts, 10, cache_dir=tmp_path)
    ctx = prepare(tiny, prompts, 10)
    plan = make_plan(tiny, res.table, "int4:g16", prompts, ctx.references, 10, budget=0.7)
    n = len(res.table)
    assert len(plan.curve) - 1 <= math.ceil(math.log2(n + 1)) + 1   # bisection, not n evaluations
    assert plan.fdt_mean >= plan.budget_fdt == 7.0
    order = list(res.table.sort_values(["fdt_mean", "kl_mean"], ascending=[False, True]).component)
    assert plan.components == order[:len(plan.components)]
    if len(plan.components) < n:   # one more component breaks the budget
        d = divergence(make_pair(tiny, Recipe.single("int4:g16", ",".join(
            order[:len(plan.components) + 1]))), prompt_ids=prompts, new_tokens=10)
        assert d.table.fdt.mean() < 7.0
    data = plan.to_json()
    assert Recipe.from_json(data).items[0].selection == ",".join(plan.components)
    assert data["llama_cpp_tensor_types"] == llama_cpp_overrides("int4:g16", plan.components)


def test_llama_cpp_overrides_format():
    assert llama_cpp_overrides("int4", ["3.q", "10.down"]) == [
        "--tensor-type ^blk\\.3\\.attn_q\\.weight$=q4_0",
        "--tensor-type ^blk\\.10\\.ffn_down\\.weight$=q4_0"]
    assert llama_cpp_overrides("int8", ["0.gate"]) == [
        "--tensor-type ^blk\\.0\\.ffn_gate\\.weight$=q8_0"]


def test_progress_says_done_of_total_time_left_and_rate(tmp_path):
    """Sweeps and prompt sets report k/total, elapsed<left and a rate (tqdm's meter), in the
    CLI and the page alike."""
    import re

    from dtm_core.measure.evaluate import evaluate
    from dtm_core.measure.prompts import PromptRecord, PromptSet
    from conftest import NumberTokenizer, make_tiny

    lm = make_tiny("llama", scale=4.0)
    seen = []
    sweep(lm, "int4", random_prompts(3, seed=1), 4, cache_dir=tmp_path, layers="0-1",
          progress=lambda f, m: seen.append((f, m)))
    assert len(seen) == 14 and seen[-1][0] == 1.0
    assert re.match(r"1/14 cells \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(s/cell|cell/s)\]  0\.q: mean FDT",
                    seen[0][1]), seen[0][1]
    lm.tokenizer = NumberTokenizer()
    recs = [PromptRecord(" ".join(str(5 + i + j) for j in range(4))) for i in range(5)]
    seen.clear()
    evaluate(make_pair(lm, Recipe.single("int4")), PromptSet("n", recs), 4, chunk=2,
             progress=lambda f, m: seen.append(m))
    assert [m.split(" [")[0] for m in seen] == ["2/5 prompts", "4/5 prompts", "5/5 prompts"]
