"""KV-cache quantization on the default model (issue 26): FDT, KL and top-1 agreement of kv:int8,
kv:fp8, kv:int4 and kv:int2 on every layer's cache; a sweep over every layer's keys and values
(which caches break the model first); and a KV sweep cell's time against a weight sweep cell's
(int4:g128 cells of the same layers), measured in this run, each cell from its layer's recorded
inputs onward.

    python bench/bench_kv.py [--prompts 16] [--new-tokens 16] [--cost-only]

``--cost-only`` skips the pairs and prints the sweep and the cell-time ratio (run it on a quiet
machine: other work on the cores distorts the ratio).
"""
from __future__ import annotations

import argparse
import tempfile

from dtm_core.analysis.sweep import sweep
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.measure.prompts import load_prompts
from dtm_core.models.generation import encode_prompts
from dtm_core.models.load import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--cost-only", action="store_true", help="only the sweep and the cell times")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the cell-time comparison")
    args = ap.parse_args()
    dense = load_model("default")
    ids = encode_prompts(dense.tokenizer, load_prompts("general").prompts[:args.prompts])
    n = args.new_tokens
    print(f"## default model, {len(ids)} 'general' prompts, N={n}, every layer's cache\n")
    print("| spec | mean FDT | mean KL | top-1 agreement | chat template: FDT | KL | "
          "with IntactKV (system prefix): FDT | KL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    chat = encode_prompts(dense.tokenizer, load_prompts("general").prompts[:args.prompts],
                          chat=True)
    for spec in () if args.cost_only else ("kv:int8", "kv:fp8", "kv:int4", "kv:int2"):
        pair = make_pair(dense, Recipe.single(spec, "*"))
        s = divergence(pair, prompt_ids=ids, new_tokens=n).summary
        p = divergence(pair, prompt_ids=chat, new_tokens=n).summary
        c = divergence(pair, prompt_ids=chat, new_tokens=n, intactkv="prefix").summary
        print(f"| {spec} | {s['fdt_mean']:.2f} | {s['kl_mean']:.4f} | {s['top1_agree_mean']:.3f} "
              f"| {p['fdt_mean']:.2f} | {p['kl_mean']:.4f} | {c['fdt_mean']:.2f} "
              f"| {c['kl_mean']:.4f} |")
    with tempfile.TemporaryDirectory() as d:
        kv = sweep(dense, "kv:int4", ids, n, cache_dir=d)
        t = kv.table.sort_values("fdt_mean")
        print("\n## kv:int4, one cache at a time: the 8 most damaging caches\n")
        print(t[["component", "fdt_mean", "kl_mean"]].head(8).to_string(index=False))
        keys = kv.table[kv.table.kind == "kcache"]["kl_mean"].sum()
        vals = kv.table[kv.table.kind == "vcache"]["kl_mean"].sum()
        print(f"\nsum of cell KL: keys {keys:.4f}, values {vals:.4f}")
    # cell cost: the two sweeps over the same layers, alternating which runs first (the first
    # cells of a run pay warm-up), each round in fresh stores; the median of the rounds' ratios
    layers = f"0-{min(5, len(kv.table) // 2 - 1)}"
    ratios = []
    for r in range(args.rounds):
        secs = {}
        pairs = [("kv:int4", "kcache,vcache"), ("int4:g128", "q,k,v,o")]
        for spec, kinds in pairs if r % 2 == 0 else pairs[::-1]:
            with tempfile.TemporaryDirectory() as d:
                res = sweep(dense, spec, ids, n, cache_dir=d, layers=layers, kinds=kinds)
            secs[spec] = res.table.seconds.mean()
        ratios.append(secs["kv:int4"] / secs["int4:g128"])
        print(f"round {r + 1}: seconds per cell, layers {layers}: kv:int4 {secs['kv:int4']:.3f}, "
              f"int4:g128 (q,k,v,o) {secs['int4:g128']:.3f}, ratio {ratios[-1]:.2f}")
    print(f"\nratio kv / weight cell (median of {len(ratios)} rounds): "
          f"{sorted(ratios)[len(ratios) // 2]:.2f}")


if __name__ == "__main__":
    main()
