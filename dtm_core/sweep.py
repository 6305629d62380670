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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from . import METRIC_VERSION
from .compress import Recipe, apply_recipe, parse_spec
from .components import all_components, decoder_layers, family_of, tail_modules
from .divergence import pad_id_of, reference_continuations
from .errors import DTMError
from .generation import check_lengths, model_device, plan_batches, teacher_forced, vocab_size
from .models import LoadedModel, cache_root
from .pair import input_norms, shared_copy

CELL_COLUMNS = ["layer", "kind", "component", "params", "fdt_mean", "fdt_median", "fdt_p25",
                "sdt_mean", "kl_mean", "ppl_change", "seconds"]
METRICS = {"fdt_mean": "mean FDT", "fdt_median": "median FDT", "fdt_p25": "p25 FDT",
           "sdt_mean": "SDT", "kl_mean": "KL", "ppl_change": "perplexity change"}


@dataclass
class SweepContext:
    """Dense-side work shared by every cell of a sweep over one prompt set."""

    prompt_ids: list[list[int]]
    references: list[list[int]]
    new_tokens: int
    batches: list[list[int]]
    layer_inputs: list[list[tuple[tuple, dict]]]   # per batch, per layer: (args, kwargs)
    rows: list[torch.Tensor]        # per batch: (row, position) of every continuation logit
    pos: list[torch.Tensor]
    dense_pw: list[torch.Tensor]    # per batch: (sum L, H) p_dense @ W_head (and @ bias, below)
    dense_pb: list                  # per batch: (sum L,) p_dense . b_head, or None
    dense_negent: list[torch.Tensor]  # sum_v p log p per position,
    dense_lp_ref: list[torch.Tensor]  # and the log-probability of the reference token
    refs: list[torch.Tensor]        # per batch: (sum L,) reference tokens
    head_weight: torch.Tensor = None  # the LM head weight the expectations were taken with
    intactkv: object = None         # IntactKV, or None
    pivot_sources: list = None      # per batch: (mask (B, T0), source(layer) -> (K, V))
    pivot_rows: list = None         # per batch: indices into sum L of pivot positions (K = P)
    dense_agree: list = None        # per batch: dense argmax == reference (for pivot rows)


@torch.no_grad()
def prepare(dense: LoadedModel, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
            batch_size: int = 16, references=None, intactkv=None) -> SweepContext:
    """Reference continuations, then one dense pass recording every decoder layer's input.

    With ``intactkv`` the pass also keeps the dense K/V of the pivot tokens, which every cell's
    compressed layers then see (exactly as :func:`divergence` with the same IntactKV).
    """
    from .intactkv import IntactKV, PivotCache, pivot_source, right_pad_mask

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
    if not isinstance(head, torch.nn.Linear):
        raise DTMError("Sweeps need a linear LM head (Llama, GPT-2 and OPT families have one).")
    ctx = SweepContext(prompt_ids, refs, new_tokens, batches, [], [], [], [], [], [], [], [],
                       head.weight, ikv, [], [], [])
    for idx in batches:
        seqs = [full[i] for i in idx]
        rec: list = [None] * len(layers)
        if ikv is None:
            with _recording(layers, rec):
                logits = teacher_forced(dense.model, seqs, pad).logits
        else:
            kb = [ks[i] for i in idx]
            t0 = max(kb)
            mask = right_pad_mask(kb, t0)
            if ikv.calibrated is None:   # dense weights with dense pivots: the dense pass itself
                with _recording(layers, rec):
                    out = teacher_forced(dense.model, seqs, pad, use_cache=True)
                logits = out.logits
                source = pivot_source(ikv, out.past_key_values, [0] * len(idx), t0, None)
                del out
            else:
                # calibrated pivots change every layer's input, also before a cell's component:
                # record the dense weights' layer inputs under them; the metrics' reference stays
                # the plain dense pass
                logits = teacher_forced(dense.model, seqs, pad).logits
                source = pivot_source(ikv, None, [0] * len(idx), t0,
                                      model_device(dense.model))
                with _recording(layers, rec):
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
        p = d.exp()
        ref = torch.cat([torch.tensor(refs[i], dtype=torch.long) for i in idx]).to(dev)
        # sum_v p_d(v) z_c(v) = (p_d @ W) . h_c for a linear head: an H-vector per position
        # replaces the vocabulary-sized dense distribution in every cell (vocabulary in blocks,
        # so no float64 copy of the whole head is made)
        pw = torch.zeros((len(p), head.weight.shape[1]), dtype=torch.float64, device=dev)
        for v in range(0, head.weight.shape[0], 8192):
            pw += p[:, v:v + 8192] @ head.weight[v:v + 8192].to(dev, torch.float64)
        ctx.dense_pw.append(pw)
        ctx.dense_pb.append(None if head.bias is None else p @ head.bias.to(dev, torch.float64))
        ctx.dense_negent.append(torch.where(p > 0, p * d, torch.zeros_like(d)).sum(-1))
        ctx.dense_lp_ref.append(d.gather(-1, ref[:, None])[:, 0].cpu())
        ctx.refs.append(ref)
        if ikv is not None:
            ctx.pivot_sources.append((mask.to(dev), source))
            piv = (pos < torch.cat([torch.full((len(refs[i]),), ks[i]) for i in idx]).to(dev))
            where = piv.nonzero()[:, 0]
            ctx.pivot_rows.append(where.cpu())
            ctx.dense_agree.append((z.argmax(-1) == ref).cpu())
        del logits, z, d, p
    return ctx


