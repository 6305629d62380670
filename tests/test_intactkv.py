"""IntactKV: the dense pivot KV is used bitwise, changes nothing between identical models, equals
continuing from the dense prompt cache, agrees between teacher forcing, generation, streaming and
sweeps; calibration lowers its loss; attention-sink tables are real probabilities."""
import copy

import pytest
import torch
from transformers import DynamicCache

from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence, pad_id_of
from dtm_core.errors import DTMError
from dtm_core.models.generation import GreedyDecoder, greedy_generate
from dtm_core.compression.intactkv import (CalibratedKV, IntactKV, PivotCache, calibrate,
                                           describe_pivots, right_pad_mask)
from dtm_core.compression.pair import Pair, make_pair, shared_copy
from dtm_core.analysis.sinks import attention_maps, sink_tables
from dtm_core.measure.streaming import stream_pair
from dtm_core.analysis.sweep import sweep

from conftest import make_tiny, random_prompts, WAIT_S

N = 10


def bos_prompts(n, seed):
    return [[1] + p for p in random_prompts(n, seed=seed)]


def test_parse():
    assert IntactKV.parse(None) is None and IntactKV.parse("off") is None
    assert IntactKV.parse("0") is None
    assert IntactKV.parse("3") == IntactKV(k=3)
    assert IntactKV.parse("prefix") == IntactKV(prefix=True)
    assert IntactKV.parse("bos") == IntactKV(k=1)
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(DTMError):
            IntactKV.parse(bad)


def test_prefix_needs_a_chat_template(tiny):
    with pytest.raises(DTMError, match="chat template"):
        IntactKV(prefix=True).pivot_lengths(tiny.tokenizer, [[1, 2, 3]])


def test_identical_models_change_nothing(tiny):
    same = Pair(dense=tiny, compressed=shared_copy(tiny.model), label="same")
    prompts = bos_prompts(6, seed=3)
    plain = divergence(same, prompt_ids=prompts, new_tokens=N)
    for k in (1, 3, 100):
        r = divergence(same, prompt_ids=prompts, new_tokens=N, intactkv=k,
                       generate_compressed=True)
        assert (r.table.fdt == N).all() and (r.table.fdt_generated == N).all()
        assert r.table.kl_mean.max() < 1e-6
        assert r.references == plain.references


def test_pivot_kv_is_bitwise_dense(tiny):
    pair = make_pair(tiny, Recipe.single("int3", "*.*"))
    seqs = bos_prompts(4, seed=5)
    ks = [2, 1, 3, 2]
    pad = pad_id_of(tiny.tokenizer)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        d_cache = tiny.model(input_ids=ids, use_cache=True).past_key_values
        t0 = max(ks)
        src = [(lay.keys[:, :, :t0], lay.values[:, :, :t0]) for lay in d_cache.layers]
        cache = PivotCache(pair.compressed.config, right_pad_mask(ks, t0), src.__getitem__)
        pair.compressed(input_ids=ids, past_key_values=cache, use_cache=True)
    for li, (dl, cl) in enumerate(zip(d_cache.layers, cache.layers)):
        for j, k in enumerate(ks):
            assert torch.equal(cl.keys[j, :, :k], dl.keys[j, :, :k]), li
            assert torch.equal(cl.values[j, :, :k], dl.values[j, :, :k]), li
            # after the pivots the compressed model's own K/V (int3 changes them)
            assert not torch.equal(cl.values[j, :, k:len(seqs[j])], dl.values[j, :, k:len(seqs[j])])


