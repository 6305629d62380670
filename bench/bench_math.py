"""Long generations on the built-in `math` set (issue 27's closing figures): per spec, accuracy of
both models on the numeric final answers, flips and McNemar, loop rates, length ratios, final-answer
agreement and rejoins, with one prompt where the compressed model derails after its FDT, quoted.

    .venv/bin/python bench/bench_math.py [--new-tokens 512] [--specs int8,int4:g128,int3:g64]

The dense references (chat template, greedy, to EOS or N) are generated once and shared by every
spec; each spec then runs `divergence(..., free_run=True)` (the same engine as `evaluate
--free-run --answer-type number`) and scores both texts with the numeric rule.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtm_core.compression.pair import make_pair  # noqa: E402
from dtm_core.compression.recipe import Recipe  # noqa: E402
from dtm_core.measure.divergence import divergence, reference_continuations  # noqa: E402
from dtm_core.measure.evaluate import flips, mcnemar_exact  # noqa: E402
from dtm_core.measure.freerun import answers_equal, final_answer, numeric_correct  # noqa: E402
from dtm_core.measure.prompts import load_prompts  # noqa: E402
from dtm_core.models.generation import encode_prompts  # noqa: E402
from dtm_core.models.load import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--specs", default="int8,int4:g128,int3:g64")
    ap.add_argument("--prompts", type=int, default=0, help="the first K items (0: all)")
    args = ap.parse_args()
    dense = load_model("default")
    recs = load_prompts("math").records
    recs = recs[:args.prompts] if args.prompts else recs
    ids = encode_prompts(dense.tokenizer, [r.text() for r in recs], chat=True)
    t = time.perf_counter()
    refs = reference_continuations(dense, ids, args.new_tokens)
    print(f"dense references: {len(refs)} prompts, N = {args.new_tokens}, "
          f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
    print("| spec | accuracy dense | accuracy compressed | flips c->w / w->c | McNemar p | "
          "loop rate dense | loop rate compressed | len ratio mean / median | answers agree | "
          "rejoin share | mean FDT |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    quotes = []
    for spec in [s for s in args.specs.split(",") if s]:
        pair = make_pair(dense, Recipe.single(spec))
        res = divergence(pair, prompt_ids=ids, new_tokens=args.new_tokens, references=refs,
                         free_run=True)
        t_ = res.table
        cd = [numeric_correct(x, r.answers) for x, r in zip(t_.dense_text, recs)]
        cc = [numeric_correct(x, r.answers) for x, r in zip(t_.compressed_text, recs)]
        agree = [answers_equal(final_answer(a), final_answer(b))
                 for a, b in zip(t_.dense_text, t_.compressed_text)]
        lost, won = flips(cd, cc)
        s = res.summary
        print(f"| {spec} | {sum(cd) / len(cd):.1%} | {sum(cc) / len(cc):.1%} | {lost} / {won} | "
              f"{mcnemar_exact(lost, won):.3g} | {s['loop_rate_dense']:.1%} | "
              f"{s['loop_rate_compressed']:.1%} | {s['len_ratio_mean']:.2f} / "
              f"{s['len_ratio_median']:.2f} | {sum(agree) / len(agree):.1%} | "
              f"{s['rejoin_share']:.1%} | {s['fdt_mean']:.1f} |", flush=True)
        # the derail: a prompt whose compressed text loops (or is least similar) after its FDT
        order = t_.assign(k=(~t_.loop_compressed.astype(bool)).astype(int)).sort_values(
            ["k", "edit_sim"])
        i = int(order.index[0])
        f = int(t_.fdt[i])
        tok = dense.tokenizer
        dense_ids = refs[i]
        quotes.append(
            f"\n### {spec}, prompt {i + 1}: FDT {f}, edit similarity {t_.edit_sim[i]:.0%}, "
            f"lengths {t_.len_dense[i]} / {t_.len_compressed[i]}, loop "
            f"{bool(t_.loop_compressed[i])}\n> {recs[i].prompt}\n\nshared start: "
            f"{tok.decode(dense_ids[:f])!r}\n\ndense goes on: "
            f"{tok.decode(dense_ids[f:f + 80])!r}\n\ncompressed goes on: "
            f"{t_.compressed_text[i][len(tok.decode(dense_ids[:f])):][:400]!r}")
    print("\n".join(quotes))


if __name__ == "__main__":
    main()
