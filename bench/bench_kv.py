"""KV-cache quantization on the default model (issue 26): FDT, KL and top-1 agreement of kv:int8,
kv:fp8, kv:int4 and kv:int2 on every layer's cache; a sweep over every layer's keys and values
(which caches break the model first); and a KV sweep cell's time against a weight sweep cell's
(int4:g128 cells of the same layers), measured in this run, each cell from its layer's recorded
inputs onward.

    python bench/bench_kv.py [--prompts 16] [--new-tokens 16]
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
    for spec in ("kv:int8", "kv:fp8", "kv:int4", "kv:int2"):
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
        layers = f"0-{min(5, len(kv.table) // 2 - 1)}"
        w = sweep(dense, "int4:g128", ids, n, cache_dir=d, layers=layers, kinds="q,k,v,o")
        kv_cells = kv.table[kv.table.layer <= int(layers.split("-")[1])]
        a, b = kv_cells.seconds.mean(), w.table.seconds.mean()
        print(f"\nseconds per cell, layers {layers}: kv:int4 {a:.3f}, int4:g128 (q,k,v,o) {b:.3f}, "
              f"ratio kv / weight {a / b:.2f}")


if __name__ == "__main__":
    main()