def test_decoder_prefill_pivots_are_bitwise_dense_with_left_padding(tiny):
    pair = make_pair(tiny, Recipe.single("int3", "*.*"))
    seqs = bos_prompts(3, seed=8)
    ks = [1, 2, 2]
    pad = pad_id_of(tiny.tokenizer)
    dense = GreedyDecoder(tiny.model, seqs, pad, {2})
    dense.prefill()
    comp = GreedyDecoder(pair.compressed, seqs, pad, {2}, (tiny.model, ks, IntactKV(k=2)))
    comp.prefill()
    width = dense.ids.shape[1]
    for dl, cl in zip(dense.cache.layers, comp.cache.layers):
        for j, (s, k) in enumerate(zip(seqs, ks)):
            cols = slice(width - len(s), width - len(s) + k)
            assert torch.equal(cl.keys[j, :, cols], dl.keys[j, :, cols])
            assert torch.equal(cl.values[j, :, cols], dl.values[j, :, cols])


def _continue_from_dense_cache(pair, prompt, ref):
    """The obviously-correct reference: dense prefill of the whole prompt, then the compressed
    model fed the reference one token at a time on a copy of that cache."""
    with torch.no_grad():
        out = pair.dense.model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache = copy.deepcopy(out.past_key_values)
        logits = [out.logits[0, -1]]
        for t in ref[:-1]:
            o = pair.compressed(input_ids=torch.tensor([[t]]), past_key_values=cache,
                                use_cache=True)
            cache = o.past_key_values
            logits.append(o.logits[0, -1])
    return torch.stack(logits)


def _greedy_from_dense_cache(pair, prompt, n, eos):
    with torch.no_grad():
        out = pair.dense.model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, nxt, toks = copy.deepcopy(out.past_key_values), out.logits[0, -1], []
        for _ in range(n):
            t = int(nxt.argmax())
            toks.append(t)
            if t in eos or len(toks) == n:
                break
            o = pair.compressed(input_ids=torch.tensor([[t]]), past_key_values=cache,
                                use_cache=True)
            cache, nxt = o.past_key_values, o.logits[0, -1]
    return toks


def test_whole_prompt_equals_continuing_from_dense_prompt_cache(tiny):
    pair = make_pair(tiny, Recipe.single("int4:g16", "*.*"))
    prompts = bos_prompts(5, seed=13)
    res = divergence(pair, prompt_ids=prompts, new_tokens=N, intactkv=1000,
                     generate_compressed=True)
    plain = divergence(pair, prompt_ids=prompts, new_tokens=N, references=res.references)
    assert res.table.pivots.tolist() == [len(p) for p in prompts]
    for i, p in enumerate(prompts):
        ref = res.references[i]
        logits = _continue_from_dense_cache(pair, p, ref)
        tm = res.tokens[i]
        assert tm.comp_argmax.tolist() == logits.argmax(-1).tolist()
        assert float(tm.kl[0]) == 0.0  # the first token is the dense model's own prediction
        p_ref = torch.softmax(logits.float(), -1)[torch.arange(len(ref)), torch.tensor(ref)]
        torch.testing.assert_close(tm.p_comp_ref, p_ref, atol=1e-5, rtol=1e-4)
        assert res.table.compressed_text[i] == " ".join(
            map(str, _greedy_from_dense_cache(pair, p, N, {2})))
    # and it is not the plain compressed model
    assert not all(torch.equal(a.comp_argmax, b.comp_argmax)
                   for a, b in zip(res.tokens, plain.tokens))


@pytest.mark.parametrize("k", [1, 3])
def test_teacher_forcing_matches_generation(tiny, k):
    """FDT from the IntactKV teacher-forced pass equals where IntactKV greedy generation leaves
    the dense output, in padded batches."""
    pair = make_pair(tiny, Recipe.single("int4:g16", "1.*,2.*"))
    res = divergence(pair, prompt_ids=bos_prompts(8, seed=21), new_tokens=N, intactkv=k,
                     generate_compressed=True, batch_size=3)
    assert res.table.fdt.tolist() == res.table.fdt_generated.tolist()
    assert res.table.pivots.max() == k