def _call_with_cache(layer, args: tuple, kwargs: dict, cache) -> tuple[tuple, dict]:
    """The recorded call of a decoder layer with ``past_key_values`` set to ``cache`` (None: no
    cache, and none kept alive by the recording)."""
    import inspect

    names = list(inspect.signature(layer.forward).parameters)
    if "past_key_values" in names and names.index("past_key_values") < len(args):
        args = list(args)
        args[names.index("past_key_values")] = cache
        return tuple(args), {**kwargs, "use_cache": cache is not None}
    return args, {**kwargs, "past_key_values": cache, "use_cache": cache is not None}


@contextmanager
def _recording(layers, rec: list):
    """Record each decoder layer's call (args, kwargs) into ``rec`` during a forward pass."""
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: rec.__setitem__(i, _call_with_cache(m, a, dict(kw), None)),
        with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def continuation_hidden(model, ctx: SweepContext, b: int, start: int) -> torch.Tensor:
    """(sum L, H) final hidden states at batch ``b``'s continuation positions when layers
    ``start``.. of ``model`` run on the recorded inputs."""
    args, kwargs = ctx.layer_inputs[b][start]
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = None
    if ctx.intactkv is not None:
        from .intactkv import PivotCache
        mask, source = ctx.pivot_sources[b]
        cache = PivotCache(model.config, mask, source)
    for i, layer in enumerate(decoder_layers(model)[start:], start):
        args, kwargs = ctx.layer_inputs[b][i]
        if cache is not None:
            args, kwargs = _call_with_cache(layer, args, kwargs, cache)
        if args:
            out = layer(hidden, *args[1:], **kwargs)
        else:
            out = layer(**{**kwargs, "hidden_states": hidden})
        hidden = out[0] if isinstance(out, tuple) else out
    for mod in tail_modules(model):
        hidden = mod(hidden)
    return hidden[ctx.rows[b], ctx.pos[b]]


ROW_CHUNK = 128  # LM-head rows per step: each chunk's logits are reduced while still in cache


