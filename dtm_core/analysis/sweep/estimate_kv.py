"""Estimated KV-cache cells: every layer's key or value cache's KL from one forward and one backward
pass of the dense model per batch, as :mod:`~dtm_core.analysis.sweep.estimate` does for weights.

A cache's entries are not shared weights but one variable per (prompt, position, KV head, head
dimension): quantizing them changes each entry by ``d = q(x) - x``, and the KL that causes is to
second order ``1/2 sum_e F_e d_e^2`` over the entries, ``F_e`` an entry's Fisher over every query
that reads it (its own position's included). The same random probes estimate it: the squared
gradient of ``sum u . z`` over a batch's continuation positions with respect to each stored entry.
The entries and their squared gradients are kept (on the model's device, float32: 2 x layers x
2 x prompts x KV heads x positions x head dimension numbers), so more kv specs over the same
prompts cost only their quantizers.

The gradient reaches an entry through every later layer: entries of the first layer, which no
trainable tensor precedes, are made leaves of the graph; every later entry depends on them and
stays in it.
"""
from __future__ import annotations

import json
import time

import torch



def cache_fisher(dense, prompt_ids, references, comps, *, batch_size: int = 16,
                 probe: str = "gauss", seed: int = 0) -> dict:
    """``{"entries": {name: [x per batch]}, "g2": {name: [squared gradient per batch]},
    "positions": continuation positions, "seconds": s}`` of the cache components ``comps``."""
    from dtm_core.analysis.sweep.probes import _probe, head_at, probe_batches
    from dtm_core.compression.kvcache import cache_hooks

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    out = {"entries": {c.name: [] for c in comps}, "g2": {c.name: [] for c in comps},
           "positions": 0}
    for x_ids, rows, pos in probe_batches(dense, prompt_ids, references, batch_size):
        seen: dict = {}

        def make(comp, own):
            def fn(x):
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                seen[comp.name] = x
                return x
            return fn
        with torch.enable_grad(), cache_hooks(comps, make), head_at(dense.model, rows, pos):
            z = dense.model(input_ids=x_ids, use_cache=False).logits[0].float()
            names = [c.name for c in comps if c.name in seen]
            grads = torch.autograd.grad((z * _probe(z, probe, gen)).sum(),
                                        [seen[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            x = seen[n].detach()
            out["entries"][n].append(x.float())
            out["g2"][n].append(torch.zeros_like(x, dtype=torch.float32) if g is None
                                else g.detach().float().square_())
        out["positions"] += len(rows)
        del z
    out["seconds"] = time.perf_counter() - t0
    return out


def cache_rows(dense, fisher: dict, spec, comps, calibration=None) -> list[dict]:
    """Each cache quantized alone with ``spec``: 1/2 sum F (q(x) - x)^2 / positions."""
    from dtm_core.compression.kvcache import head_dim
    from dtm_core.compression.recipe import cache_absmax

    absmax = cache_absmax(dense.model, [(c, spec) for c in comps], calibration)
    rows = []
    for c in comps:
        q = spec.quantizer(head_dim(dense.model, c), absmax.get((c.layer, c.kind)), c.name)
        s = sum(float((g * (q(x) - x).square()).sum(dtype=torch.float64))
                for x, g in zip(fisher["entries"][c.name], fisher["g2"][c.name]))
        rows.append({"layer": c.layer, "kind": c.kind, "component": c.name, "params": 0,
                     "kl_estimate": 0.5 * s / max(fisher["positions"], 1)})
    return rows


_LAST: dict = {}     # the last cache Fisher, for more kv specs over the same prompts


def cache_fisher_for(dense, prompt_ids, references, comps, batch_size, probe, seed) -> dict:
    key = (dense.fingerprint, json.dumps(prompt_ids), json.dumps(references), probe, seed,
           tuple(c.name for c in comps), batch_size)
    if _LAST.get("key") != key or _LAST.get("model") is not dense.model:
        _LAST.clear()
        _LAST.update(key=key, model=dense.model,
                     fisher=cache_fisher(dense, prompt_ids, references, comps,
                                         batch_size=batch_size, probe=probe, seed=seed))
    return _LAST["fisher"]
