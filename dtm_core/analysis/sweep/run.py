"""Running a sweep: every selected component compressed alone on a shared copy, its cell measured
on the recorded layer inputs and stored; resumable, shared out across torch.distributed ranks
through the c10d store (:mod:`dtm_core.distributed`), and optionally every component at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from dtm_core import METRIC_VERSION
from dtm_core.analysis.sweep.output_error import OutputError, measuring
from dtm_core.analysis.sweep.cell import WHOLE, cell_columns, cell_table, summarize_cell, weight_error
from dtm_core.analysis.sweep.record import SweepContext, prepare
from dtm_core.analysis.sweep.store import CellStore, sweep_key
from dtm_core.compression.calibration import Calibration, calibration_from
from dtm_core.compression.intactkv import IntactKV, calibration_fingerprint
from dtm_core.compression.pair import shared_copy
from dtm_core.compression.recipe import Recipe, apply_recipe, gather_statistics, parse_spec
from dtm_core.errors import DTMError
from dtm_core.measure.metrics import METRICS
from dtm_core.models.load import LoadedModel, cache_root
from dtm_core.progress import Meter


@dataclass
class SweepResult:
    table: pd.DataFrame
    key: str
    folder: Path
    computed: int
    reused: int
    stopped: bool = False
    whole: dict | None = None     # every selected component at once (``whole=True``)
    settled: bool = False         # stopped by ``until`` (a settled ranking)

    def additivity(self) -> dict | None:
        """The sum over cells set against every component at once: the FDT lost (N - mean FDT)
        and the mean KL, summed over cells and measured whole (None without ``whole``)."""
        if self.whole is None or self.table.empty:
            return None
        n = float(self.whole.get("new_tokens") or 0)
        return {"cells": len(self.table),
                "fdt_lost_sum": float((n - self.table.fdt_mean).sum()),
                "fdt_lost_whole": n - float(self.whole["fdt_mean"]),
                "kl_sum": float(self.table.kl_mean.sum()),
                "kl_whole": float(self.whole["kl_mean"]),
                "fdt_mean_whole": float(self.whole["fdt_mean"]),
                "weight_error_whole": self.whole.get("weight_error")}

    def additivity_line(self) -> str | None:
        a = self.additivity()
        if a is None:
            return None
        return (f"all {a['cells']} components at once: mean FDT {a['fdt_mean_whole']:.2f}, FDT "
                f"lost {a['fdt_lost_whole']:.2f} (sum over cells {a['fdt_lost_sum']:.2f}), mean "
                f"KL {a['kl_whole']:.4g} (sum over cells {a['kl_sum']:.4g})")


def select_components(model, layers: str | None = None, kinds: str | None = None,
                      spec=None) -> list:
    """The components of a sweep: all, or those in layer ranges and a list of kinds (any kind a
    selection takes: fused slices such as ``q`` on Phi-3, one expert ``e0.down`` or every expert
    of a kind one by one, ``e*.down``). With a KV-cache ``spec`` (``kv:...``): the layers' key
    and value caches (kinds ``kcache``, ``vcache``; default both)."""
    from dtm_core.compression.kvcache import resolve_cache
    from dtm_core.models.components import resolve

    spans = [p.strip() for p in (layers or "*").split(",") if p.strip()] or ["*"]
    wanted = [k.strip() for k in (kinds or "*").split(",") if k.strip()] or ["*"]
    sel = ",".join(f"{sp}.{k}" for sp in spans for k in wanted)
    if spec is not None and parse_spec(spec).targets_cache:
        return resolve_cache(model, sel)
    return resolve(model, sel)


def sweep_store(dense: LoadedModel, spec: str, prompt_ids, new_tokens: int, ikv, calibration,
                cache_dir) -> tuple[str, CellStore, Calibration | None]:
    """A sweep's key, its cell store (meta data written) and the calibration its method uses."""
    sp = parse_spec(spec)
    calib: Calibration | None = None
    if sp.needs_calibration:
        calib = calibration_from(dense, calibration if calibration is not None else prompt_ids,
                                 who=sp.name)
    extra = "" if ikv is None else f"intactkv={ikv.label}|{calibration_fingerprint(ikv)}"
    extra += f"|metrics={','.join(sorted(METRICS))}"
    if calib is not None:
        extra += f"|calibration={calib.key}"
    key = sweep_key(dense, spec, prompt_ids, new_tokens, extra)
    cells = CellStore(cache_root(cache_dir) / "sweeps" / key)
    cells.write_meta({"model": dense.source, "fingerprint": dense.fingerprint, "spec": str(sp),
                      "new_tokens": new_tokens, "prompts": len(prompt_ids),
                      "intactkv": None if ikv is None else ikv.label,
                      "calibration": None if calib is None else calib.label,
                      "metric_version": METRIC_VERSION})
    return key, cells, calib


