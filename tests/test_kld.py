"""llama.cpp-style KL-divergence report: chunking, statistics against a slow reference, GGUF pairs."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dtm_core.compression.recipe import Recipe
from dtm_core.measure.kld import KLDValues, chunk_positions, score_text, statistics
from dtm_core.compression.pair import make_pair

from conftest import ROOT, NumberTokenizer, make_tiny, WAIT_S


def test_chunking_hand_worked():
    # 20 tokens, ctx 8: two whole chunks (the last 4 tokens are dropped, as llama.cpp does);
    # in each, positions 4, 5, 6 predict tokens 5, 6, 7 of the chunk
    assert chunk_positions(20, 8) == [(0, [4, 5, 6]), (8, [4, 5, 6])]
    assert chunk_positions(7, 8) == []
    assert chunk_positions(9, 9) == [(0, [4, 5, 6, 7])]


def slow_stats(dense, comp, tokens, ctx):
    kl, lb_all, lc_all, same = [], [], [], []
    for start, positions in chunk_positions(len(tokens), ctx):
        x = torch.tensor([tokens[start:start + ctx]])
        db = torch.softmax(dense(x).logits[0].double(), -1)
        dc = torch.softmax(comp(x).logits[0].double(), -1)
        for j in positions:
            p, q = db[j].tolist(), dc[j].tolist()
            kl.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0))
            nxt = tokens[start + j + 1]
            lb_all.append(math.log(p[nxt]))
            lc_all.append(math.log(q[nxt]))
            same.append(max(range(len(p)), key=p.__getitem__) ==
                        max(range(len(q)), key=q.__getitem__))
    n = len(kl)
    nll_b, nll_c = [-x for x in lb_all], [-x for x in lc_all]
    dp = [math.exp(c) - math.exp(b) for b, c in zip(lb_all, lc_all)]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    sem = lambda v: math.sqrt((mean([x * x for x in v]) - mean(v) ** 2) / (len(v) - 1))  # noqa
    return {"positions": n, "kld_mean": mean(kl), "kld_mean_unc": sem(kl), "kld_max": max(kl),
            "ppl_base": math.exp(mean(nll_b)), "ppl_compressed": math.exp(mean(nll_c)),
            "ppl_base_unc": math.exp(mean(nll_b)) * sem(nll_b),
            "ln_ppl_ratio": mean(nll_c) - mean(nll_b), "dp_mean": mean(dp),
            "rms_dp": math.sqrt(mean([d * d for d in dp])),
            "same_top_p": 100 * mean([float(s) for s in same]),
            "kld_p50": float(np.percentile(kl, 50)), "dp_p99": float(np.percentile(dp, 99))}


def test_statistics_match_slow_reference():
    lm = make_tiny("llama", scale=8.0)
    lm.tokenizer = NumberTokenizer()
    pair = make_pair(lm, Recipe.single("int3", "*.*"))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, 500, (100,), generator=g).tolist()
    stats, values = score_text(pair, " ".join(map(str, tokens)), ctx=16)
    want = slow_stats(lm.model, pair.compressed, tokens, 16)
    assert stats["chunks"] == 6 and stats["positions"] == want["positions"] == 6 * 7
    for k, v in want.items():
        assert stats[k] == pytest.approx(v, rel=2e-4, abs=1e-7), k
    assert 0 < stats["same_top_p"] < 100


def test_identical_pair_scores_zero_and_one_chunk_at_a_time():
    lm = make_tiny("gpt2", scale=8.0)
    lm.tokenizer = NumberTokenizer()
    pair = make_pair(lm, Recipe.single("none"))
    shapes = []
    h = lm.model.register_forward_hook(lambda m, a, kw, out: shapes.append(
        tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        stats, _ = score_text(pair, " ".join(str(5 + i % 400) for i in range(70)), ctx=32)
    finally:
        h.remove()
    assert set(shapes) == {(1, 32)} and len(shapes) == 2   # one chunk per forward, no more
    assert stats["kld_mean"] == 0 and stats["same_top_p"] == 100 and stats["ppl_ratio"] == 1


def test_uncertainty_formulas_small_sample():
    v = KLDValues(kld=[0.1] * 12, logp_base=[-1.0] * 12, logp_comp=[-1.0] * 12,
                  same_top=[True] * 11 + [False])
    s = statistics(v, 1)
    assert s["kld_mean_unc"] == 0 and s["same_top_p"] == pytest.approx(100 * 11 / 12)
    assert s["same_top_p_unc"] == pytest.approx(100 * math.sqrt((11 / 12) * (1 / 12) / 11))


def test_two_gguf_files_as_a_pair(tmp_path, default_q4_gguf):
    from dtm_core.models.load import default_gguf_path

    q4 = default_q4_gguf
    same = tmp_path / "copy.gguf"
    shutil.copy(default_gguf_path(), same)
    # the first 12,000 characters of the shipped texts: 20 chunks of 128 tokens, a quarter of
    # the whole file's time
    text = tmp_path / "licenses-12k.txt"
    text.write_text((ROOT / "assets" / "texts" / "licenses.txt").read_text(encoding="utf-8")
                    [:12000], encoding="utf-8")
    results = {}
    for name, other in (("q4", q4), ("same", same)):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, "-m", "dtm_core", "kld", "--model",
                            str(default_gguf_path()), "--compressed-model", str(other), "--text",
                            str(text), "--ctx", "128", "--json", str(out),
                            "--cache-dir", str(tmp_path / "cache")],
                           cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
        assert r.returncode == 0, r.stderr
        assert "Same top p" in r.stdout and "KL divergence statistics" in r.stdout
        results[name] = json.loads(out.read_text())
    for key in ("kld_mean", "same_top_p", "ppl_base", "ppl_compressed", "chunks"):
        assert key in results["q4"]
    assert results["same"]["kld_mean"] < 1e-6 and results["same"]["same_top_p"] == 100
    assert results["q4"]["kld_mean"] > 0.01 and results["q4"]["same_top_p"] < 95
    assert results["q4"]["chunks"] == results["same"]["chunks"] > 10
    # KL by the base model's confidence: the buckets cover every scored position, and the
    # report prints them
    buckets = results["q4"]["kl_by_confidence"]
    assert sum(b["positions"] for b in buckets) == results["q4"]["positions"]
    assert sum(b["kl_share"] for b in buckets) == pytest.approx(1.0)
    assert "KL by the base model's top-token probability" in r.stdout
