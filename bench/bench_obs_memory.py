"""Memory of GPTQ, SparseGPT and AWQ on one big matrix (issue: GPTQ, SparseGPT and AWQ): a
Llama-7B down projection, W 4096 x 11008 with its 11008 x 11008 input Hessian, float32 on CPU. Each
method runs in a fresh process; the peak resident memory above what the process held with W, H and
the activation statistics loaded is printed against the size of the Hessian and of W, measured in
this run.

    .venv/bin/python bench/bench_obs_memory.py [--rows 4096] [--cols 11008] [--specs a,b]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, torch
rows, cols, spec = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from dtm_core.methods import parse_spec
g = torch.Generator().manual_seed(0)
w = torch.randn(rows, cols, generator=g)
x = torch.randn(4 * cols, cols, generator=g)
h = 2 / len(x) * x.t() @ x
stats = {"input_hessian": h, "input_absmean": x.abs().mean(0),
         "input_norms": x.norm(dim=0)}
del x
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB; x's peak included
import gc; gc.collect()
# the peak so far includes x; measure the method's own peak from here with a fresh high-water
# mark: /proc/self/clear_refs resets it on Linux
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
def rss_hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
before = rss()
t = time.perf_counter()
q = parse_spec(spec).apply(w, stats, "bench")
sec = time.perf_counter() - t
print(json.dumps({"spec": spec, "before_kib": before, "peak_kib": rss_hwm(), "seconds": sec}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--specs", default="int4:g128,gptq:int4:g128,sparsegpt:0.5,awq:int4:g128")
    args = ap.parse_args()
    h_mib = args.cols ** 2 * 4 / 2 ** 20
    w_mib = args.rows * args.cols * 4 / 2 ** 20
    print(f"W {args.rows} x {args.cols}: {w_mib:.0f} MiB; H {args.cols} x {args.cols}: "
          f"{h_mib:.0f} MiB (float32, CPU)")
    for spec in args.specs.split(","):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.rows), str(args.cols), spec],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = (r["peak_kib"] - r["before_kib"]) / 1024
        print(f"{spec:<16} {r['seconds']:7.1f} s   peak above W+H loaded: {extra:7.0f} MiB = "
              f"{extra / h_mib:.2f} x H = H + {(extra - h_mib) / w_mib:.2f} x W "
              f"(the working Hessian is a copy: the statistic is shared and kept)")
        print(f"RATIO {spec} extra memory / Hessian = {extra / h_mib:.2f}")


if __name__ == "__main__":
    main()
