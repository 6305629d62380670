"""Prompt-set evaluation: LLM-KICK accuracy against a slow reference, bootstrap, export, rejects."""
import json
import tempfile
import re

import numpy as np
import pandas as pd
import pytest

from dtm_core.compression.recipe import Recipe
from dtm_core.measure.evaluate import (answer_correct, chosen_letter, evaluate, normalize,
                                       paired_bootstrap)
from dtm_core.models.generation import encode_prompts
from dtm_core.models.load import eos_ids
from dtm_core.compression.pair import make_pair
from dtm_core.measure.prompts import PromptSet, PromptRecord, load_prompts

from conftest import NumberTokenizer, hf_greedy, make_tiny


def test_normalize_and_contains():
    assert normalize("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert answer_correct("It is the city of Paris.", ["paris"])
    assert not answer_correct("It is London.", ["Paris", "Lyon"])
    assert answer_correct("A blue whale", ["Blue whale"])
    assert not answer_correct("anything", [""])


def test_chosen_letter():
    assert chosen_letter(" B. Jupiter", 4) == "B"
    assert chosen_letter("The answer is (C)", 4) == "C"
    assert chosen_letter("E is not a choice, A is", 4) == "A"
    assert chosen_letter("no letter here", 4) is None


def test_paired_bootstrap_reference():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], float)
    b = np.array([0, 1, 0, 0, 0, 1, 1, 0, 0, 1], float)
    mean, lo, hi = paired_bootstrap(a, b, n=500, seed=3)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 10, size=(500, 10))
    slow = sorted(sum(b[j] - a[j] for j in row) / 10 for row in idx)
    assert mean == pytest.approx(-0.3)
    assert lo == pytest.approx(np.percentile(slow, 2.5)) and hi == pytest.approx(
        np.percentile(slow, 97.5))
    assert lo <= mean <= hi


def test_too_long_prompts_are_rejected_by_line():
    lm = make_tiny("llama")
    pair = make_pair(lm, Recipe.single("int8"))
    lm.tokenizer = NumberTokenizer()
    recs = [PromptRecord(prompt="5 6 7", line=1), PromptRecord(prompt=" ".join(["9"] * 250), line=2),
            PromptRecord(prompt="8 9", line=4)]
    res = evaluate(pair, PromptSet("x.txt", recs, sha256="0"), 10)
    assert list(res.table.line) == [1, 4]
    assert res.rejected and res.rejected[0][0] == 2 and "context of 256" in res.rejected[0][1]


def slow_correct(text, record):
    """An independent re-implementation of the LLM-KICK rule for the reference."""
    def norm(s):
        s = re.sub(r"[^\w\s]|_", "", s.lower())
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return " ".join(s.split())
    if record.choices:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(record.choices)]
        m = re.search(r"\b([%s])\b" % letters, text.strip())
        return float(bool(m) and m.group(1) in record.answers)
    return float(any(norm(a) in norm(text) for a in record.answers if norm(a)))


@pytest.mark.parametrize("set_name,n_prompts", [("factoid_qa", 10), ("multiple_choice", 8)])
def test_accuracy_equals_slow_reference(default_model, set_name, n_prompts, tmp_path):
    full = load_prompts(set_name)
    pset = PromptSet(full.name, full.records[:n_prompts], sha256=full.sha256)
    pair = make_pair(default_model, Recipe.single("magnitude:0.2", "*.up,*.gate"))
    res = evaluate(pair, pset, 12, chat=True, chunk=4)
    tok, eos = default_model.tokenizer, eos_ids(default_model)
    ids = encode_prompts(tok, pset.prompts, chat=True)
    for i, rec in enumerate(pset.records):
        for side, model in (("dense", default_model.model), ("compressed", pair.compressed)):
            text = tok.decode(hf_greedy(model, ids[i], 12, eos, pad_id=2), skip_special_tokens=True)
            assert res.table[f"correct_{side}"][i] == slow_correct(text, rec), (side, i, text)
    s = res.summary
    assert s["accuracy_dense"] == res.table.correct_dense.mean()
    assert s["accuracy_compressed"] == res.table.correct_compressed.mean()
    pairs = list(zip(res.table.correct_dense, res.table.correct_compressed))
    assert s["flips_correct_to_wrong"] == sum(a and not b for a, b in pairs)
    assert s["flips_wrong_to_correct"] == sum(b and not a for a, b in pairs)
    assert 0 < s["accuracy_mcnemar_p"] <= 1
    # export: a plain CSV (header first) with the configuration in NAME.json beside it, JSON
    # with everything
    csv_text = res.to_csv()
    assert csv_text.splitlines()[0].startswith("prompt_index,")
    with tempfile.TemporaryDirectory() as d:
        res.write(f"{d}/run.csv")
        cfg = json.loads(open(f"{d}/run.json", encoding="utf-8").read())["config"]
        back = pd.read_csv(f"{d}/run.csv")
    assert cfg["prompt_set_sha256"] == full.sha256 and cfg["new_tokens"] == 12
    assert cfg["recipe"] == [{"spec": "magnitude:0.2", "components": "*.up,*.gate"}]
    assert {"torch", "transformers", "dtm_core"} <= set(cfg["versions"])
    assert list(back.fdt) == list(res.table.fdt) and len(back) == len(res.table)
    data = json.loads(res.to_json())
    assert data["config"] == cfg and len(data["rows"]) == n_prompts


