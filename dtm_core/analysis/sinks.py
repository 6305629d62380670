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

from dtm_core.models import hooks
from dtm_core.models.components import decoder_layers
from dtm_core.errors import DTMError
from dtm_core.models.families import family_of
from dtm_core.models.generation import model_device


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
    """Attention probabilities (heads, T, T) and decoder-layer outputs (T, H) of one sequence,
    all kept (for inspection and tests; :func:`sink_tables` reduces layer by layer instead)."""
    with hooks.outputs(decoder_layers(model), lambda h: h[0].float().cpu()) as outs, \
            eager_attention(model):
        res = model(input_ids=torch.tensor([list(ids)], device=model_device(model)),
                    output_attentions=True, use_cache=False)
    if not res.attentions or res.attentions[0] is None:
        raise DTMError("This model does not return attention weights.")
    return [a[0].float().cpu() for a in res.attentions], outs


@torch.no_grad()
def sink_tables(model, ids: Sequence[int], k: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layer, head, share) attention on the first ``k`` tokens, averaged over the queries after
    them; and (layer, pivot_max, other_max, median_abs, ratio) hidden-state magnitudes.

    Each layer's attention weights and output are reduced as soon as the layer has run, so memory
    stays at one layer's attention matrix (what eager attention materializes anyway), whatever the
    number of layers.
    """
    ids = list(ids)
    if k < 1 or len(ids) <= k:
        raise DTMError(f"The attention-sink view needs a prompt longer than the {k} pivot "
                       f"token{'s' * (k != 1)}; this one has {len(ids)}.")
    layers = decoder_layers(model)
    shares: list = [None] * len(layers)
    acts: list = [None] * len(layers)

    def attn_hook(li, module, args, out):
        w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if w is not None:
            shares[li] = w[0, :, k:, :k].float().sum(-1).mean(-1).cpu()

    def layer_hook(li, module, args, out):
        mag = hooks.hidden_of(out)[0].float().abs()
        rest = mag[k:]
        acts[li] = (float(mag[:k].max()), float(rest.max()), float(rest.median()))

    fam = family_of(model)
    with hooks.attached([fam.attention_module(layer) for layer in layers], attn_hook), \
            hooks.attached(layers, layer_hook), eager_attention(model):
        model(input_ids=torch.tensor([ids], device=model_device(model)), use_cache=False)
    if any(x is None for x in shares):
        raise DTMError("This model does not return attention weights.")
    rows = [{"layer": li, "head": h, "share": float(v)}
            for li, sh in enumerate(shares) for h, v in enumerate(sh)]
    act_rows = [{"layer": li, "pivot_max": pm, "other_max": om, "median_abs": med,
                 "ratio": pm / med if med > 0 else float("inf")}
                for li, (pm, om, med) in enumerate(acts)]
    return pd.DataFrame(rows), pd.DataFrame(act_rows)


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
