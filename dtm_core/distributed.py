"""Cells of a sweep across processes on torch.distributed, surviving a lost worker.

Under ``torchrun`` every rank joins the process group (gloo on CPU, nccl where CUDA is present) and
the ranks share its c10d store (the TCP store rank 0 hosts). A :class:`CellQueue` lives in that
store under the sweep's key:

- ``next``: an atomic counter; a rank takes the next cell with ``store.add`` (dynamic hand-out: a
  fast rank takes more cells, a slow one fewer);
- ``lease/i``: the rank computing cell i; ``cell/i``: the finished cell as JSON, which is how cells
  reach rank 0 (no shared file system needed; with one, each rank's cell store also keeps them and a
  later run reuses them);
- ``beat/r``: rank r's heartbeat, a counter its background thread raises every second. A rank
  whose counter has not moved for ``dead_after_s`` (measured on the observer's own clock, so the
  nodes' clocks need not agree) is taken as lost, and the unfinished cells it held are claimed again
  (``compare_set`` on the lease, so exactly one rank takes each).

Only the store is used after the start (no collective), so a killed rank blocks nobody; the run
ends with every cell present exactly once. Rank 0 hosts the store: losing rank 0 loses the run (and
torchrun's default ``--max-restarts 0`` ends all ranks when any fails; this queue is for the ranks
that keep running — ``torchrun --max-restarts K`` also works: a restarted rank re-joins and takes
only unfinished cells).
"""
from __future__ import annotations

import json
import os
import pickle
import threading
import time
from typing import Callable, Iterator


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device_type: str = "cpu"):
    """Join torchrun's process group (once) and return its c10d store; None when running alone."""
    import torch.distributed as dist

    rank, size = world()
    if size <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