def sweep(dense: LoadedModel, spec: str, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
          *, layers: str | None = None, kinds: str | None = None, cache_dir=None,
          batch_size: int = 16, rank: int = 0, world: int = 1, wait_s: float = 7200.0,
          progress: Callable[[float, str], None] | None = None,
          stop: threading.Event | None = None, ctx: SweepContext | None = None,
          intactkv=None, calibration=None, whole: bool = False, store=None,
          lost_after_s: float = 30.0, order: Sequence[str] | None = None,
          until: Callable[[dict], bool] | None = None,
          on_cell: Callable[[dict], None] | None = None) -> SweepResult:
    """Compress each selected component alone with ``spec`` and measure it; resumable.

    With ``world`` > 1 and ``store`` (torchrun: the process group's c10d store, see
    :mod:`dtm_core.distributed`) the ranks take cells from a queue in the store, send finished
    cells through it, and take over the unfinished cells of a rank that stops beating for
    ``lost_after_s``; rank 0 returns the merged table. Without a store, rank r computes cells r,
    r + world, ... and rank 0 waits for the others' cells in a shared cell store.
    ``intactkv`` runs every cell with the dense pivot KV (stored under its own key).
    ``calibration`` (a :class:`~dtm_core.compression.calibration.Calibration`, prompt texts or token
    sequences) feeds a method that needs statistics; default: the sweep's prompts. It is part of
    the cells' key, so a cell opened as a pair with the same calibration is the pair it measured.
    Each cell also records its component's relative weight error. ``whole``: also measure every
    selected component compressed at once (a second copy of their weights while it runs), for
    :meth:`SweepResult.additivity`.

    ``order`` (component names): the cells to compute first, in that order (the others after
    them, in model order; the table stays in model order), as refinement of estimated cells
    does, most sensitive first. ``until`` is given each finished or stored cell (in that order)
    and stops the sweep when it returns True (``settled`` then); ``on_cell`` sees each cell as it
    finishes.
    """
    ikv = IntactKV.parse(intactkv)
    if ctx is not None and ikv != ctx.intactkv:
        raise DTMError("The sweep context was prepared with a different IntactKV setting.")
    sp = parse_spec(spec)
    prompt_ids = [list(p) for p in prompt_ids]
    comps = select_components(dense.model, layers, kinds, sp)
    key, cells, calib = sweep_store(dense, spec, prompt_ids, new_tokens, ikv, calibration,
                                    cache_dir)
    note = progress or (lambda f, m: None)
    if world > 1 and store is not None:
        res = _queued_sweep(dense, sp, comps, prompt_ids, new_tokens, key, cells, store,
                            rank, world, lost_after_s, note, stop, ctx, ikv, calib, batch_size,
                            wait_s)
        if whole and rank == 0 and len(res.table) == len(comps) and comps:
            res.whole = _whole_cell(dense, sp, comps, prompt_ids, new_tokens, cells, ctx, ikv,
                                    calib, batch_size)
        return res
    if order is not None:
        first = {n: k for k, n in enumerate(order)}
        comps_run = sorted(comps, key=lambda c: first.get(c.name, len(first)))
    else:
        comps_run = comps
    todo = [c for k, c in enumerate(comps_run) if k % world == rank and cells.get(c.name) is None]
    computed, stopped, settled = 0, False, False
    if until is not None:       # the stored cells first, in the same order
        for c in comps_run:
            row = cells.get(c.name)
            if row is not None and until(row):
                settled, todo = True, []
                break
    if todo:
        ctx = ctx or prepare(dense, prompt_ids, new_tokens, batch_size, intactkv=ikv)
        work = shared_copy(dense.model)   # compressed in place, one cell at a time
        if calib is not None:   # every cell's statistics in one pass over the calibration set
            gather_statistics(work, [(c, sp) for c in todo], calib)
        meter = Meter(len(todo), "cell")
        for n, comp in enumerate(todo):
            if stop is not None and stop.is_set():
                stopped = True
                break
            row = _cell_row(dense, work, ctx, sp, comp, calib)
            cells.put(comp.name, row)
            computed += 1
            note((n + 1) / len(todo),
                 meter.line(n + 1, f"{comp.name}: mean FDT {row['fdt_mean']:.1f}"))
            if on_cell is not None:
                on_cell(row)
            if until is not None and until(row):
                settled = True
                break
    if rank == 0 and world > 1 and not stopped and not settled:
        deadline = time.time() + wait_s
        while any(cells.get(c.name) is None for c in comps):
            if time.time() > deadline:
                raise DTMError("Timed out waiting for the other ranks' sweep cells.")
            time.sleep(0.5)
    rows = [r for r in (cells.get(c.name) for c in comps) if r is not None]
    table = pd.DataFrame(rows, columns=cell_columns())
    all_at_once = None
    if whole and rank == 0 and not stopped and not settled and comps:
        all_at_once = _whole_cell(dense, sp, comps, prompt_ids, new_tokens, cells, ctx, ikv,
                                  calib, batch_size)
    return SweepResult(table=table, key=key, folder=cells.folder, computed=computed,
                       reused=len(rows) - computed, stopped=stopped, whole=all_at_once,
                       settled=settled)