@torch.no_grad()
def cell_table(model, ctx: SweepContext, start: int) -> pd.DataFrame:
    """Per-prompt FDT, SDT, KL and perplexities of ``model`` (compressed at layer ``start`` or
    later) against the dense model: the definitions of :func:`token_metrics`, vectorized.

    Per position: argmax and max in one pass, log-sum-exp from that max, and
    KL(d || c) = sum_v p_d log p_d - (p_d @ W) . h_c - p_d . b + logsumexp(z_c).
    """
    head = model.get_output_embeddings()
    if head.weight is not ctx.head_weight:
        raise DTMError("The sweep's model has a different LM head from the one it was prepared "
                       "with.")
    rows = []
    for b, idx in enumerate(ctx.batches):
        hidden = continuation_hidden(model, ctx, b, start)
        agree, kl, lp_c = [], [], []
        for s in range(0, len(hidden), ROW_CHUNK):
            sl = slice(s, s + ROW_CHUNK)
            h = hidden[sl]
            logits = head(h).float()
            ref = ctx.refs[b][sl]
            top, arg = logits.max(-1)
            agree.append(arg == ref)
            z_ref = logits.gather(-1, ref[:, None])[:, 0].double()
            # exp and its (cascade) sum in float32 are accurate to ~1e-7 for terms <= 1; the KL
            # below is a difference of terms the size of the logits, so it is formed in float64
            lse = top.double() + logits.sub_(top[:, None]).exp_().sum(-1).double().log_()
            dot = torch.linalg.vecdot(ctx.dense_pw[b][sl], h.double())
            if ctx.dense_pb[b] is not None:
                dot = dot + ctx.dense_pb[b][sl]
            kl.append(ctx.dense_negent[b][sl] - dot + lse)
            lp_c.append(z_ref - lse)
        agree = torch.cat(agree).cpu()
        kl = torch.cat(kl).clamp(min=0).cpu()
        lp_c = torch.cat(lp_c).cpu()
        lp_d = ctx.dense_lp_ref[b]
        if ctx.intactkv is not None and len(ctx.pivot_rows[b]):
            # positions inside the pivot span are the dense model's (K = whole prompt)
            piv = ctx.pivot_rows[b]
            agree[piv] = ctx.dense_agree[b][piv]
            kl[piv] = 0.0
            lp_c[piv] = lp_d[piv]
        sizes = [len(ctx.references[i]) for i in idx]
        for i, a, k, ld, lc in zip(idx, agree.split(sizes), kl.split(sizes), lp_d.split(sizes),
                                   lp_c.split(sizes)):
            bad = (~a).nonzero()
            rows.append({"prompt_index": i,
                         "fdt": int(bad[0, 0]) if len(bad) else ctx.new_tokens,
                         "sdt": int((~a).sum()) / len(a), "kl_mean": float(k.mean()),
                         "ppl_dense": float(torch.exp(-ld.mean())),
                         "ppl_compressed": float(torch.exp(-lc.mean()))})
    return pd.DataFrame(rows).sort_values("prompt_index").reset_index(drop=True)


def summarize_cell(t: pd.DataFrame) -> dict:
    fdt = t.fdt.to_numpy(float)
    return {"fdt_mean": float(fdt.mean()), "fdt_median": float(np.median(fdt)),
            "fdt_p25": float(np.percentile(fdt, 25)), "sdt_mean": float(t.sdt.mean()),
            "kl_mean": float(t.kl_mean.mean()),
            "ppl_change": float((t.ppl_compressed / t.ppl_dense - 1).mean())}


# --------------------------------------------------------------------------------------------
# The on-disk store


