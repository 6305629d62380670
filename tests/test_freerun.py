"""Free-running comparison and final answers (issue 27): the text measures against slow, obviously
correct computations, the columns against transformers' own greedy generation of both models,
numeric sets through evaluate and the CLI."""
from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest

from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.measure.evaluate import evaluate
from dtm_core.measure.freerun import (answer_value, answers_equal, edit_similarity, ends_in_loop,
                                      final_answer, free_run_row, generated, rejoin_position)
from dtm_core.measure.prompts import load_prompts, parse_prompt_bytes
from dtm_core.models.load import eos_ids

from conftest import hf_greedy, make_tiny, random_prompts


def _levenshtein(a, b) -> int:
    """The textbook dynamic programme."""
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[len(b)]


def _rejoin_slow(dense, comp, k):
    f = next((t for t, (x, y) in enumerate(zip(dense, comp)) if x != y),
             None if len(dense) == len(comp) else min(len(dense), len(comp)))
    if f is None:
        return None
    for j in range(f + 1, len(comp)):
        for i in range(f, len(dense)):
            if len(comp[j:j + k]) == k and comp[j:j + k] == dense[i:i + k]:
                return j
    return None


def test_edit_similarity_and_rejoin_against_slow_definitions():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        want = 1.0 if not a and not b else 1 - _levenshtein(a, b) / max(len(a), len(b))
        assert edit_similarity(a, b) == pytest.approx(want, abs=1e-12)
        base = [rng.randrange(50) for _ in range(60)]
        cut = rng.randrange(1, 40)
        comp = base[:cut] + [rng.randrange(50, 60) for _ in range(rng.randrange(1, 6))] \
            + base[cut + rng.randrange(0, 4):]
        assert rejoin_position(base, comp, 4) == _rejoin_slow(base, comp, 4)
    # an insertion of three tokens, then the dense text again: rejoins right after them
    dense = list(range(100, 160))
    comp = dense[:10] + [1, 2, 3] + dense[10:]
    assert rejoin_position(dense, comp) == 13
    assert rejoin_position(dense, dense) is None
    assert rejoin_position(dense, dense[:10] + [7] * 50) is None


def test_loops_are_spans_of_at_most_32_repeated_three_times_at_the_end():
    span = list(range(32))
    assert ends_in_loop([9, 8] + span * 3)
    assert not ends_in_loop([9, 8] + list(range(33)) * 3)         # span too long
    assert not ends_in_loop([9, 8] + span * 2)                    # only twice
    assert ends_in_loop([5, 6, 7, 7, 7])
    assert not ends_in_loop([1, 2, 1, 2, 1, 2, 3])                # not at the end
    assert ends_in_loop([4, 1, 2, 1, 2, 1, 2])
    assert generated([3, 4, 2, 5], {2}) == [3, 4]


@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7, and the total is 1,234 apples.", "1234"),
    ("The answer is \\boxed{\\frac{3}{4}} (or 0.75)", "\\frac{3}{4}"),
    ("first \\boxed{2} then \\boxed{{x}+1}", "{x}+1"),
    ("no number here", ""),
    ("it costs $-2.50", "-2.50"),
])
def test_final_answer(text, want):
    assert final_answer(text) == want


def test_answers_compare_numerically():
    assert answers_equal("1,234", "1234.0")
    assert answers_equal("\\frac{3}{4}", "0.75") and answers_equal("3/4", ".75")
    assert answers_equal("$12", "12") and answers_equal("12 apples", "12")
    assert not answers_equal("12", "13") and not answers_equal("", "")
    assert answer_value("abc") is None


