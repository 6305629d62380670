"""Why it diverged, on the default model (issue: logit lens and component patching). With int4:g64
on every component:

- three prompts explained at their first divergent token: the lens' flip layer and the five
  components that carry the divergence;
- the cost of one full patching map (210 components, forward direction) against a one-prompt
  sweep of the same 210 cells (fresh cell store), measured in this run: the RATIO line;
- over a prompt set, how often each component ranks first, set against the sweep's heatmap of
  the same spec (its most sensitive cells by mean KL and FDT).

    .venv/bin/python bench/bench_explain.py [--prompts 16] [--new-tokens 32] [--set general]
"""
import argparse
import tempfile
import time

from dtm_core.compression.recipe import Recipe
from dtm_core.analysis.explain import explain, explain_set
from dtm_core.models.generation import encode_prompts
from dtm_core.jobs import sweep_variants
from dtm_core.models.load import load_model
from dtm_core.compression.pair import make_pair
from dtm_core.measure.prompts import load_prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--set", default="general")
    ap.add_argument("--spec", default="int4:g64")
    args = ap.parse_args()
    N = args.new_tokens
    dense = load_model("default")
    pair = make_pair(dense, Recipe.single(args.spec, "*"))
    texts = load_prompts(args.set).prompts[:args.prompts]
    ids = encode_prompts(dense.tokenizer, texts)
    shown = 0
    for text, p in zip(texts, ids):
        if shown == 3:
            break
        try:
            t = time.perf_counter()
            e = explain(pair, p, N, reverse=False)
            took = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - a prompt that never diverges
            print(f"{text[:50]!r}: {exc}")
            continue
        shown += 1
        print(f"prompt {text[:60]!r}: {e.ranking()} Lens flip layer: {e.lens_flip_layer}. "
              f"({took:.1f} s)")
        if shown == 1:
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                sweep_variants(dense, args.spec, [p], N, cache_dir=d)
                one = time.perf_counter() - t
            print(f"RATIO patching map / one-prompt sweep = {took / one:.2f} "
                  f"({took:.1f} s / {one:.1f} s, 210 components)")
    t = time.perf_counter()
    table, found = explain_set(pair, ids, N)
    print(f"prompt set: {len(found)} of {len(ids)} prompts diverge; explained in "
          f"{time.perf_counter() - t:.0f} s")
    print(table.head(10).to_string(index=False))
    with tempfile.TemporaryDirectory() as d:
        res = sweep_variants(dense, args.spec, ids, N, cache_dir=d).main
    by_kl = res.table.sort_values("kl_mean", ascending=False).component.head(10).tolist()
    by_fdt = res.table.sort_values(["fdt_mean", "kl_mean"], ascending=[True, False]) \
        .component.head(10).tolist()
    firsts = table[table["first"] > 0].component.tolist()
    print(f"sweep's 10 most sensitive by mean KL: {by_kl}")
    print(f"sweep's 10 most sensitive by mean FDT: {by_fdt}")
    print(f"ranked first at least once: {firsts}")
    print(f"overlap of the top-10 by patching (mean restored share) with the sweep's top-10 by "
          f"KL: {len(set(table.sort_values('mean_restored_share', ascending=False).component.head(10)) & set(by_kl))}")
    merged = table.merge(res.table[["component", "kl_mean", "fdt_mean"]], on="component")
    print(f"Spearman(mean restored share, sweep KL) = "
          f"{merged.mean_restored_share.corr(merged.kl_mean, method='spearman'):.2f}")


if __name__ == "__main__":
    main()