def sweep_key(dense: LoadedModel, spec: str, prompt_ids, new_tokens: int, extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(json.dumps([dense.fingerprint, str(parse_spec(spec)), new_tokens, METRIC_VERSION,
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


def select_components(model, layers: str | None = None, kinds: str | None = None) -> list:
    """The components of a sweep: all, or those in a layer range and a list of kinds."""
    comps = all_components(model)
    fam = family_of(model)
    if kinds:
        wanted = [k.strip() for k in kinds.split(",") if k.strip()]
        bad = [k for k in wanted if k not in fam.kinds]
        if bad:
            raise DTMError(f"Unknown kind(s) {', '.join(bad)}: valid kinds are "
                           f"{', '.join(fam.kinds)}.")
        comps = [c for c in comps if c.kind in wanted]
    if layers:
        from .components import parse_selection
        names = set(parse_selection(",".join(f"{part.strip()}.*" for part in layers.split(",")),
                                    model))
        comps = [c for c in comps if c.name in names]
    return comps


def sweep(dense: LoadedModel, spec: str, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
          *, layers: str | None = None, kinds: str | None = None, cache_dir=None,
          batch_size: int = 16, rank: int = 0, world: int = 1, wait_s: float = 7200.0,
          progress: Callable[[float, str], None] | None = None,
          stop: threading.Event | None = None, ctx: SweepContext | None = None,
          intactkv=None) -> SweepResult:
    """Compress each selected component alone with ``spec`` and measure it; resumable.

    With ``world`` > 1 (torchrun), rank r computes cells r, r + world, ...; rank 0 then waits for
    the other ranks' cells in the shared store and returns the merged table.
    ``intactkv`` runs every cell with the dense pivot KV (stored under its own key).
    """
    from .intactkv import IntactKV, calibration_fingerprint

    ikv = IntactKV.parse(intactkv)
    if ctx is not None and ikv != ctx.intactkv:
        raise DTMError("The sweep context was prepared with a different IntactKV setting.")
    sp = parse_spec(spec)
    prompt_ids = [list(p) for p in prompt_ids]
    comps = select_components(dense.model, layers, kinds)
    extra = "" if ikv is None else f"intactkv={ikv.label}|{calibration_fingerprint(ikv)}"
    key = sweep_key(dense, spec, prompt_ids, new_tokens, extra)
    store = CellStore(cache_root(cache_dir) / "sweeps" / key)
    store.write_meta({"model": dense.source, "fingerprint": dense.fingerprint, "spec": str(sp),
                      "new_tokens": new_tokens, "prompts": len(prompt_ids),
                      "intactkv": None if ikv is None else ikv.label,
                      "metric_version": METRIC_VERSION})
    note = progress or (lambda f, m: None)
    todo = [c for k, c in enumerate(comps) if k % world == rank and store.get(c.name) is None]
    computed, stopped = 0, False
    if todo:
        ctx = ctx or prepare(dense, prompt_ids, new_tokens, batch_size, intactkv=ikv)
        work = shared_copy(dense.model)   # compressed in place, one cell at a time
        work_comps = {c.name: c for c in all_components(work)}
        norms = None
        if sp.needs_calibration:
            norms = input_norms(dense.model, [c.path for c in todo], prompt_ids)
        for n, comp in enumerate(todo):
            if stop is not None and stop.is_set():
                stopped = True
                break
            t0 = time.perf_counter()
            with apply_recipe(work, Recipe.single(sp, comp.name), norms):
                summary = summarize_cell(cell_table(work, ctx, comp.layer))
            row = {"layer": comp.layer, "kind": comp.kind, "component": comp.name,
                   "params": work_comps[comp.name].params, **summary,
                   "seconds": time.perf_counter() - t0}
            store.put(comp.name, row)
            computed += 1
            note((n + 1) / len(todo), f"{comp.name}: mean FDT {summary['fdt_mean']:.1f}")
    if rank == 0 and world > 1 and not stopped:
        deadline = time.time() + wait_s
        while any(store.get(c.name) is None for c in comps):
            if time.time() > deadline:
                raise DTMError("Timed out waiting for the other ranks' sweep cells.")
            time.sleep(0.5)
    rows = [r for r in (store.get(c.name) for c in comps) if r is not None]
    table = pd.DataFrame(rows, columns=CELL_COLUMNS)
    return SweepResult(table=table, key=key, folder=store.folder, computed=computed,
                       reused=len(rows) - computed, stopped=stopped)


def heatmap_frame(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """layers x kinds matrix of one metric (kinds in model order)."""
    kinds = list(dict.fromkeys(table.kind))
    return table.pivot(index="layer", columns="kind", values=metric)[kinds]