def test_the_builtin_sets_for_long_generations():
    math_set = load_prompts("math")
    assert len(math_set.records) >= 40 and not math_set.rejected and math_set.numeric
    assert all(r.answer_type == "number" and answer_value(r.answers[0]) is not None
               for r in math_set.records)
    long_form = load_prompts("long_form")
    assert len(long_form.records) >= 20 and not long_form.has_answers
    bad = parse_prompt_bytes(b'{"prompt": "x", "answer": "1", "answer_type": "date"}\n'
                             b'{"prompt": "y", "answer": "2"}\n', "s.jsonl")
    assert bad.rejected[0][0] == 1 and "answer_type" in bad.rejected[0][1]
    assert bad.with_answer_type("number").numeric


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_free_run_columns_are_those_of_both_models_own_greedy_texts(family):
    dense = make_tiny(family)
    pair = make_pair(dense, Recipe.single("int3:g32"))
    ids = random_prompts(6, seed=3)
    n = 40
    res = divergence(pair, prompt_ids=ids, new_tokens=n, free_run=True, batch_size=4)
    eos = eos_ids(dense)
    for i, p in enumerate(ids):
        gd = hf_greedy(dense.model, p, n, eos)
        gc = hf_greedy(pair.compressed, p, n, eos)
        row = res.table.iloc[i]
        want = free_run_row(gd, gc, eos)
        assert row.len_dense == want["len_dense"] == len(generated(gd, eos))
        assert row.len_compressed == want["len_compressed"]
        assert row.edit_sim == pytest.approx(want["edit_sim"])
        assert bool(row.loop_compressed) == ends_in_loop(generated(gc, eos))
        assert (math.isnan(row.rejoin_pos) and math.isnan(want["rejoin_pos"])) or \
            row.rejoin_pos == want["rejoin_pos"]
    s = res.summary
    assert s["len_ratio_mean"] == pytest.approx(res.table.len_ratio.mean())
    assert s["loop_rate_compressed"] == pytest.approx(res.table.loop_compressed.mean())
    assert 0.0 <= s["rejoin_share"] <= 1.0
    assert res.table.edit_sim.lt(1).any(), "int3 should change some text"


def test_numeric_sets_score_final_answers_on_the_default_model(default_model, tmp_path):
    """On the real model: the math set's final answers, accuracy from them, the free-run
    summaries, and the CLI's flags."""
    import dtm_core.cli as cli

    items = load_prompts("math").records[:4]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"question": r.prompt, "answer": r.answers[0]})
                              for r in items), encoding="utf-8")
    pset = load_prompts(str(path)).with_answer_type("number")
    pair = make_pair(default_model, Recipe.single("int4:g128"))
    res = evaluate(pair, pset, 48, chat=True, free_run=True)
    t = res.table
    for _, row in t.iterrows():
        assert row.answer_dense == final_answer(row.dense_text)
        assert row.answer_compressed == final_answer(row.compressed_text)
        assert row.answer_match == answers_equal(row.answer_dense, row.answer_compressed)
        rec = items[int(row.prompt_index)]
        assert row.correct_dense == float(answers_equal(row.answer_dense, rec.answers[0]))
    assert res.summary["accuracy_dense"] == pytest.approx(t.correct_dense.mean())
    assert res.summary["answer_agreement"] == pytest.approx(t.answer_match.mean())
    assert {"loop_rate_dense", "len_ratio_median", "rejoin_share"} <= set(res.summary)
    assert res.config["free_run"] is True
    out = tmp_path / "ev.csv"
    assert cli.main(["evaluate", "--model", "default", "--compress", "int4:g128", "--prompts",
                     str(path), "--answer-type", "number", "--free-run", "--chat",
                     "--new-tokens", "48", "--out", str(out), "--worst", "0"]) == 0
    back = pd.read_csv(out, keep_default_na=False)
    assert list(back.answer_dense.astype(str)) == list(t.answer_dense.astype(str))
    assert {"len_ratio", "loop_compressed", "rejoin_pos", "edit_sim"} <= set(back.columns)


@pytest.mark.parametrize("family,intactkv", [("llama", None), ("gemma2", None), ("llama", 3),
                                             ("opt", 1000)])
