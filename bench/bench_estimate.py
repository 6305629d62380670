"""Estimated sweep cells against exact ones (issue 30): cost in forward-equivalents of the prompt
set, the time of an estimated heatmap against the exact sweep, Spearman's rank correlation of
estimate and exact (KL and FDT) per spec on the default model and on two tiny random-weight
families, the probes side by side, and the cells where estimate and exact disagree most.

    python bench/bench_estimate.py                      # 8 'general' prompts, N = 16, all cells
    python bench/bench_estimate.py --prompts 16 --new-tokens 32 --specs int4:g64
    python bench/bench_estimate.py --tiny               # the tiny families only, experts views too

Exact cells are stored (``--cache-dir``), so a second run only times the estimates.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dtm_core.analysis.sweep import select_components, sweep  # noqa: E402
from dtm_core.analysis.sweep.estimate import (estimate_rows, estimate_sweep,  # noqa: E402
                                              fdt_curve, fisher_diagonal, spearman)
from dtm_core.compression.recipe import parse_spec  # noqa: E402
from dtm_core.measure.divergence import reference_continuations  # noqa: E402
from dtm_core.measure.prompts import load_prompts  # noqa: E402
from dtm_core.models.generation import (encode_prompts, pad_id_of, plan_batches,  # noqa: E402
                                        teacher_forced, vocab_size)
from dtm_core.models.load import load_model  # noqa: E402


def forward_seconds(dense, ids, refs, batch_size, reps=3) -> float:
    """Best time of one dense teacher-forced pass over prompt + reference sequences, batched as
    the Fisher pass batches them."""
    full = [p + r for p, r in zip(ids, refs)]
    batches = plan_batches([len(s) for s in full], vocab_size(dense.model), batch_size)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        with torch.no_grad():
            for idx in batches:
                teacher_forced(dense.model, [full[i] for i in idx], pad_id_of(dense.tokenizer))
        best = min(best, time.perf_counter() - t)
    return best


def cost(dense, ids, n, spec, batch_size, kinds) -> None:
    refs = reference_continuations(dense, ids, n, batch_size)
    comps = select_components(dense.model, None, kinds)
    fwd = forward_seconds(dense, ids, refs, batch_size)
    t = time.perf_counter()
    f = fisher_diagonal(dense, ids, refs, comps, batch_size=batch_size)
    fis = time.perf_counter() - t
    t = time.perf_counter()
    estimate_rows(dense, f, parse_spec(spec), comps)
    cells = time.perf_counter() - t
    print(f"\n### cost on {dense.source}, {len(ids)} prompts, N={n}, {len(comps)} cells of {spec}\n")
    print("| part | s | forward-equivalents |\n| --- | --- | --- |")
    print(f"| dense forward of the prompt set | {fwd:.2f} | 1.00 |")
    print(f"| Fisher (forward + backward a batch) | {fis:.2f} | {fis / fwd:.2f} |")
    print(f"| every cell's estimate ({len(comps)} specs applied + weighted sums) | {cells:.2f} | "
          f"{cells / fwd:.2f} |")
    print(f"| **whole estimated heatmap** | {fis + cells:.2f} | **{(fis + cells) / fwd:.2f}** |")


def agreement(dense, ids, n, spec, cache, kinds, probes=("gauss",)) -> None:
    t = time.perf_counter()
    ex = sweep(dense, spec, ids, n, cache_dir=cache, kinds=kinds)
    t_exact = time.perf_counter() - t if ex.computed else sum(ex.table.seconds)
    for probe in probes:
        est = estimate_sweep(dense, spec, ids, n, cache_dir=cache, kinds=kinds, probe=probe)
        a = est.agreement()
        ceiling = spearman(ex.table.kl_mean, -ex.table.fdt_mean)
        print(f"| {dense.source} | {spec} | {probe} | {a['cells']} | {a['spearman_kl']:.3f} | "
              f"{a['spearman_fdt']:.3f} | {ceiling:.3f} | {est.seconds:.1f} | {t_exact:.1f} | "
              f"{t_exact / est.seconds:.0f}x |")
    tab = est.table.copy()
    tab["rank_estimate"] = tab.kl_estimate.rank(ascending=False)
    tab["rank_exact"] = tab.kl_mean.rank(ascending=False)
    tab["off"] = (tab.rank_estimate - tab.rank_exact).abs()
    worst = tab.sort_values("off", ascending=False).head(5)
    lines = ", ".join(f"{r.component} (estimate rank {r.rank_estimate:.0f}, exact "
                      f"{r.rank_exact:.0f})" for r in worst.itertuples())
    DISAGREE.append(f"- {dense.source} {spec}: {lines}")
    if dense.source == "default" and spec == SPECS_FIT:
        print(f"<!-- FDT curve fitted on the exact cells: {fdt_curve(ex.table, n)} -->")


DISAGREE: list[str] = []
EXPERTS = "e*.gate,e*.up,e*.down"
SPECS_FIT = "int4:g64"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--specs", default="int4:g64,int3:g64,magnitude:0.5,kv:int4")
    ap.add_argument("--kinds", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "dtm-bench-estimate"))
    ap.add_argument("--tiny", action="store_true", help="only the tiny families (seconds)")
    args = ap.parse_args()
    specs = [s for s in args.specs.split(",") if s]
    print("| model | spec | probe | cells | Spearman KL | Spearman FDT | exact KL vs FDT | "
          "estimate s | exact sweep s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    from conftest import make_tiny, random_prompts

    for fam in ("llama", "opt"):
        tiny = make_tiny(fam, scale=8.0)
        tiny.source = f"tiny-{fam}"
        for spec in ("int3:g32", "int4:g32", "magnitude:0.5"):
            agreement(tiny, random_prompts(10, seed=1), 12, spec, args.cache_dir, None)
    # an experts view: every expert's matrices one cell each, on two tiny mixture-of-experts
    # families (the cost in forward-equivalents printed for the first)
    from test_families import make

    for k, fam in enumerate(("qwen3_moe", "mixtral")):
        moe = make(fam)
        moe.source = f"tiny-{fam} experts"
        for spec in ("int3:g32", "int4:g32", "magnitude:0.5"):
            agreement(moe, random_prompts(10, seed=1), 12, spec, args.cache_dir, EXPERTS)
        if k == 0:
            cost(moe, random_prompts(10, seed=1), 12, "int3:g32", args.batch_size, EXPERTS)
    if not args.tiny:
        dense = load_model("default")
        ids = encode_prompts(dense.tokenizer, load_prompts("general").prompts[:args.prompts])
        for k, spec in enumerate(specs):
            agreement(dense, ids, args.new_tokens, spec, args.cache_dir, args.kinds,
                      probes=("gauss", "sample", "argmax") if k == 0 else ("gauss",))
        cost(dense, ids, args.new_tokens, specs[0], args.batch_size, args.kinds)
    print("\ncells where estimate and exact disagree most (KL ranks, 1 = most sensitive):")
    print("\n".join(DISAGREE))


if __name__ == "__main__":
    main()