def _whole_cell(dense, sp, comps, prompt_ids, new_tokens, cells, ctx, ikv, calib,
                batch_size) -> dict:
    """Every selected component compressed at once (stored under the selection's hash too:
    cells are shared across selections)."""
    names = ",".join(c.name for c in comps)
    wname = WHOLE + "-" + hashlib.sha256(names.encode()).hexdigest()[:12]
    row = cells.get(wname)
    if row is None:
        ctx = ctx or prepare(dense, prompt_ids, new_tokens, batch_size, intactkv=ikv)
        work = shared_copy(dense.model)
        t0 = time.perf_counter()
        with apply_recipe(work, Recipe.single(sp, names), calib):
            summary = summarize_cell(cell_table(work, ctx, min(c.layer for c in comps)))
            werr = _weight_error(dense.model, work, sp, names)
        row = {"components": len(comps), **summary, "weight_error": werr,
               "new_tokens": new_tokens, "seconds": time.perf_counter() - t0}
        cells.put(wname, row)
    return row


def _cell_row(dense, work, ctx, sp, comp, calib) -> dict:
    """One cell: ``comp`` alone compressed with ``sp`` in ``work`` (restored after)."""
    t0 = time.perf_counter()
    acc = OutputError()

    def scored(b):
        acc.rows, acc.pos = ctx.rows[b], ctx.pos[b]
        args, kwargs = ctx.layer_inputs[b][comp.layer]
        acc.batch_shape = tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])

    cache = sp.targets_cache     # a KV cache: no weight, no module output
    with apply_recipe(work, Recipe.single(sp, comp.name), calib), \
            (contextlib.nullcontext() if cache else measuring(dense.model, work, comp.name, acc)):
        summary = summarize_cell(cell_table(work, ctx, comp.layer,
                                            on_batch=None if cache else scored))
        werr = _weight_error(dense.model, work, sp, comp.name)
    return {"layer": comp.layer, "kind": comp.kind, "component": comp.name,
            "params": comp.params, **summary, "weight_error": werr, **acc.values(),
            "seconds": time.perf_counter() - t0}


def _weight_error(dense_model, work, sp, names: str) -> float:
    return float("nan") if sp.targets_cache else \
        weight_error(dense_model, work, names)


def _queued_sweep(dense, sp, comps, prompt_ids, new_tokens, key, cells, store, rank, world,
                  lost_after_s, note, stop, ctx, ikv, calib, batch_size, wait_s) -> SweepResult:
    """A sweep's cells from the queue in the c10d store (:mod:`dtm_core.distributed`)."""
    from dtm_core.distributed import CellQueue

    queue = CellQueue(store, f"dtm-sweep/{key}", len(comps), rank, world,
                      dead_after_s=lost_after_s)
    computed = 0
    work = None
    meter = Meter(len(comps), "cell")
    try:
        for i in queue.claims():
            if stop is not None and stop.is_set():
                break
            comp = comps[i]
            row = cells.get(comp.name)      # a shared file system: a finished cell is reused
            if row is None:
                if work is None:
                    ctx = ctx or prepare(dense, prompt_ids, new_tokens, batch_size, intactkv=ikv)
                    work = shared_copy(dense.model)
                    if calib is not None:
                        gather_statistics(work, [(c, sp) for c in comps], calib)
                row = _cell_row(dense, work, ctx, sp, comp, calib)
                cells.put(comp.name, row)
                computed += 1
            queue.done(i, row)
            note(sum(queue.finished(k) for k in range(len(comps))) / len(comps),
                 meter.line(computed, f"rank {rank}: {comp.name}: mean FDT {row['fdt_mean']:.1f}"))
        rows = queue.wait_all(wait_s) if rank == 0 else []
    finally:
        queue.close()
    for comp, row in zip(comps, rows):        # rank 0 keeps every cell in its own store
        if cells.get(comp.name) is None:
            cells.put(comp.name, row)
    table = pd.DataFrame(rows, columns=cell_columns())
    return SweepResult(table=table, key=key, folder=cells.folder, computed=computed,
                       reused=len(rows) - computed if rank == 0 else 0)
