"""The dense side of a sweep, done once per prompt set: reference continuations, then one dense
pass recording every decoder layer's input (:class:`SweepContext`), and the dense half of the fast
path's KL (``p_dense @ W_head``, entropy, log p of the reference, argmax). A cell then reruns only
the layers from its component on (:func:`continuation_hidden`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from dtm_core.compression.intactkv import IntactKV, PivotCache, RecordingCache, pivot_source, right_pad_mask
from dtm_core.measure.divergence import reference_continuations
from dtm_core.measure.metrics import TOPK, needs_distributions
from dtm_core.models import hooks
from dtm_core.models.components import decoder_layers, tail_modules
from dtm_core.models.families import family_of
from dtm_core.models.generation import (check_lengths, head_logits, hidden_states_only,
                                        model_device, pad_id_of, plan_batches, teacher_forced,
                                        vocab_size)
from dtm_core.models.load import LoadedModel


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
    dense_top: list = field(default_factory=list)     # (sum L, TOPK) the dense top tokens
    dense_lp_top: list = field(default_factory=list)  # log p of the dense argmax, float64
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
        calls: list = []
        if ikv is None:
            with hooks.recording(layers, rec), hidden_states_only([dense.model], calls):
                teacher_forced(dense.model, seqs, pad)
        else:
            kb = [ks[i] for i in idx]
            t0 = max(kb)
            mask = right_pad_mask(kb, t0)
            if ikv.calibrated is None:   # dense weights with dense pivots: the dense pass itself
                kv = RecordingCache(dense.model.config, t0)
                with hooks.recording(layers, rec), hidden_states_only([dense.model], calls):
                    teacher_forced(dense.model, seqs, pad, use_cache=True, past_key_values=kv)
                source = pivot_source(ikv, kv, [0] * len(idx), t0, None)
                del kv
            else:
                # calibrated pivots change every layer's input, also before a cell's component:
                # record the dense weights' layer inputs under them; the metrics' reference stays
                # the plain dense pass
                with hidden_states_only([dense.model], calls):
                    teacher_forced(dense.model, seqs, pad)
                source = pivot_source(ikv, None, [0] * len(idx), t0,
                                      model_device(dense.model))
                with hooks.recording(layers, rec):
                    teacher_forced(dense.model, seqs, pad, use_cache=True,
                                   past_key_values=PivotCache(dense.model.config, mask, source))
        rows = torch.cat([torch.full((len(refs[i]),), j) for j, i in enumerate(idx)])
        pos = torch.cat([torch.arange(len(refs[i])) + len(prompt_ids[i]) - 1 for i in idx])
        hidden = calls.pop()
        dev = hidden.device
        ctx.layer_inputs.append(rec)
        ctx.rows.append(rows.to(dev))
        ctx.pos.append(pos.to(dev))
        ref = torch.cat([torch.tensor(refs[i], dtype=torch.long) for i in idx]).to(dev)
        ctx.refs.append(ref)
        # the continuation positions' logits a chunk at a time (no T x V logits for long N)
        parts = [_dense_side(dense.model, hidden[rows[a:a + ROW_CHUNK].to(dev),
                                                 pos[a:a + ROW_CHUNK].to(dev)],
                             ref[a:a + ROW_CHUNK], head if fast else None)
                 for a in range(0, len(ref), ROW_CHUNK)]
        for name, out in (("dense_argmax", ctx.dense_argmax), ("dense_top", ctx.dense_top),
                          ("dense_lp_top", ctx.dense_lp_top), ("dense_lp_ref", ctx.dense_lp_ref)):
            out.append(torch.cat([p[name] for p in parts]))
        if fast:
            ctx.dense_pw.append(torch.cat([p["pw"] for p in parts]))
            ctx.dense_pb.append(None if head.bias is None
                                else torch.cat([p["pb"] for p in parts]))
            ctx.dense_negent.append(torch.cat([p["negent"] for p in parts]))
        else:
            ctx.dense_logits.append(torch.cat([p["z"] for p in parts]))
        if ikv is not None:
            ctx.pivot_sources.append((mask.to(dev), source))
            ctx.pivot_rows.append(
                pos < torch.cat([torch.full((len(refs[i]),), ks[i]) for i in idx]).to(dev))
        del hidden
    return ctx


ROW_CHUNK = 256     # continuation positions whose dense logits are formed at once


def _dense_side(model, hidden: torch.Tensor, ref: torch.Tensor, head=None) -> dict:
    """The dense half of the metrics at some continuation positions, from their final hidden
    states: argmax, top-K, log p of the top and of the reference; with a linear ``head`` the
    fast path's ``p_dense @ W``, ``p_dense . b`` and negative entropy, else the logits."""
    z = head_logits(model, hidden)
    d = torch.log_softmax(z.double(), -1)   # float64: see token_metrics
    out = {"dense_argmax": z.argmax(-1), "dense_top": z.topk(min(TOPK, z.shape[-1]), -1).indices,
           "dense_lp_top": d.max(-1).values, "dense_lp_ref": d.gather(-1, ref[:, None])[:, 0]}
    if head is None:
        out["z"] = z
        return out
    p = d.exp()
    # sum_v p_d(v) z_c(v) = (p_d @ W) . h_c for a linear head: an H-vector per position
    # replaces the vocabulary-sized dense distribution in every cell (vocabulary in blocks, so
    # no float64 copy of the whole head is made)
    dev = z.device
    pw = torch.zeros((len(p), head.weight.shape[1]), dtype=torch.float64, device=dev)
    for v in range(0, head.weight.shape[0], 8192):
        pw += p[:, v:v + 8192] @ head.weight[v:v + 8192].to(dev, torch.float64)
    out["pw"] = pw
    out["pb"] = None if head.bias is None else p @ head.bias.to(dev, torch.float64)
    out["negent"] = torch.where(p > 0, p * d, torch.zeros_like(d)).sum(-1)
    return out


@torch.no_grad()
def continuation_hidden(model, ctx: SweepContext, b: int, start: int) -> torch.Tensor:
    """(sum L, H) final hidden states at batch ``b``'s continuation positions when layers
    ``start``.. of ``model`` run on the recorded inputs."""
    args, kwargs = ctx.layer_inputs[b][start]
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = None
    if ctx.intactkv is not None:
        mask, source = ctx.pivot_sources[b]
        cache = PivotCache(model.config, mask, source, model)
    for i, layer in enumerate(decoder_layers(model)[start:], start):
        args, kwargs = ctx.layer_inputs[b][i]
        if cache is not None:
            args, kwargs = hooks.layer_call(layer, args, kwargs, cache)
        hidden = hooks.run_layer(layer, hidden, args, kwargs)
    for mod in tail_modules(model):
        hidden = mod(hidden)
    return hidden[ctx.rows[b], ctx.pos[b]]