def test_builtin_sets_sizes():
    sizes = {n: len(load_prompts(n).records) for n in
             ["general", "factoid_qa", "multiple_choice", "retrieval_qa", "instructions"]}
    assert sizes["general"] >= 50 and sizes["factoid_qa"] >= 50
    assert sizes["multiple_choice"] >= 30 and sizes["retrieval_qa"] >= 20
    assert sizes["instructions"] >= 20
    assert all(r.answers for r in load_prompts("factoid_qa").records)
    assert all(r.choices and r.answers[0] in "ABCD" for r in load_prompts("multiple_choice").records)
    assert all(r.context and r.answers for r in load_prompts("retrieval_qa").records)


def test_stop_keeps_finished_chunks():
    import threading

    lm = make_tiny("llama")
    pair = make_pair(lm, Recipe.single("int8"))
    lm.tokenizer = NumberTokenizer()
    recs = [PromptRecord(prompt=f"{5 + i} {6 + i} 7", line=i + 1) for i in range(10)]
    stop = threading.Event()
    seen = []

    def progress(frac, msg):
        seen.append(frac)
        stop.set()  # ask to stop as soon as the first chunk is done

    res = evaluate(pair, PromptSet("s.txt", recs, sha256="0"), 6, chunk=3, stop=stop,
                   progress=progress)
    assert res.stopped and len(res.table) == 3 and seen == [0.3]


def _mcnemar_by_enumeration(b, c):
    """Every way the b + c discordant prompts could have gone under H0 (each way with 1/2): the
    share of outcomes at least as unbalanced as the one seen."""
    import itertools

    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    extreme = sum(1 for signs in itertools.product((0, 1), repeat=n)
                  if min(sum(signs), n - sum(signs)) <= k)
    return extreme / 2 ** n


@pytest.mark.parametrize("seed", range(6))
def test_flips_and_exact_mcnemar_against_slow_references(seed):
    from dtm_core.measure.evaluate import flips, mcnemar_exact

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    before = rng.random(n) < 0.6
    after = np.where(rng.random(n) < 0.3, ~before, before)
    lost, won = flips(before, after)
    assert lost == sum(1 for a, b in zip(before, after) if a and not b)
    assert won == sum(1 for a, b in zip(before, after) if b and not a)
    if lost + won <= 16:
        assert mcnemar_exact(lost, won) == pytest.approx(_mcnemar_by_enumeration(lost, won),
                                                         rel=1e-12)
    for b, c in [(0, 0), (3, 3), (0, 5), (7, 1), (10, 2), (1, 12)]:
        assert mcnemar_exact(b, c) == pytest.approx(_mcnemar_by_enumeration(b, c), rel=1e-12)
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)      # 2 x 1/32, the textbook value


def test_worst_prompts_rank_and_show_the_divergent_tokens():
    """Lowest FDT (then highest KL) first, or highest KL; the tokens shown at the divergence are
    the reference's and the compressed model's own greedy token there."""
    from dtm_core.models.load import LoadedModel

    lm = make_tiny("llama", scale=4.0)
    lm = LoadedModel(model=lm.model, tokenizer=NumberTokenizer(), source=lm.source,
                     description="", fingerprint=lm.fingerprint)
    texts = [" ".join(str(3 + (5 * i + 7 * j) % 90) for j in range(4 + i % 6)) for i in range(9)]
    pset = PromptSet("nums", [PromptRecord(t, line=i + 1) for i, t in enumerate(texts)])
    pair = make_pair(lm, Recipe.single("int3"))
    res = evaluate(pair, pset, 8)
    w = res.worst(4, "fdt")
    t = res.table
    want = t.sort_values(["fdt", "kl_mean"], ascending=[True, False]).prompt_index[:4].tolist()
    assert w.prompt_index.tolist() == want
    assert res.worst(3, "kl").prompt_index.tolist() == \
        t.sort_values("kl_mean", ascending=False).prompt_index[:3].tolist()
    assert (w.fdt < 8).any()
    for _, row in w.iterrows():
        i = int(row.prompt_index)
        ids = [int(x) for x in texts[i].split()]
        dense = hf_greedy(lm.model, ids, 8, {2})
        comp = hf_greedy(pair.compressed, ids, 8, {2})
        f = int(row.fdt)
        if f < len(dense):
            assert row.dense_token == str(dense[f]) and row.compressed_token == str(comp[f])
            assert row.before.split() == [str(x) for x in dense[max(0, f - 12):f]]
    data = json.loads(res.to_json())
    assert [r["prompt_index"] for r in data["worst_fdt"]] == t.sort_values(
        ["fdt", "kl_mean"], ascending=[True, False]).prompt_index[:9].tolist()
