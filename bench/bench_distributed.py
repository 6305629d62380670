"""Sweeps across processes (issue: torch.distributed). The same sweep of the default model (fresh
cell stores, one thread per process, each rank its own cache folder) run:

- by one process, then by two ranks: the parallel efficiency T1 / (2 x T2);
- by three ranks, and by three ranks of which one is killed (SIGKILL) when half of the cells are
  done: the time the survivors lose taking its cells over (including the --lost-after wait).

    .venv/bin/python bench/bench_distributed.py [--layers 0-29] [--prompts 8] [--lost-after 10]

Ranks are started with torchrun's environment variables (as a scheduler starts them), so that
killing one does not end the others.
"""
import argparse
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def run(ranks: int, args, folder: Path, kill_at: float | None = None) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dtm_core", "sweep", "--compress", "int4:g128", "--prompts",
           str(args.prompt_file), "--new-tokens", str(args.new_tokens), "--layers", args.layers,
           "--lost-after", str(args.lost_after)]
    p0 = port()
    t = time.perf_counter()
    procs = []
    for r in range(ranks):
        renv = env if ranks == 1 else dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(p0),
                                           RANK=str(r), WORLD_SIZE=str(ranks),
                                           LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(ranks))
        procs.append(subprocess.Popen(cmd + ["--cache-dir", str(folder / f"rank{r}")], cwd=ROOT,
                                      env=renv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    if kill_at is not None:
        total = args.cells
        while True:
            done = len(glob.glob(str(folder / "rank*" / "sweeps" / "*" / "cells" / "*.json")))
            if done >= kill_at * total:
                procs[-1].send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    for p in procs[:-1] if kill_at is not None else procs:
        p.wait()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0-29")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--lost-after", type=float, default=10.0)
    args = ap.parse_args()
    from dtm_core.measure.prompts import load_prompts

    lo, _, hi = args.layers.partition("-")
    args.cells = 7 * (int(hi or lo) - int(lo) + 1)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        args.prompt_file = d / "p.txt"
        args.prompt_file.write_text("\n".join(load_prompts("general").prompts[:args.prompts]))
        t1 = run(1, args, d / "one")
        t2 = run(2, args, d / "two")
        print(f"{args.cells} cells: 1 process {t1:.1f} s, 2 ranks {t2:.1f} s")
        print(f"RATIO parallel efficiency T1 / (2 x T2) = {t1 / (2 * t2):.2f}  (2 cores, one "
              "thread per process; model loading included)")
        t3 = run(3, args, d / "three")
        t3k = run(3, args, d / "killed", kill_at=0.5)
        print(f"3 ranks {t3:.1f} s; 3 ranks with one killed at half the cells {t3k:.1f} s "
              f"(--lost-after {args.lost_after:g} s)")
        print(f"RATIO killed / not killed = {t3k / t3:.2f}; time lost {t3k - t3:.1f} s")


if __name__ == "__main__":
    main()
