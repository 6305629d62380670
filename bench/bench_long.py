"""Long generations (issue 27, point 1): peak memory and time of `divergence` at N = 256, 1024 and
2048 on the default model, each N in a fresh process. Both should grow no faster than linearly in
N: the teacher-forced passes hold final hidden states (N x hidden) and apply the head 256
positions at a time, never N x vocabulary logits per model.

    .venv/bin/python bench/bench_long.py [--ns 256,1024,2048] [--spec int4:g128] [--prompts 2]

The dense references are generated without stopping at EOS (so every prompt really reaches N);
"teacher-forced" is the divergence pass given those references; "peak" is the process's peak
resident memory, "over load" what the run added to the peak after loading the pair.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.models.generation import encode_prompts, greedy_generate, pad_id_of
from dtm_core.models.load import load_model

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n = {n}
dense = load_model("default")
pair = make_pair(dense, Recipe.single({spec!r}))
ids = encode_prompts(dense.tokenizer, ["Once upon a time", "The history of the printing press",
                                       "def main():", "Dear diary,"][:{prompts}])
loaded = peak()
t = time.perf_counter()
refs = greedy_generate(dense.model, ids, n, pad_id_of(dense.tokenizer), set(), 4)
gen = time.perf_counter() - t
t = time.perf_counter()
res = divergence(pair, prompt_ids=ids, new_tokens=n, references=refs)
tf = time.perf_counter() - t
print(json.dumps({{"n": n, "tokens": sum(map(len, refs)), "generate_s": gen, "teacher_forced_s": tf,
                  "peak_mib": peak(), "over_load_mib": peak() - loaded,
                  "fdt_mean": res.summary["fdt_mean"]}}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="256,1024,2048")
    ap.add_argument("--spec", default="int4:g128")
    ap.add_argument("--prompts", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, n=n, spec=args.spec,
                                                                 prompts=args.prompts)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    base = rows[0]
    print(f"| N | tokens | generate s | teacher-forced s | peak MiB | over load MiB | "
          f"time / N vs N={base['n']} | over-load / N vs N={base['n']} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        k = r["n"] / base["n"]
        t_ratio = (r["generate_s"] + r["teacher_forced_s"]) / \
            (base["generate_s"] + base["teacher_forced_s"]) / k
        m_ratio = r["over_load_mib"] / max(base["over_load_mib"], 1e-9) / k
        print(f"| {r['n']} | {r['tokens']} | {r['generate_s']:.1f} | {r['teacher_forced_s']:.1f} | "
              f"{r['peak_mib']:.0f} | {r['over_load_mib']:.0f} | {t_ratio:.2f} | {m_ratio:.2f} |")
    print("\n(ratios per N: 1.00 = linear growth, below 1 = slower than linear)")


if __name__ == "__main__":
    main()
