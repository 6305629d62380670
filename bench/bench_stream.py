"""Side-by-side streaming latency versus plain generate (issue: Compare view).

Per-token latency of the lockstep stream (both models, KV cached, the compressed model's free and
teacher-forced rows) against the sum of the two models' per-token latency in plain
``model.generate``; and the time from the request to the first streamed tokens on a loaded pair,
including the page's HTML rendering.

    .venv/bin/python bench/bench_stream.py [--new-tokens 64] [--spec int8]
"""
import argparse
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from dtm_core.compression.recipe import Recipe  # noqa: E402
from dtm_core.models.generation import encode_prompts  # noqa: E402
from dtm_core.models.load import load_model  # noqa: E402
from dtm_core.compression.pair import make_pair  # noqa: E402
from dtm_core.measure.streaming import stream_pair  # noqa: E402


def plain_generate(model, ids, n):
    x = torch.tensor([ids], device=model.device)
    t = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=2)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--spec", default="int8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.new_tokens
    dense = load_model("default")
    pair = make_pair(dense, Recipe.single(args.spec))
    prompt = "Once upon a time, in a small village,"
    ids = encode_prompts(dense.tokenizer, [prompt])[0]
    plain_generate(dense.model, ids, 4)  # warm up
    gd = min(plain_generate(dense.model, ids, n) for _ in range(args.repeats))
    gc = min(plain_generate(pair.compressed, ids, n) for _ in range(args.repeats))
    best, first = float("inf"), float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        steps = 0
        for k, st in enumerate(stream_pair(pair, None, n, prompt_ids=ids)):
            if k == 0:
                first = min(first, time.perf_counter() - t)
            steps = len(st.steps)
        best = min(best, (time.perf_counter() - t) / steps)
    # first update as the page sees it: the app's handler on a loaded pair
    from dtm_core.jobs import PairCache
    from ui import common
    from ui.compare import compare
    common.CACHE = PairCache()
    common.CACHE.pair("default", compress=args.spec)

    class Req:
        session_hash = "bench"

    t = time.perf_counter()
    page_first = None
    for out in compare("default", args.spec, "", "*.*", "", prompt, False, n, request=Req()):
        if out[0]:
            page_first = time.perf_counter() - t
            break
    per_plain = gd / n + gc / n
    print(f"device={dense.device} N={n} spec={args.spec} steps={steps}")
    print(f"plain generate per token: dense {1000 * gd / n:.1f} ms, compressed "
          f"{1000 * gc / n:.1f} ms, sum {1000 * per_plain:.1f} ms")
    print(f"side-by-side stream per token: {1000 * best:.1f} ms")
    print(f"RATIO stream / (dense + compressed generate) per token = {best / per_plain:.2f}"
          "  (target <= 1.3)")
    print(f"first streamed step after the request: engine {1000 * first:.0f} ms, page handler "
          f"{1000 * page_first:.0f} ms  (target <= 1000 ms)")


if __name__ == "__main__":
    main()
