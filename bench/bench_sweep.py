"""Sensitivity sweep cost (issue: Sensitivity heatmaps).

Prints sweep time / (cells x one full teacher-forced forward of the set) and the wall time of a full
sweep of every component of the default model, measured in this run (a fresh cache folder, so every
cell is computed).

    .venv/bin/python bench/bench_sweep.py [--prompts 16] [--new-tokens 32] [--spec int4:g128]
"""
import argparse
import statistics
import tempfile
import time


from dtm_core.measure.divergence import pad_id_of  # noqa: E402
from dtm_core.models.generation import encode_prompts, teacher_forced_logits  # noqa: E402
from dtm_core.models.load import load_model  # noqa: E402
from dtm_core.measure.prompts import load_prompts  # noqa: E402
from dtm_core.analysis.sweep import prepare, sweep  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--spec", default="int4:g128")
    ap.add_argument("--layers", default=None)
    args = ap.parse_args()
    dense = load_model("default")
    ids = encode_prompts(dense.tokenizer, load_prompts("general").prompts[:args.prompts])
    t = time.perf_counter()
    ctx = prepare(dense, ids, args.new_tokens)
    t_prep = time.perf_counter() - t
    full = [p + r for p, r in zip(ctx.prompt_ids, ctx.references)]
    pad = pad_id_of(dense.tokenizer)

    def one_forward():
        t0 = time.perf_counter()
        for idx in ctx.batches:
            teacher_forced_logits(dense.model, [full[i] for i in idx], pad)
        return time.perf_counter() - t0

    one_forward()
    # the machine is shared and noisy: time the forward before and after the sweep
    fwd = [one_forward() for _ in range(3)]
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        res = sweep(dense, args.spec, ids, args.new_tokens, cache_dir=cache, ctx=ctx,
                    layers=args.layers)
        t_sweep = time.perf_counter() - t
        fwd += [one_forward() for _ in range(3)]
        t = time.perf_counter()
        again = sweep(dense, args.spec, ids, args.new_tokens, cache_dir=cache, layers=args.layers)
        t_again = time.perf_counter() - t
    cells = len(res.table)
    print(f"prompts={len(ids)} N={args.new_tokens} spec={args.spec} cells={cells}")
    print(f"dense preparation (references + recorded layer inputs): {t_prep:.1f} s")
    t_fwd = statistics.median(fwd)
    print(f"one full teacher-forced forward of the set: median {t_fwd:.3f} s of 6 (3 before, 3 "
          f"after the sweep; min {min(fwd):.3f}, max {max(fwd):.3f})")
    print(f"sweep: {t_sweep:.1f} s ({t_sweep / cells:.3f} s per cell); reopening it: "
          f"{t_again:.2f} s ({again.reused} cells reused)")
    print(f"RATIO sweep / (cells x full forward) = {t_sweep / (cells * t_fwd):.3f}  (target <= 0.65;"
          f" {t_sweep / (cells * min(fwd)):.3f} against the fastest forward)")
    print(f"full sweep wall time incl. preparation = {t_sweep + t_prep:.1f} s  (target <= 180 s)")


if __name__ == "__main__":
    main()
