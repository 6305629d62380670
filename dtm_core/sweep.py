"""Sensitivity sweeps: compress one ``LAYER.KIND`` at a time and measure the divergence it causes.

Layers before the compressed one see exactly the dense model's inputs, so the dense pass records
every decoder layer's input once per prompt set (:class:`SweepContext`), and a cell reruns only the
layers at and after its component, then the final norm and the LM head. The shapes and kernels are
those of a full forward pass, so a cell's numbers equal ``divergence --components LAYER.KIND``.

Cells are stored on disk one at a time (a small JSON file each, written atomically) under a key of
(model fingerprint, spec, prompt tokens, N, metric version): a stopped or killed sweep resumes
without recomputing finished cells, and a finished one loads instantly.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from . import METRIC_VERSION, hooks
from .calibration import Calibration, calibration_from
from .compress import Recipe, apply_recipe, gather_statistics, parse_spec
from .components import decoder_layers, tail_modules
from .divergence import reference_continuations
from .errors import DTMError
from .families import family_of
from .generation import (check_lengths, model_device, pad_id_of, plan_batches, teacher_forced,
                         vocab_size)
from .intactkv import (IntactKV, PivotCache, RecordingCache, calibration_fingerprint,
                       pivot_source, right_pad_mask)
from .metrics import (METRICS, TokenMetrics, aggregate, aggregates, concat, needs_distributions,
                      primitives, run_metrics, slice_tokens)
from .models import LoadedModel, cache_root
from .pair import shared_copy
from .progress import Meter

CELL_COLUMNS = ["layer", "kind", "component", "params", "fdt_mean", "fdt_median", "fdt_p25",
                "sdt_mean", "kl_mean", "ppl_change", "weight_error", "seconds"]
WHOLE = "__all__"     # the store's name for every selected component compressed at once


def cell_columns() -> list[str]:
    """A cell's columns: the documented ones, then every other registered aggregate."""
    extra = [k for k in aggregates() if k not in CELL_COLUMNS]
    return CELL_COLUMNS[:-1] + extra + CELL_COLUMNS[-1:]


