"""A compressed-tensors checkpoint of the default model against the default model (issue: real
compressed checkpoints). Writes a W4A16 g64 (symmetric, min/max scales) checkpoint of the default
model with compressed-tensors' own lifecycle, loads it as the compressed side, and prints:

- what the checkpoint is (format, scheme, kept, size against the base);
- the whole checkpoint's FDT / SDT / KL on a prompt set;
- the from:PATH sweep (every component alone from the checkpoint, 210 cells), its five most
  damaging components with their weight errors, and the sum over cells against the whole;
- the wall time of the from:PATH sweep against an int4:g64 sweep of the same cells (fresh cell
  stores), measured in this run.

    .venv/bin/python bench/bench_checkpoint.py [--prompts 16] [--new-tokens 32] [--set general]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import checkpoint_writers as W  # noqa: E402

from dtm_core.models.checkpoints import inspect  # noqa: E402
from dtm_core.measure.divergence import divergence  # noqa: E402
from dtm_core.models.generation import encode_prompts  # noqa: E402
from dtm_core.jobs import PairRequest, build_pair, sweep_variants  # noqa: E402
from dtm_core.models.load import load_model  # noqa: E402
from dtm_core.measure.prompts import load_prompts  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--set", default="general")
    ap.add_argument("--scheme", default="W4A16")
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        base = W.default_model_folder(root / "base")
        t = time.perf_counter()
        ckpt = W.write_ct(base, root / "smollm2-ct", args.scheme, group_size=args.group)
        print(f"wrote {ckpt.name} in {time.perf_counter() - t:.1f} s")
        print(inspect(str(ckpt), base="default").text())
        dense = load_model("default")
        ids = encode_prompts(dense.tokenizer, load_prompts(args.set).prompts[:args.prompts])
        N = args.new_tokens
        pair = build_pair(dense, PairRequest(compressed_model=str(ckpt)))
        whole = divergence(pair, prompt_ids=ids, new_tokens=N)
        print(f"whole checkpoint on {len(ids)} '{args.set}' prompts x {N} tokens: mean FDT "
              f"{whole.table.fdt.mean():.2f}, median FDT {whole.table.fdt.median():.1f}, mean SDT "
              f"{whole.table.sdt.mean():.1%}, mean KL {whole.table.kl_mean.mean():.4f}")
        times = {}
        for spec in (f"from:{ckpt}", f"int4:g{args.group}"):
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                res = sweep_variants(dense, spec, ids, N, cache_dir=d,
                                     whole=spec.startswith("from:")).main
                times[spec] = time.perf_counter() - t
            print(f"{spec.split('/')[-1]:<22} {len(res.table)} cells in {times[spec]:7.1f} s")
            if spec.startswith("from:"):
                worst = res.table.sort_values(["fdt_mean", "kl_mean"], ascending=[True, False])
                print(worst[["component", "fdt_mean", "sdt_mean", "kl_mean", "weight_error"]]
                      .head(5).to_string(index=False))
                print(res.additivity_line())
                print(f"weight error over all cells: median {res.table.weight_error.median():.4f},"
                      f" correlation with mean KL "
                      f"{res.table.weight_error.corr(res.table.kl_mean, method='spearman'):.2f} "
                      "(Spearman)")
        ratio = times[f"from:{ckpt}"] / times[f"int4:g{args.group}"]
        print(f"RATIO from: sweep / int4 sweep = {ratio:.2f}")


if __name__ == "__main__":
    main()
