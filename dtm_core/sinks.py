"""Attention sinks and massive activations at the pivot tokens (what IntactKV protects).

For one prompt: per layer and head, the share of attention mass that queries after the first K
tokens put on those K tokens; per layer, the largest hidden-state magnitude at the pivot tokens
against the median magnitude elsewhere (Sun et al.'s "massive activations" signature).
Attention probabilities need the eager attention implementation, which this module switches on
for its own forward pass only.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import pandas as pd
import torch

from .components import decoder_layers
from .errors import DTMError
from .generation import model_device


@contextmanager
def eager_attention(model):
    """Temporarily use the eager attention implementation (the only one that returns weights)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before is not None and before != "eager":
            model.set_attn_implementation(before)


@torch.no_grad()
def attention_maps(model, ids: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Attention probabilities (heads, T, T) and decoder-layer outputs (T, H) of one sequence."""
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(
        lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0].float().cpu()))
        for layer in decoder_layers(model)]
    try:
        with eager_attention(model):
            res = model(input_ids=torch.tensor([list(ids)], device=model_device(model)),
                        output_attentions=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if not res.attentions or res.attentions[0] is None:
        raise DTMError("This model does not return attention weights.")
    return [a[0].float().cpu() for a in res.attentions], outs


def sink_tables(model, ids: Sequence[int], k: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layer, head, share) attention on the first ``k`` tokens, averaged over the queries after
    them; and (layer, pivot_max, other_max, median_abs, ratio) hidden-state magnitudes."""
    ids = list(ids)
    if k < 1 or len(ids) <= k:
        raise DTMError(f"The attention-sink view needs a prompt longer than the {k} pivot "
                       f"token{'s' * (k != 1)}; this one has {len(ids)}.")
    attn, hidden = attention_maps(model, ids)
    rows = []
    for li, a in enumerate(attn):
        share = a[:, k:, :k].sum(-1).mean(-1)       # heads
        rows += [{"layer": li, "head": h, "share": float(s)} for h, s in enumerate(share)]
    acts = []
    for li, h in enumerate(hidden):
        mag = h.abs()
        piv, rest = mag[:k].max(), mag[k:]
        med = float(rest.median())
        acts.append({"layer": li, "pivot_max": float(piv), "other_max": float(rest.max()),
                     "median_abs": med, "ratio": float(piv) / med if med > 0 else float("inf")})
    return pd.DataFrame(rows), pd.DataFrame(acts)


def pair_sinks(pair, ids: Sequence[int], k: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`sink_tables` for both models of a pair, with a ``model`` column (dense/compressed)."""
    parts_s, parts_a = [], []
    for name, model in (("dense", pair.dense.model), ("compressed", pair.compressed)):
        s, a = sink_tables(model, ids, k)
        s.insert(0, "model", name)
        a.insert(0, "model", name)
        parts_s.append(s)
        parts_a.append(a)
    return pd.concat(parts_s, ignore_index=True), pd.concat(parts_a, ignore_index=True)
