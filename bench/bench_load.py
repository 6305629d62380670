"""Bounded load test: concurrent gradio_client sessions against the app on 127.0.0.1.

Each client repeatedly asks the Compare endpoint for its own prompt and checks the final FDT and the
dense text against the engine's answer for that prompt (so results from another session would be
caught). A separate thread measures how long the page itself takes to load meanwhile.

    .venv/bin/python bench/bench_load.py [--clients 8] [--seconds 60] [--new-tokens 8]
"""
from __future__ import annotations

import argparse
import html
import os
import re
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

PROMPTS = ["The capital of France is", "Once upon a time", "Water boils at", "The quick brown fox",
           "Machine learning is", "The largest planet is", "My favourite food is", "In 1492,",
           "The three primary colors are", "To be or not to be,"]


def expected_results(prompts, n, spec):
    from dtm_core.compression.recipe import Recipe
    from dtm_core.measure.divergence import divergence
    from dtm_core.models.load import load_model
    from dtm_core.compression.pair import make_pair

    dense = load_model("default")
    res = divergence(make_pair(dense, Recipe.single(spec)), prompts, n)
    return {p: (int(f), t) for p, f, t in zip(prompts, res.table.fdt, res.table.dense_text)}


def column_text(fragment: str) -> str:
    """The text of a token column (the ⏎ marks shown before newlines are not part of it)."""
    fragment = fragment.replace('<span class="nl">⏎</span>', "")
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def run_load(url: str, clients: int, seconds: float, n: int, spec: str = "int8") -> dict:
    from gradio_client import Client

    prompts = PROMPTS[:clients] if clients <= len(PROMPTS) else \
        [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
    expected = expected_results(sorted(set(prompts)), n, spec)
    stats = {"requests": 0, "ok": 0, "mismatched": 0, "errors": 0, "latencies": [],
             "page_latencies": []}
    lock = threading.Lock()
    stop_at = time.time() + seconds

    def client_loop(prompt):
        client = Client(url, verbose=False)
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                out = client.predict("default", spec, "", "*.*", "", prompt, False, n,
                                     api_name="/compare")
            except Exception:  # noqa: BLE001 - counted, and the load goes on
                with lock:
                    stats["errors"] += 1
                continue
            dt = time.perf_counter() - t0
            fdt, text = expected[prompt]
            # the column shows special tokens too; the engine's text skips them
            good = out[2] == str(fdt) and column_text(out[0]).startswith(text)
            with lock:
                stats["requests"] += 1
                stats["latencies"].append(dt)
                stats["ok" if good else "mismatched"] += 1

    def page_loop():
        import urllib.request
        while time.time() < stop_at:
            t0 = time.perf_counter()
            urllib.request.urlopen(url, timeout=30).read()
            stats["page_latencies"].append(time.perf_counter() - t0)
            time.sleep(1.0)

    threads = [threading.Thread(target=client_loop, args=(p,)) for p in prompts]
    threads.append(threading.Thread(target=page_loop))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    from apphelpers import running_app

    import statistics as st
    with running_app() as url:
        s = run_load(url, args.clients, args.seconds, args.new_tokens)
    lat, page = sorted(s["latencies"]), sorted(s["page_latencies"])
    print(f"{args.clients} clients x {args.seconds:.0f} s, N={args.new_tokens}: "
          f"{s['requests']} requests, {s['ok']} correct, {s['mismatched']} mismatched, "
          f"{s['errors']} errors")
    if lat:
        print(f"request latency: median {st.median(lat):.2f} s, max {lat[-1]:.2f} s "
              f"(queued behind the other clients: one job at a time)")
    if page:
        print(f"page load while loaded: median {1000 * st.median(page):.0f} ms, "
              f"max {1000 * page[-1]:.0f} ms")


if __name__ == "__main__":
    main()
