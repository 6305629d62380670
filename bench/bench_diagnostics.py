"""The cost of the acceptance metrics and the diagnostics (issue 29) against a plain run.

A divergence run (teacher-forced passes and every registered metric) with and without the
metrics issue 29 added (accept, topk, reverse_kl, js), and a sweep's cells with and without them
and the cells' output error (SQNR, cosine); the same pair, prompts and references, alternated and
best of several runs so both sides see the same machine load. Target: within 10 %.

    .venv/bin/python bench/bench_diagnostics.py [--prompts 16] [--new-tokens 32] [--repeats 3]
"""
import argparse
import contextlib
import tempfile
import time

from dtm_core.analysis.sweep import prepare, run as sweep_run
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.measure import metrics
from dtm_core.measure.divergence import divergence, reference_continuations
from dtm_core.measure.prompts import load_prompts
from dtm_core.models.generation import encode_prompts
from dtm_core.models.load import load_model

ADDED = ("accept", "topk", "reverse_kl", "js")


@contextlib.contextmanager
def without_added():
    """The registry as it was before issue 29, and no output error in the cells."""
    saved = {n: metrics.METRICS.pop(n) for n in ADDED if n in metrics.METRICS}

    @contextlib.contextmanager
    def nothing(*a, **k):
        yield None

    orig = sweep_run.measuring
    sweep_run.measuring = nothing
    try:
        yield
    finally:
        metrics.METRICS.update(saved)
        sweep_run.measuring = orig


def best(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dense = load_model("default")
    ids = encode_prompts(dense.tokenizer, load_prompts("general").prompts[:args.prompts])
    refs = reference_continuations(dense, ids, args.new_tokens)
    pair = make_pair(dense, Recipe.single("int4:g128"))
    n = args.new_tokens

    def run_divergence():
        divergence(pair, prompt_ids=ids, references=refs, new_tokens=n)

    def run_cells():
        ctx = prepare(dense, ids, n, references=refs)
        with tempfile.TemporaryDirectory() as cache:      # every cell computed afresh
            sweep_run.sweep(dense, "int4:g128", ids, n, layers="10", kinds="q,down", ctx=ctx,
                            cache_dir=cache)

    print(f"default model, int4:g128, {len(ids)} 'general' prompts, N={n}, best of "
          f"{args.repeats} (alternated):")
    for name, fn in (("divergence (every prompt, both passes)", run_divergence),
                     ("sweep: prepare + 2 cells (10.q, 10.down)", run_cells)):
        fn()                                     # warm up both code paths
        with without_added():
            fn()
        with_all, plain = [], []
        for _ in range(args.repeats):
            with_all.append(best(fn, 1))
            with without_added():
                plain.append(best(fn, 1))
        a, b = min(with_all), min(plain)
        print(f"  {name}: {a:.2f} s with the new metrics, {b:.2f} s without: "
              f"{a / b - 1:+.1%}")


if __name__ == "__main__":
    main()