class CellQueue:
    """Dynamic hand-out of ``n`` cells over the ranks of a store, with leases and heartbeats."""

    def __init__(self, store, prefix: str, n: int, rank: int, size: int,
                 dead_after_s: float = 20.0, poll_s: float = 0.2):
        self.store, self.p, self.n = store, prefix, n
        self.rank, self.size = rank, size
        self.dead_after_s, self.poll_s = dead_after_s, poll_s
        self._seen: dict[str, tuple[bytes, float]] = {}   # key -> (value, when it last changed)
        self._finished: set[int] = set()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beating, daemon=True)
        self._beat.start()

    # -- liveness --------------------------------------------------------------------------------
    def _beating(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"{self.p}/beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store's host is gone: nothing to tell
                return
            self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()

    def _value(self, key: str) -> bytes | None:
        return self.store.get(key) if self.store.check([key]) else None

    def _stale(self, key: str) -> bool:
        """Whether ``key``'s value (or its absence) has not changed for ``dead_after_s``."""
        now = time.monotonic()
        value = self._value(key) or b""
        old = self._seen.get(key)
        if old is None or old[0] != value:
            self._seen[key] = (value, now)
            return False
        return now - old[1] > self.dead_after_s

    def _lost(self, owner: str) -> bool:
        return owner != str(self.rank) and self._stale(f"{self.p}/beat/{owner}")

    # -- cells -------------------------------------------------------------------------------------
    def finished(self, i: int) -> bool:
        if i in self._finished:                  # a finished cell stays finished
            return True
        if self.store.check([f"{self.p}/cell/{i}"]):
            self._finished.add(i)
            return True
        return False

    def put(self, i: int, data: bytes) -> None:
        self.store.set(f"{self.p}/cell/{i}", data)

    def get(self, i: int) -> bytes:
        return self.store.get(f"{self.p}/cell/{i}")

    def done(self, i: int, row: dict) -> None:
        self.put(i, json.dumps(row).encode())

    def result(self, i: int) -> dict:
        return json.loads(self.get(i))

    def claims(self) -> Iterator[int]:
        """The cells this rank computes: fresh ones from the counter, then, until every cell is
        finished, the unfinished cells of lost ranks."""
        while True:
            i = int(self.store.add(f"{self.p}/next", 1)) - 1
            if i >= self.n:
                break
            if self.finished(i):
                continue
            self.store.set(f"{self.p}/lease/{i}", str(self.rank))
            yield i
        while True:
            missing = [i for i in range(self.n) if not self.finished(i)]
            if not missing:
                return
            for i in missing:
                key = f"{self.p}/lease/{i}"
                owner = self._value(key)
                # no lease yet: its taker died between the counter and the lease (or is about to
                # write it): claimable only once that has stayed so for dead_after_s
                lost = self._stale(key) if owner is None else self._lost(owner.decode())
                if not lost or self.finished(i):
                    continue
                won = self.store.compare_set(key, owner.decode() if owner else "",
                                             str(self.rank))
                if won == str(self.rank).encode():
                    yield i
            time.sleep(self.poll_s)

    def wait_all(self, timeout_s: float, raw: bool = False) -> list:
        """Every cell's row (``raw``: its bytes), in order, once all are finished (rank 0 merges
        with this)."""
        deadline = time.monotonic() + timeout_s
        while not all(self.finished(i) for i in range(self.n)):
            if time.monotonic() > deadline:
                from dtm_core.errors import DTMError
                raise DTMError("Timed out waiting for the other ranks' results.")
            time.sleep(self.poll_s)
        return [self.get(i) if raw else self.result(i) for i in range(self.n)]


def shared_map(n: int, compute: Callable[[int], object], name: str, store=None,
               lost_after_s: float = 30.0, timeout_s: float = 7200.0,
               each: Callable[[int, int], None] | None = None) -> list | None:
    """``[compute(i) for i in range(n)]``, the items handed out over torchrun's ranks through
    ``store`` (a :class:`CellQueue`: dynamic, and a lost rank's items are taken over); results
    travel pickled through the store. Rank 0 gets the whole list in order, the other ranks None.
    Without a store (one process) it is the plain list. ``each(i, done)`` after each item."""
    if store is None:
        out = []
        for i in range(n):
            out.append(compute(i))
            if each:
                each(i, i + 1)
        return out
    rank, size = world()
    queue = CellQueue(store, f"dtm-map/{name}", n, rank, size, dead_after_s=lost_after_s)
    try:
        done = 0
        for i in queue.claims():
            queue.put(i, pickle.dumps(compute(i)))
            done += 1
            if each:
                each(i, done)
        return [pickle.loads(b) for b in queue.wait_all(timeout_s, raw=True)] if rank == 0 \
            else None
    finally:
        queue.close()


def placement(local_rank: int, local_size: int, gpus_per_rank: int,
              visible: list[int]) -> list[int]:
    """The local GPUs a rank places its model on: ``gpus_per_rank`` consecutive ones, so that the
    ranks of a node split its GPUs without overlap (2 ranks x 4 GPUs on an 8-GPU node: [0-3] and
    [4-7])."""
    from dtm_core.errors import DTMError

    if gpus_per_rank < 1:
        raise DTMError("--gpus-per-rank must be at least 1.")
    need = local_size * gpus_per_rank
    if len(visible) < need:
        raise DTMError(f"{local_size} ranks x {gpus_per_rank} GPUs need {need} GPUs on this node, "
                       f"but {len(visible)} are visible; lower --nproc-per-node or "
                       "--gpus-per-rank.")
    return visible[local_rank * gpus_per_rank:(local_rank + 1) * gpus_per_rank]


def max_memory(gpus: list[int], free: dict[int, int], headroom: float = 0.9) -> dict:
    """accelerate's ``max_memory`` that confines ``device_map="auto"`` to ``gpus`` (a share of
    each one's free memory; the other GPUs get none, and so does the CPU)."""
    return {**{g: int(free[g] * headroom) for g in gpus}, "cpu": 0}


def rank_gpus(gpus_per_rank: int) -> list[int] | None:
    """This rank's GPUs under torchrun (LOCAL_RANK / LOCAL_WORLD_SIZE), or None without CUDA or
    without ``--gpus-per-rank``."""
    import torch

    if not gpus_per_rank or not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", 0))
    size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return placement(local, size, gpus_per_rank, list(range(torch.cuda.device_count())))