def weight_error(dense_model, model, name: str) -> float:
    """Relative weight error ||W - W'|| / ||W|| of component ``name`` (Frobenius norm over every
    matrix it covers) between the dense model and ``model`` (a shared copy with it changed)."""
    from .components import resolve

    num = den = 0.0
    for dc, wc in zip(resolve(dense_model, name), resolve(model, name)):
        for a, b in zip(dc.matrices(dc.weight), wc.matrices(wc.weight)):
            if dc.rows is not None:
                a, b = a[dc.rows], b[dc.rows]
            a = a.detach().double()
            num += float((b.detach().double() - a).pow(2).sum())
            den += float(a.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def heatmap_metrics() -> dict[str, str]:
    """Aggregate key -> label, for every value a cell has (from the metric registry), and the
    component's relative weight error."""
    return {**{k: a.label for k, a in aggregates().items()},
            "weight_error": "relative weight error ||W - W'|| / ||W||"}


@dataclass
class SweepContext:
    """Dense-side work shared by every cell of a sweep over one prompt set."""

    prompt_ids: list[list[int]]
    references: list[list[int]]
    new_tokens: int
    batches: list[list[int]]
    layer_inputs: list = field(default_factory=list)   # per batch, per layer: (args, kwargs)
    rows: list = field(default_factory=list)    # per batch: (row, position) of every
    pos: list = field(default_factory=list)     # continuation logit
    dense_pw: list = field(default_factory=list)   # per batch: (sum L, H) p_dense @ W_head,
    dense_pb: list = field(default_factory=list)   # (sum L,) p_dense . b_head or None,
    dense_negent: list = field(default_factory=list)  # sum_v p log p per position (fast path)
    dense_lp_ref: list = field(default_factory=list)  # log p_dense(reference), float64
    dense_argmax: list = field(default_factory=list)  # the dense argmax per position
    dense_logits: list | None = None   # per batch (sum L, V): kept when the fast path cannot serve
    refs: list = field(default_factory=list)        # per batch: (sum L,) reference tokens
    head_weight: torch.Tensor = None  # the LM head weight the expectations were taken with
    intactkv: object = None         # IntactKV, or None
    pivot_sources: list = field(default_factory=list)  # per batch: (mask, source(layer))
    pivot_rows: list = field(default_factory=list)  # per batch: (sum L,) True inside the pivots

    @property
    def fast(self) -> bool:
        """Whether cells take the fast path (no vocabulary-sized dense tensor per cell)."""
        return self.dense_logits is None


@torch.no_grad()
def prepare(dense: LoadedModel, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
            batch_size: int = 16, references=None, intactkv=None) -> SweepContext:
    """Reference continuations, then one dense pass recording every decoder layer's input.

    With ``intactkv`` the pass also keeps the dense K/V of the pivot tokens, which every cell's
    compressed layers then see (exactly as :func:`divergence` with the same IntactKV).
    The fast path (KL through ``p_dense @ W_head``) needs a linear head whose output is the logits
    and metrics that need no distributions; otherwise the dense continuation logits are kept.
    """
    ikv = IntactKV.parse(intactkv)
    prompt_ids = [list(p) for p in prompt_ids]
    ks = ikv.pivot_lengths(dense.tokenizer, prompt_ids) if ikv is not None else None
    check_lengths(dense.model, prompt_ids, new_tokens)
    refs = references or reference_continuations(dense, prompt_ids, new_tokens, batch_size)
    full = [p + r for p, r in zip(prompt_ids, refs)]
    batches = plan_batches([len(s) for s in full], vocab_size(dense.model), batch_size)
    layers = decoder_layers(dense.model)
    pad = pad_id_of(dense.tokenizer)
    head = dense.model.get_output_embeddings()
    fast = (isinstance(head, torch.nn.Linear) and family_of(dense.model).postprocess is None
            and not needs_distributions())
    ctx = SweepContext(prompt_ids, refs, new_tokens, batches, head_weight=head.weight,
                       intactkv=ikv, dense_logits=None if fast else [])
    for idx in batches:
        seqs = [full[i] for i in idx]
        rec: list = [None] * len(layers)
        if ikv is None:
            with hooks.recording(layers, rec):
                logits = teacher_forced(dense.model, seqs, pad).logits
        else:
            kb = [ks[i] for i in idx]
            t0 = max(kb)
            mask = right_pad_mask(kb, t0)
            if ikv.calibrated is None:   # dense weights with dense pivots: the dense pass itself
                kv = RecordingCache(dense.model.config, t0)
                with hooks.recording(layers, rec):
                    out = teacher_forced(dense.model, seqs, pad, use_cache=True,
                                         past_key_values=kv)
                logits = out.logits
                source = pivot_source(ikv, kv, [0] * len(idx), t0, None)
                del out, kv
            else:
                # calibrated pivots change every layer's input, also before a cell's component:
                # record the dense weights' layer inputs under them; the metrics' reference stays
                # the plain dense pass
                logits = teacher_forced(dense.model, seqs, pad).logits
                source = pivot_source(ikv, None, [0] * len(idx), t0,
                                      model_device(dense.model))
                with hooks.recording(layers, rec):
                    teacher_forced(dense.model, seqs, pad, use_cache=True,
                                   past_key_values=PivotCache(dense.model.config, mask, source))
        rows = torch.cat([torch.full((len(refs[i]),), j) for j, i in enumerate(idx)])
        pos = torch.cat([torch.arange(len(refs[i])) + len(prompt_ids[i]) - 1 for i in idx])
        dev = logits.device
        ctx.layer_inputs.append(rec)
        ctx.rows.append(rows.to(dev))
        ctx.pos.append(pos.to(dev))
        z = logits[rows.to(dev), pos.to(dev)]
        d = torch.log_softmax(z.double(), -1)   # float64: see token_metrics
        ref = torch.cat([torch.tensor(refs[i], dtype=torch.long) for i in idx]).to(dev)
        ctx.dense_argmax.append(z.argmax(-1))
        ctx.dense_lp_ref.append(d.gather(-1, ref[:, None])[:, 0])
        ctx.refs.append(ref)
        if fast:
            p = d.exp()
            # sum_v p_d(v) z_c(v) = (p_d @ W) . h_c for a linear head: an H-vector per position
            # replaces the vocabulary-sized dense distribution in every cell (vocabulary in
            # blocks, so no float64 copy of the whole head is made)
            pw = torch.zeros((len(p), head.weight.shape[1]), dtype=torch.float64, device=dev)
            for v in range(0, head.weight.shape[0], 8192):
                pw += p[:, v:v + 8192] @ head.weight[v:v + 8192].to(dev, torch.float64)
            ctx.dense_pw.append(pw)
            ctx.dense_pb.append(None if head.bias is None
                                else p @ head.bias.to(dev, torch.float64))
            ctx.dense_negent.append(torch.where(p > 0, p * d, torch.zeros_like(d)).sum(-1))
            del p
        else:
            ctx.dense_logits.append(z)
        if ikv is not None:
            ctx.pivot_sources.append((mask.to(dev), source))
            ctx.pivot_rows.append(
                pos < torch.cat([torch.full((len(refs[i]),), ks[i]) for i in idx]).to(dev))
        del logits, d
    return ctx


@torch.no_grad()
def continuation_hidden(model, ctx: SweepContext, b: int, start: int) -> torch.Tensor:
    """(sum L, H) final hidden states at batch ``b``'s continuation positions when layers
    ``start``.. of ``model`` run on the recorded inputs."""
    args, kwargs = ctx.layer_inputs[b][start]
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = None
    if ctx.intactkv is not None:
        mask, source = ctx.pivot_sources[b]
        cache = PivotCache(model.config, mask, source)
    for i, layer in enumerate(decoder_layers(model)[start:], start):
        args, kwargs = ctx.layer_inputs[b][i]
        if cache is not None:
            args, kwargs = hooks.layer_call(layer, args, kwargs, cache)
        hidden = hooks.run_layer(layer, hidden, args, kwargs)
    for mod in tail_modules(model):
        hidden = mod(hidden)
    return hidden[ctx.rows[b], ctx.pos[b]]


ROW_CHUNK = 128  # LM-head rows per step: each chunk's logits are reduced while still in cache


def _chunk_tokens(model, fam, ctx: SweepContext, b: int, h: torch.Tensor, sl: slice
                  ) -> TokenMetrics:
    """The primitives of one chunk of continuation positions (see :mod:`dtm_core.metrics`)."""
    logits = fam.logits(model, h).float()
    ref = ctx.refs[b][sl]
    top, arg = logits.max(-1)
    piv = ctx.pivot_rows[b][sl] if ctx.intactkv is not None else None
    if not ctx.fast:
        d = torch.log_softmax(ctx.dense_logits[b][sl].double(), -1)
        c = torch.log_softmax(logits.double(), -1)
        d_arg = ctx.dense_argmax[b][sl]
        if piv is not None:   # positions inside the pivot span are the dense model's
            c = torch.where(piv[:, None], d, c)
            arg = torch.where(piv, d_arg, arg)
        return run_metrics(primitives(d, c, ref, ctx.new_tokens, d_arg, arg), distributions=True)
    z_ref = logits.gather(-1, ref[:, None])[:, 0].double()
    # exp and its (cascade) sum in float32 are accurate to ~1e-7 for terms <= 1; the KL below is
    # a difference of terms the size of the logits, so it is formed in float64
    lse = top.double() + logits.sub_(top[:, None]).exp_().sum(-1).double().log_()
    dot = torch.linalg.vecdot(ctx.dense_pw[b][sl], h.double())
    if ctx.dense_pb[b] is not None:
        dot = dot + ctx.dense_pb[b][sl]
    kl = (ctx.dense_negent[b][sl] - dot + lse).clamp(min=0)
    lp_d, lp_c = ctx.dense_lp_ref[b][sl], z_ref - lse
    d_arg = ctx.dense_argmax[b][sl]
    if piv is not None:       # positions inside the pivot span are the dense model's
        arg = torch.where(piv, d_arg, arg)
        kl = torch.where(piv, torch.zeros_like(kl), kl)
        lp_c = torch.where(piv, lp_d, lp_c)
    return TokenMetrics(ref=ref.cpu(), dense_argmax=d_arg.cpu(), comp_argmax=arg.cpu(),
                        kl=kl.float().cpu(), lp_dense=lp_d.cpu(), lp_comp=lp_c.cpu(),
                        n_new=ctx.new_tokens)


@torch.no_grad()
def cell_table(model, ctx: SweepContext, start: int) -> pd.DataFrame:
    """Per-prompt metric columns of ``model`` (compressed at layer ``start`` or later) against the
    dense model: the registered metrics on the same primitives as :func:`token_metrics`.

    Fast path, per position: argmax and max in one pass, log-sum-exp from that max, and
    KL(d || c) = sum_v p_d log p_d - (p_d @ W) . h_c - p_d . b + logsumexp(z_c).
    """
    head = model.get_output_embeddings()
    if head.weight is not ctx.head_weight:
        raise DTMError("The sweep's model has a different LM head from the one it was prepared "
                       "with.")
    fam = family_of(model)
    rows = []
    for b, idx in enumerate(ctx.batches):
        hidden = continuation_hidden(model, ctx, b, start)
        tm = concat([_chunk_tokens(model, fam, ctx, b, hidden[s:s + ROW_CHUNK],
                                   slice(s, s + ROW_CHUNK))
                     for s in range(0, len(hidden), ROW_CHUNK)], ctx.new_tokens)
        start_row = 0
        for i in idx:
            n = len(ctx.references[i])
            one = run_metrics(slice_tokens(tm, start_row, start_row + n), distributions=False)
            start_row += n
            rows.append({"prompt_index": i, **one.summary()})
    return pd.DataFrame(rows).sort_values("prompt_index").reset_index(drop=True)


def summarize_cell(t: pd.DataFrame) -> dict:
    """A cell's values: every registered aggregate over its per-prompt table."""
    agg = aggregate(t)
    return {k: agg[k] for k in aggregates() if k in agg}


# --------------------------------------------------------------------------------------------
# The on-disk store


def sweep_key(dense: LoadedModel, spec: str, prompt_ids, new_tokens: int, extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(json.dumps([dense.fingerprint, parse_spec(spec).key, new_tokens, METRIC_VERSION,
                         extra]).encode())
    h.update(json.dumps(prompt_ids).encode())
    return h.hexdigest()[:24]


class CellStore:
    """One JSON file per finished cell, written atomically (temporary file, then rename)."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "cells").mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / "cells" / f"{name}.json"

    def get(self, name: str) -> dict | None:
        try:
            return json.loads(self.path(name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, name: str, row: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder / "cells", prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            json.dump(row, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path(name))

    def write_meta(self, meta: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            json.dump(meta, fh, indent=2)
        os.replace(tmp, self.folder / "meta.json")


@dataclass
class SweepResult:
    table: pd.DataFrame
    key: str
    folder: Path
    computed: int
    reused: int
    stopped: bool = False
    whole: dict | None = None     # every selected component at once (``whole=True``)

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


def select_components(model, layers: str | None = None, kinds: str | None = None) -> list:
    """The components of a sweep: all, or those in layer ranges and a list of kinds (any kind a
    selection takes: fused slices such as ``q`` on Phi-3, one expert ``e0.down`` or every expert
    of a kind one by one, ``e*.down``)."""
    from .components import resolve

    spans = [p.strip() for p in (layers or "*").split(",") if p.strip()] or ["*"]
    wanted = [k.strip() for k in (kinds or "*").split(",") if k.strip()] or ["*"]
    return resolve(model, ",".join(f"{sp}.{k}" for sp in spans for k in wanted))


def sweep(dense: LoadedModel, spec: str, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
          *, layers: str | None = None, kinds: str | None = None, cache_dir=None,
          batch_size: int = 16, rank: int = 0, world: int = 1, wait_s: float = 7200.0,
          progress: Callable[[float, str], None] | None = None,
          stop: threading.Event | None = None, ctx: SweepContext | None = None,
          intactkv=None, calibration=None, whole: bool = False, store=None,
          lost_after_s: float = 30.0) -> SweepResult:
    """Compress each selected component alone with ``spec`` and measure it; resumable.

    With ``world`` > 1 and ``store`` (torchrun: the process group's c10d store, see
    :mod:`dtm_core.distributed`) the ranks take cells from a queue in the store, send finished
    cells through it, and take over the unfinished cells of a rank that stops beating for
    ``lost_after_s``; rank 0 returns the merged table. Without a store, rank r computes cells r,
    r + world, ... and rank 0 waits for the others' cells in a shared cell store.
    ``intactkv`` runs every cell with the dense pivot KV (stored under its own key).
    ``calibration`` (a :class:`~dtm_core.calibration.Calibration`, prompt texts or token
    sequences) feeds a method that needs statistics; default: the sweep's prompts. It is part of
    the cells' key, so a cell opened as a pair with the same calibration is the pair it measured.
    Each cell also records its component's relative weight error. ``whole``: also measure every
    selected component compressed at once (a second copy of their weights while it runs), for
    :meth:`SweepResult.additivity`.
    """
    ikv = IntactKV.parse(intactkv)
    if ctx is not None and ikv != ctx.intactkv:
        raise DTMError("The sweep context was prepared with a different IntactKV setting.")
    sp = parse_spec(spec)
    prompt_ids = [list(p) for p in prompt_ids]
    comps = select_components(dense.model, layers, kinds)
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
    note = progress or (lambda f, m: None)
    if world > 1 and store is not None:
        res = _queued_sweep(dense, sp, comps, prompt_ids, new_tokens, key, cells, store,
                            rank, world, lost_after_s, note, stop, ctx, ikv, calib, batch_size,
                            wait_s)
        if whole and rank == 0 and len(res.table) == len(comps) and comps:
            res.whole = _whole_cell(dense, sp, comps, prompt_ids, new_tokens, cells, ctx, ikv,
                                    calib, batch_size)
        return res
    todo = [c for k, c in enumerate(comps) if k % world == rank and cells.get(c.name) is None]
    computed, stopped = 0, False
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
    if rank == 0 and world > 1 and not stopped:
        deadline = time.time() + wait_s
        while any(cells.get(c.name) is None for c in comps):
            if time.time() > deadline:
                raise DTMError("Timed out waiting for the other ranks' sweep cells.")
            time.sleep(0.5)
    rows = [r for r in (cells.get(c.name) for c in comps) if r is not None]
    table = pd.DataFrame(rows, columns=cell_columns())
    all_at_once = None
    if whole and rank == 0 and not stopped and comps:
        all_at_once = _whole_cell(dense, sp, comps, prompt_ids, new_tokens, cells, ctx, ikv,
                                  calib, batch_size)
    return SweepResult(table=table, key=key, folder=cells.folder, computed=computed,
                       reused=len(rows) - computed, stopped=stopped, whole=all_at_once)


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
            werr = weight_error(dense.model, work, names)
        row = {"components": len(comps), **summary, "weight_error": werr,
               "new_tokens": new_tokens, "seconds": time.perf_counter() - t0}
        cells.put(wname, row)
    return row


def _cell_row(dense, work, ctx, sp, comp, calib) -> dict:
    """One cell: ``comp`` alone compressed with ``sp`` in ``work`` (restored after)."""
    t0 = time.perf_counter()
    with apply_recipe(work, Recipe.single(sp, comp.name), calib):
        summary = summarize_cell(cell_table(work, ctx, comp.layer))
        werr = weight_error(dense.model, work, comp.name)
    return {"layer": comp.layer, "kind": comp.kind, "component": comp.name,
            "params": comp.params, **summary, "weight_error": werr,
            "seconds": time.perf_counter() - t0}


def _queued_sweep(dense, sp, comps, prompt_ids, new_tokens, key, cells, store, rank, world,
                  lost_after_s, note, stop, ctx, ikv, calib, batch_size, wait_s) -> SweepResult:
    """A sweep's cells from the queue in the c10d store (:mod:`dtm_core.distributed`)."""
    from .distributed import CellQueue

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


CELL_OF_FORWARD = 0.64   # a cell's cost as a share of a full forward (bench/bench_sweep.py)


def estimate_seconds(dense: LoadedModel, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
                     cells: int) -> float:
    """Rough wall time of a sweep on this machine, without touching the model (a job may be using
    it): a forward of the prompt set (each prompt with N more tokens) costs about 2 x parameters
    x tokens operations at 0.7 of this device's measured matrix-multiply rate (what the default
    model's forward reaches on the 2-core machine here); a sweep costs 0.64 of that per cell, as measured, plus about three for the
    references and the dense pass."""
    tokens = sum(len(p) + new_tokens for p in prompt_ids)
    params = sum(p.numel() for p in dense.model.parameters())
    forward = 2.0 * params * tokens / (0.7 * _matmul_rate(str(model_device(dense.model))))
    return forward * (CELL_OF_FORWARD * cells + 3)


_RATES: dict[str, float] = {}


def _matmul_rate(device: str) -> float:
    """Floating-point operations per second of a float32 matrix multiply here (measured once)."""
    if device not in _RATES:
        a = torch.randn(256, 1024, device=device)
        b = torch.randn(1024, 1024, device=device)
        a @ b
        t0 = time.perf_counter()
        for _ in range(8):
            a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        _RATES[device] = 8 * 2 * 256 * 1024 * 1024 / max(time.perf_counter() - t0, 1e-9)
    return _RATES[device]


def heatmap_frame(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """layers x kinds matrix of one metric (kinds in model order)."""
    kinds = list(dict.fromkeys(table.kind))
    return table.pivot(index="layer", columns="kind", values=metric)[kinds]