def test_stream_with_intactkv_matches_engine(tiny):
    pair = make_pair(tiny, Recipe.single("int4:g16", "*.*"))
    for ids in bos_prompts(3, seed=4):
        st = list(stream_pair(pair, prompt_ids=ids, new_tokens=N, intactkv=2))[-1]
        res = divergence(pair, prompt_ids=[ids], new_tokens=N, intactkv=2)
        assert st.pivots == 2
        assert st.fdt == res.table.fdt[0]
        assert [s.forced_token for s in st.steps if s.dense_token is not None] == \
            res.tokens[0].comp_argmax.tolist()
        own = greedy_generate(pair.compressed, [ids], N, 0, {2},
                              intact=(tiny.model, [2], IntactKV(k=2)))[0]
        assert st.comp_tokens == own


@pytest.mark.parametrize("k", [2, 1000])
def test_sweep_cells_with_intactkv_equal_divergence(k, tmp_path):
    tiny = make_tiny("llama", scale=2.0)
    prompts = bos_prompts(5, seed=9)
    res = sweep(tiny, "int4:g16", prompts, N, cache_dir=tmp_path, intactkv=k, layers="1")
    plain = sweep(tiny, "int4:g16", prompts, N, cache_dir=tmp_path, layers="1")
    assert res.key != plain.key
    for _, row in res.table.iterrows():
        d = divergence(make_pair(tiny, Recipe.single("int4:g16", row.component)),
                       prompt_ids=prompts, new_tokens=N, intactkv=k)
        assert row.fdt_mean == d.table.fdt.mean(), row.component
        assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)


def test_calibration_lowers_its_loss_and_is_cached(tmp_path):
    tiny = make_tiny("llama", scale=4.0)
    pair = make_pair(tiny, Recipe.single("int3", "*.*"))
    prompts = bos_prompts(12, seed=2)
    seen = []
    cal = calibrate(pair, prompts, IntactKV(k=1), steps=30, lr=0.05, batch_size=4,
                    cache_dir=tmp_path, progress=lambda f, m: seen.append(f))
    assert cal.ids == (1,)
    assert cal.loss_after < 0.95 * cal.loss_before
    assert seen[-1] == 1.0 and len(seen) > 3
    # the pivot K/V changed from the dense one; weights did not
    dense_k = tiny.model(input_ids=torch.tensor([[1]]), use_cache=True).past_key_values.layers[0].keys
    assert not torch.equal(cal.keys[0], dense_k[0])
    assert all(not p.requires_grad for p in tiny.model.parameters())
    again = calibrate(pair, prompts, IntactKV(k=1), steps=30, lr=0.05, batch_size=4,
                      cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(cal.keys, again.keys))
    ikv = IntactKV(k=1).with_calibration(again)
    res = divergence(pair, prompt_ids=prompts, new_tokens=N, intactkv=ikv,
                     generate_compressed=True, batch_size=5)
    assert res.table.fdt.tolist() == res.table.fdt_generated.tolist()
    with pytest.raises(DTMError, match="calibrated pivot tokens"):
        divergence(pair, prompt_ids=[[5, 6, 7]], new_tokens=N, intactkv=ikv)


def test_sweep_with_calibrated_pivots_checks_its_context(tmp_path):
    """A calibrated setting compares by identity, so a sweep can check its prepared context."""
    from dtm_core.analysis.sweep import prepare

    tiny = make_tiny("llama", scale=2.0)
    prompts = bos_prompts(4, seed=6)
    cal = calibrate(make_pair(tiny, Recipe.single("int4:g16", "*.*")), prompts, IntactKV(k=1),
                    steps=2, use_cache=False)
    ikv = IntactKV(k=1).with_calibration(cal)
    ctx = prepare(tiny, prompts, N, intactkv=ikv)
    res = sweep(tiny, "int4:g16", prompts, N, cache_dir=tmp_path, layers="1", kinds="v",
                ctx=ctx, intactkv=ikv)
    d = divergence(make_pair(tiny, Recipe.single("int4:g16", "1.v")), prompt_ids=prompts,
                   new_tokens=N, intactkv=ikv)
    assert res.table.fdt_mean[0] == d.table.fdt.mean()
    other = IntactKV(k=1).with_calibration(CalibratedKV(cal.ids, cal.keys, cal.values))
    with pytest.raises(DTMError, match="different IntactKV"):
        sweep(tiny, "int4:g16", prompts, N, cache_dir=tmp_path, layers="1", ctx=ctx,
              intactkv=other)


