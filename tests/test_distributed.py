"""Sweeps on torch.distributed (issue 18): cells handed out from a queue in the c10d store, sent to
rank 0 through it (each rank has its own cache folder: no shared file system), and a rank killed
with SIGKILL mid-sweep loses nothing: the merged table equals a one-process sweep of the same
cells, every number exactly."""
from __future__ import annotations

import csv
import glob
import os
import signal
import subprocess
import sys
import time

from apphelpers import free_port
from conftest import ROOT, WAIT_S

SPEC, LAYERS, N = "int4:g64", "0-5", "8"


def _sweep_args(prompts, cache, out=None):
    args = [sys.executable, "-m", "dtm_core", "sweep", "--compress", SPEC, "--prompts",
            str(prompts), "--new-tokens", N, "--layers", LAYERS, "--cache-dir", str(cache),
            "--lost-after", "4"]
    return args + (["--out", str(out)] if out else [])


def _rows(path):
    rows = {r["component"]: r for r in csv.DictReader(open(path))}
    for r in rows.values():
        r.pop("seconds")
    return rows


def test_a_rank_killed_mid_sweep_loses_nothing(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nWater boils at\nOnce upon a time\n"
                       "Machine learning is\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(_sweep_args(prompts, tmp_path / "alone", tmp_path / "alone.csv"),
                         cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    port = free_port()
    procs = []
    for rank in range(3):
        renv = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                    WORLD_SIZE="3", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="3")
        out = tmp_path / "merged.csv" if rank == 0 else None
        procs.append(subprocess.Popen(_sweep_args(prompts, tmp_path / f"rank{rank}", out),
                                      cwd=ROOT, env=renv, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    victim = tmp_path / "rank2" / "sweeps" / "*" / "cells" / "*.json"
    deadline = time.time() + 600
    while not glob.glob(str(victim)):          # rank 2 is working: kill it mid-sweep
        assert time.time() < deadline and procs[2].poll() is None, procs[2].stderr.read()[-2000:]
        time.sleep(0.05)
    procs[2].send_signal(signal.SIGKILL)
    procs[2].wait()
    killed_done = len(glob.glob(str(victim)))
    outs = [p.communicate(timeout=WAIT_S) for p in procs[:2]]
    for p, (o, e) in zip(procs[:2], outs):
        assert p.returncode == 0, e[-3000:]
    merged, alone = _rows(tmp_path / "merged.csv"), _rows(tmp_path / "alone.csv")
    assert len(alone) == 42 and merged == alone          # every cell once, every number equal
    assert 1 <= killed_done < 42
    done = [len(glob.glob(str(tmp_path / f"rank{r}" / "sweeps" / "*" / "cells" / "*.json")))
            for r in range(2)]
    # rank 0's store holds every cell now; rank 1 computed its own share
    assert done[0] == 42 and 1 <= done[1] < 42
    assert "3 ranks" in outs[0][0]


def _torchrun(*args, procs=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(procs), "-m", "dtm_core", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _alone(*args):
    return subprocess.run([sys.executable, "-m", "dtm_core", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_evaluate_and_kld_under_torchrun_equal_one_process(tmp_path):
    """evaluate's prompt chunks and kld's text chunks are shared out over two ranks and merged on
    rank 0 into exactly the one-process result: the same rows and the same statistics."""
    import json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                           "answers": [str(2 * i)]}) + "\n" for i in range(20)))
    # the first 12,000 characters of the shipped texts: 20 chunks of 128 tokens
    text = tmp_path / "licenses-12k.txt"
    text.write_text((ROOT / "assets" / "texts" / "licenses.txt").read_text(encoding="utf-8")
                    [:12000], encoding="utf-8")
    runs = {}
    for how, run in (("alone", _alone), ("ranks", _torchrun)):
        out, js = tmp_path / f"{how}.csv", tmp_path / f"{how}.json"
        r = run("evaluate", "--compress", "int4:g64", "--prompts", str(prompts),
                "--new-tokens", "6", "--out", str(out), "--json", str(js), "--worst", "0")
        assert r.returncode == 0, r.stderr[-3000:]
        kjs = tmp_path / f"{how}-kld.json"
        k = run("kld", "--compress", "int4:g64", "--text", str(text), "--ctx", "128",
                "--json", str(kjs))
        assert k.returncode == 0, k.stderr[-3000:]
        runs[how] = (list(csv.DictReader(open(out))), json.loads(js.read_text())["summary"],
                     json.loads(kjs.read_text()))
    (rows_a, sum_a, kld_a), (rows_r, sum_r, kld_r) = runs["alone"], runs["ranks"]
    assert len(rows_a) == 20 and rows_a == rows_r
    assert sum_a == sum_r
    assert kld_a == kld_r and kld_a["chunks"] > 10


def test_gpus_per_rank_placement_plan():
    """--gpus-per-rank K: rank r of a node gets K consecutive GPUs, no two ranks share one, and
    too few GPUs is one sentence; the max_memory that confines device_map='auto' to them (the
    placement logic on fake device lists; CUDA itself is not run here)."""
    import pytest

    from dtm_core.distributed import max_memory, placement
    from dtm_core.errors import DTMError

    eight = list(range(8))
    assert [placement(r, 2, 4, eight) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [placement(r, 4, 2, eight) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert placement(1, 2, 1, [3, 5]) == [5]     # visible ids as CUDA_VISIBLE_DEVICES maps them
    with pytest.raises(DTMError, match="3 ranks x 3 GPUs need 9 GPUs on this node, but 8"):
        placement(0, 3, 3, eight)
    with pytest.raises(DTMError, match="at least 1"):
        placement(0, 1, 0, eight)
    mm = max_memory([4, 5], {4: 80 << 30, 5: 40 << 30})
    assert mm == {4: int(0.9 * (80 << 30)), 5: int(0.9 * (40 << 30)), "cpu": 0}


def test_sensitivity_note_gives_the_torchrun_command_and_opens_its_result(tmp_path, monkeypatch,
                                                                         default_model):
    """When a sweep is estimated to take longer than the machine's limit, the Sensitivity tab
    shows the exact torchrun command; the same sweep run by the CLI into the app's store then
    opens in the app without computing a cell."""
    import shlex

    from ui import common, sensitivity

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    common.CACHE._dense = ("default", default_model)
    common.CACHE._pairs.clear()
    f = tmp_path / "few.txt"
    f.write_text("The capital of France is\nWater boils at\n")
    monkeypatch.setattr(sensitivity, "NOTE_AFTER_S", 1e9)
    box, msg = sensitivity.sweep_note("default", "int4:g64", str(f), "general", False, 6, "0",
                                      "q,down")
    assert box["visible"] is False and msg["visible"] is False
    monkeypatch.setattr(sensitivity, "NOTE_AFTER_S", 0.0)
    box, msg = sensitivity.sweep_note("default", "int4:g64", str(f), "general", False, 6, "0",
                                      "q,down")
    assert box["visible"] and msg["visible"] and "This sweep has 2 cells" in msg["value"]
    cmd = shlex.split(box["value"])
    assert cmd[:5] == ["torchrun", "--standalone", "--nproc-per-node", cmd[3], "-m"]
    assert cmd[6:] == ["sweep", "--model", "default", "--compress", "int4:g64", "--prompts",
                       str(f), "--new-tokens", "6", "--layers", "0", "--kinds", "q,down",
                       "--cache-dir", str(tmp_path / "xdg" / "dtm-inspector"), "--out",
                       "sweep.csv"]
    # the command's sweep (one process here), then the app opens its cells from the store
    r = subprocess.run([sys.executable, "-m", "dtm_core", *cmd[6:-2], "--out",
                        str(tmp_path / "s.csv")], cwd=ROOT, capture_output=True, text=True,
                       timeout=WAIT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    heat, table, status, csv_path, state, parquet = sensitivity.run_sweep(
        "default", "int4:g64", str(f), "general", False, 6, "0", "q,down", "fdt_mean",
        progress=lambda *a, **k: None)
    assert "(0 computed, 2 reused from the store)" in status, status
