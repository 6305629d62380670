"""GPTQ, AWQ and SparseGPT sweeps against the RTN and magnitude sweeps of the same grid / sparsity
(issue: GPTQ, SparseGPT and AWQ). Prints each sweep's wall time on the default model (fresh cell
store, so every cell is computed; the Hessians of the calibration prompts are gathered once per
sweep) and the ratios, measured in this run.

    .venv/bin/python bench/bench_gptq.py [--layers 0-29] [--prompts 8] [--new-tokens 32]
"""
import argparse
import tempfile
import time

from dtm_core.models.generation import encode_prompts
from dtm_core.jobs import sweep_variants
from dtm_core.models.load import load_model
from dtm_core.measure.prompts import load_prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0-29")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    dense = load_model("default")
    ids = encode_prompts(dense.tokenizer, load_prompts("general").prompts[:args.prompts])
    times = {}
    for spec in ("int4:g128", "gptq:int4:g128", "awq:int4:g128", "magnitude:0.5", "sparsegpt:0.5"):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            res = sweep_variants(dense, spec, ids, args.new_tokens, layers=args.layers,
                                 cache_dir=d).main
            times[spec] = time.perf_counter() - t
        print(f"{spec:<16} {len(res.table)} cells in {times[spec]:7.1f} s "
              f"({times[spec] / len(res.table):.2f} s per cell), mean FDT over cells "
              f"{res.table.fdt_mean.mean():.2f}")
    print(f"RATIO gptq sweep / rtn sweep = {times['gptq:int4:g128'] / times['int4:g128']:.2f}"
          "  (target <= 2)")
    print(f"RATIO awq sweep / rtn sweep = {times['awq:int4:g128'] / times['int4:g128']:.2f}"
          "  (target <= 2)")
    print(f"RATIO sparsegpt sweep / magnitude sweep = "
          f"{times['sparsegpt:0.5'] / times['magnitude:0.5']:.2f}  (target <= 2)")


if __name__ == "__main__":
    main()