def test_calibration_refuses_different_first_tokens(tiny):
    pair = make_pair(tiny, Recipe.single("int4", "*.*"))
    with pytest.raises(DTMError, match="must be the same"):
        calibrate(pair, [[5, 6, 7], [8, 9, 10]], IntactKV(k=1), steps=2, use_cache=False)


def test_calibrated_kv_round_trips(tmp_path):
    cal = CalibratedKV(ids=(1, 4), keys=(torch.randn(2, 2, 8),), values=(torch.randn(2, 2, 8),),
                       loss_before=2.0, loss_after=1.0, steps=3)
    cal.save(tmp_path / "c.safetensors")
    back = CalibratedKV.load(tmp_path / "c.safetensors")
    assert back.ids == cal.ids and back.steps == 3 and back.loss_after == 1.0
    assert torch.equal(back.keys[0], cal.keys[0]) and torch.equal(back.values[0], cal.values[0])


def test_attention_rows_are_probabilities_and_shares_match_a_loop(tiny):
    ids = [1, 7, 9, 11, 13, 17, 19]
    attn, hidden = attention_maps(tiny.model, ids)
    assert len(attn) == len(hidden) == 3
    for a in attn:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-5, rtol=0)
        assert torch.all(a.triu(1) == 0)  # causal
    shares, acts = sink_tables(tiny.model, ids, k=2)
    for _, r in shares.iterrows():
        a = attn[int(r["layer"])][int(r["head"])]
        slow = sum(float(a[q, 0] + a[q, 1]) for q in range(2, len(ids))) / (len(ids) - 2)
        assert r.share == pytest.approx(slow, abs=1e-6)
    assert ((shares.share >= 0) & (shares.share <= 1 + 1e-6)).all()
    assert (acts.pivot_max > 0).all() and (acts.median_abs > 0).all()
    for _, r in acts.iterrows():
        h = hidden[int(r["layer"])].abs()
        assert r.pivot_max == pytest.approx(float(h[:2].max()))
        assert r.median_abs == pytest.approx(float(h[2:].median()))
    assert tiny.model.config._attn_implementation != "eager"  # restored after the view
    with pytest.raises(DTMError, match="longer than"):
        sink_tables(tiny.model, [1, 2], k=2)


def test_describe_pivots_names_the_tokens(tiny):
    text = describe_pivots(tiny.tokenizer, [5, 6, 7], 2)
    assert "'5'" in text and "'6'" in text and "no BOS" in text
    assert "no BOS" not in describe_pivots(tiny.tokenizer, [1, 6, 7], 1)


# --------------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct): chat prefix, evaluation side by side, CLI


def test_chat_prefix_is_the_system_prompt(default_model):
    from dtm_core.models.generation import encode_prompts
    from dtm_core.compression.intactkv import chat_prefix_ids

    tok = default_model.tokenizer
    pre = chat_prefix_ids(tok)
    text = tok.decode(pre)
    assert "You are a helpful AI assistant" in text and text.rstrip().endswith("user")
    ids = encode_prompts(tok, ["Hi", "What is 2+2?"], chat=True)
    assert IntactKV(prefix=True).pivot_lengths(tok, ids) == [len(pre), len(pre)]
    plain_ids = encode_prompts(tok, ["Hi"])
    with pytest.raises(DTMError, match="chat template on"):
        IntactKV(prefix=True).pivot_lengths(tok, plain_ids)


