"""Default-model load time (cold vs cached) and the memory a recipe pair adds (issue: core engine).

    .venv/bin/python bench/bench_load_memory.py [--spec int4:g128] [--components '*.q,*.k']

Loads run in fresh subprocesses so the second load sees only the on-disk cache, not Python state.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
from dtm_core.models import load_model
m = load_model("default", cache_dir={cache!r})
print(json.dumps({{"seconds": time.perf_counter() - t, "from_cache": m.from_cache}}))
"""


def timed_load(cache):
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, cache=cache)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="int4:g128")
    ap.add_argument("--components", default="*.q,*.k,*.v,*.o")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold, warm = timed_load(cache), timed_load(cache)
    assert not cold["from_cache"] and warm["from_cache"]
    print(f"load default: first {cold['seconds']:.2f} s, second {warm['seconds']:.2f} s")
    print(f"RATIO second/first load = {warm['seconds'] / cold['seconds']:.3f}  (target <= 0.25)")

    from dtm_core.compression.recipe import Recipe
    from dtm_core.models.load import load_model
    from dtm_core.compression.pair import make_pair, tensor_bytes

    dense = load_model("default")
    base_rss, base_bytes = rss_mb(), tensor_bytes(dense.model)
    pair = make_pair(dense, Recipe.single(args.spec, args.components))
    pair_bytes = tensor_bytes(dense.model, pair.compressed)
    pair_rss = rss_mb()
    changed = pair.applied.changed_bytes / 2**20
    print(f"recipe {args.spec}@{args.components}: changed tensors {changed:.1f} MiB")
    print(f"tensor storage: dense {base_bytes / 2**20:.1f} MiB, pair "
          f"{pair_bytes / 2**20:.1f} MiB, added {(pair_bytes - base_bytes) / 2**20:.1f} MiB")
    print(f"process RSS added by the pair: {pair_rss - base_rss:.1f} MiB")
    print(f"RATIO (pair - dense) / changed tensors = {(pair_bytes - base_bytes) / 2**20 / changed:.3f}"
          f"  (RSS-based {(pair_rss - base_rss) / changed:.2f})")


if __name__ == "__main__":
    main()