def test_teacher_forced_passes_hold_a_chunk_of_positions_with_the_same_numbers(
        family, intactkv, monkeypatch):
    """Long N: the head runs a few positions at a time (never N x V logits per model), and every
    number is the one-chunk pass's, IntactKV's pivots (some longer than the prompt) included."""
    import dtm_core.measure.divergence as div
    from test_families import FAMILIES, make

    dense = make(family) if family in FAMILIES else make_tiny(family)
    pair = make_pair(dense, Recipe.single("int3:g32"))
    ids = random_prompts(5, seed=7)
    whole = divergence(pair, prompt_ids=ids, new_tokens=30, intactkv=intactkv, batch_size=3)
    seen = []
    real = div.head_logits
    monkeypatch.setattr(div, "head_logits", lambda m, h: seen.append(len(h)) or real(m, h))
    monkeypatch.setattr(div, "POSITION_CHUNK", 4)
    cut = divergence(pair, prompt_ids=ids, new_tokens=30, intactkv=intactkv, batch_size=3,
                     references=whole.references)
    assert max(seen) == 4 and len(seen) > 2 * len(ids) * 30 // 4
    num = [c for c in whole.table.columns if whole.table[c].dtype.kind in "fiub"]
    assert (cut.table.fdt == whole.table.fdt).all()
    pd.testing.assert_frame_equal(cut.table[num], whole.table[num], rtol=1e-5, atol=1e-7)


QWEN3_TAIL = ("{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
              "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
              "{%- if enable_thinking is defined and enable_thinking is false %}"
              "<think>\n\n</think>\n\n{%- endif %}{%- endif %}")


def test_thinking_switch_and_thinking_lengths(default_model):
    """--thinking reaches templates that take enable_thinking (Qwen3's own rule: off closes an
    empty span in the prompt); lengths split at </think>, the span open or closed by the prompt."""
    import copy

    from dtm_core.models.generation import encode_prompts, takes_thinking, think_ids
    from dtm_core.measure.freerun import thinking_length

    tok = copy.deepcopy(default_model.tokenizer)
    assert think_ids(tok) is None and not takes_thinking(tok)
    # the plain template ignores the switch
    assert encode_prompts(tok, ["Hi"], chat=True, thinking=False) == \
        encode_prompts(tok, ["Hi"], chat=True)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.chat_template = QWEN3_TAIL
    assert takes_thinking(tok)
    start, end = think_ids(tok)
    on = encode_prompts(tok, ["Hi"], chat=True, thinking=True)[0]
    off = encode_prompts(tok, ["Hi"], chat=True, thinking=False)[0]
    assert end not in on and off[:len(on)] == on and off[len(on)] == start and end in off
    # the model opens and closes its own span; the prompt closed it; never closed
    assert thinking_length(on, [start, 5, 6, end, 7, 8], (start, end)) == 4
    assert thinking_length(off, [7, 8, 9], (start, end)) == 0
    assert thinking_length(on + [start], [5, 6, 7], (start, end)) == 3
    assert thinking_length(on, [7, start, 5, end, 9], (start, end)) == 3
    row = free_run_row([start, 5, end, 7, 2], [start, 5, 6, 6, 6], {2}, (on, (start, end)))
    assert (row["len_thinking_dense"], row["len_answer_dense"]) == (3, 1)
    assert (row["len_thinking_compressed"], row["len_answer_compressed"]) == (5, 0)


def test_the_stream_passes_the_thinking_switch_to_the_template(default_model):
    """Compare's stream encodes its prompt with the thinking switch (a template whose switch
    adds in-vocabulary text, so both settings run on the real model)."""
    import copy

    from dtm_core.measure.streaming import stream_pair
    from dtm_core.models.generation import encode_prompts

    tok = copy.deepcopy(default_model.tokenizer)
    tok.chat_template = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "<|im_end|>\n{%- endfor %}<|im_start|>assistant\n"
                         "{%- if enable_thinking is defined and enable_thinking %}Let me think."
                         "{%- endif %}")
    import dataclasses

    pair = make_pair(dataclasses.replace(default_model, tokenizer=tok), Recipe.single("int8"))
    got = {}
    for on in (True, False):
        last = list(stream_pair(pair, "Hi", 3, chat=True, thinking=on))[-1]
        got[on] = last.prompt_ids
        assert got[on] == encode_prompts(tok, ["Hi"], chat=True, thinking=on)[0]
    assert tok.decode(got[True]).endswith("Let me think.") and \
        not tok.decode(got[False]).endswith("Let me think.")