def test_evaluate_side_by_side_matches_separate_runs(default_model):
    from dtm_core.measure.evaluate import evaluate
    from dtm_core.models.generation import encode_prompts
    from dtm_core.measure.prompts import parse_prompt_bytes

    pset = parse_prompt_bytes(
        b'{"question": "What is the capital of France?", "answer": "Paris"}\n'
        b'{"question": "What is the capital of Japan?", "answer": "Tokyo"}\n'
        b'{"question": "How many legs does a spider have?", "answer": "eight"}\n', "q.jsonl")
    pair = make_pair(default_model, Recipe.single("int4:g128"))
    res = evaluate(pair, pset, 12, chat=True, intactkv="prefix")
    ids = encode_prompts(default_model.tokenizer, pset.prompts, chat=True)
    plain = divergence(pair, prompt_ids=ids, new_tokens=12, generate_compressed=True)
    intact = divergence(pair, prompt_ids=ids, new_tokens=12, generate_compressed=True,
                        references=plain.references, intactkv="prefix")
    assert res.table.fdt.tolist() == plain.table.fdt.tolist()
    assert res.table.fdt_intactkv.tolist() == intact.table.fdt.tolist()
    assert res.table.compressed_text_intactkv.tolist() == intact.table.compressed_text.tolist()
    assert {"correct_compressed_intactkv", "pivots", "kl_mean_intactkv"} <= set(res.table)
    cmp = res.comparison.set_index("key")
    assert cmp.loc["fdt_mean", "intactkv"] == pytest.approx(intact.table.fdt.mean())
    assert cmp.loc["fdt_mean", "plain"] == pytest.approx(plain.table.fdt.mean())
    assert cmp.loc["kl_mean", "delta"] == pytest.approx(
        intact.table.kl_mean.mean() - plain.table.kl_mean.mean(), rel=1e-6)
    assert "accuracy_compressed" in cmp.index and "accuracy_gain_intactkv" in res.summary
    assert res.config["intactkv"] == "prefix"
    assert '"intactkv_comparison"' in res.to_json()


def test_cli_divergence_and_calibrate(tmp_path):
    import csv
    import json
    import subprocess
    import sys

    from conftest import ROOT

    p = tmp_path / "p.txt"
    p.write_text("Name a fruit.\nWhat is the capital of Spain?\nSay hello.\nCount to three.\n")
    out, js = tmp_path / "d.csv", tmp_path / "d.json"
    env = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": WAIT_S}
    r = subprocess.run([sys.executable, "-m", "dtm_core", "divergence", "--compress", "int4:g128",
                        "--prompts", str(p), "--chat", "--new-tokens", "8", "--intactkv",
                        "prefix", "--out", str(out), "--json", str(js)], **env)
    assert r.returncode == 0, r.stderr
    assert "plain" in r.stdout and "IntactKV" in r.stdout and "fdt_mean" in r.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(int(x["pivots"]) > 10 for x in rows)
    assert {"fdt", "fdt_plain", "kl_mean_plain"} <= set(rows[0])
    summary = json.loads(js.read_text())
    assert summary["intactkv_setting"] == "prefix" and "fdt_mean" in summary["plain"]

    r = subprocess.run([sys.executable, "-m", "dtm_core", "divergence", "--compress", "int8",
                        "--prompts", str(p), "--intactkv", "prefix"], **env)
    assert r.returncode == 2 and "chat template on" in r.stderr

    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "dtm_core", "intactkv-calibrate", "--compress", "int3:g128",
           "--prompts", str(p), "--chat", "--steps", "6", "--new-tokens", "8",
           "--cache-dir", str(cache), "--json", str(tmp_path / "c.json")]
    r = subprocess.run(cmd, **env)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["loss_after"] < res["loss_before"]
    assert [v["variant"] for v in res["variants"]] == ["plain", "IntactKV prefix",
                                                       "IntactKV prefix+cal"]
    assert "FDT gain of calibration over plain IntactKV" in r.stdout
    assert len(list((cache / "intactkv").glob("*.safetensors"))) == 1
    r2 = subprocess.run(cmd, **env)   # reuses the stored calibration
    assert r2.returncode == 0 and json.loads((tmp_path / "c.json").read_text()) == res
