"""Random probes of the logits' Fisher, shared by the weight and the KV-cache estimates
(:mod:`~dtm_core.analysis.sweep.estimate`, :mod:`~dtm_core.analysis.sweep.estimate_kv`)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

PROBES = ("gauss", "sample", "argmax")


def _probe(z: torch.Tensor, probe: str, gen: torch.Generator) -> torch.Tensor:
    """(positions, V) probe vectors u with E[u u'] = diag(p) - p p' (``argmax``: the greedy
    token's score, onehot - p) for logits ``z``."""
    p = torch.softmax(z.detach().float(), -1)
    if probe == "gauss":     # in place: the (positions, V) tensors are the probe's whole cost
        se = torch.randn(p.shape, generator=gen, device="cpu").to(p.device).mul_(p.sqrt())
        return se.addcmul_(p, se.sum(-1, keepdim=True), value=-1.0)
    if probe == "sample":    # inverse CDF: one uniform a position (multinomial costs 7x more)
        c = p.cumsum(-1)
        r = torch.rand((len(p), 1), generator=gen, device="cpu").to(p.device) * c[:, -1:]
        t = torch.searchsorted(c, r, right=True).clamp_(max=p.shape[-1] - 1)
    else:
        t = p.argmax(-1, keepdim=True)
    return p.neg_().scatter_add_(-1, t, torch.ones_like(t, dtype=p.dtype))


@contextmanager
def head_at(model, rows: torch.Tensor, pos: torch.Tensor):
    """The model's LM head applied only at (row, position) pairs while in the block: logits
    come out (1, len(rows), V), equal to the full logits there (the family's post-processing,
    such as Gemma's soft-capping, still follows the head). The probes read only continuation
    positions, so the head's forward and backward shrink to those."""
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(
        lambda mod, args: (args[0][rows, pos].unsqueeze(0), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def probe_batches(dense, prompt_ids, references, batch_size: int):
    """Per batch of prompt + reference sequences (right-padded, on the model's device): the input
    ids and, for every continuation position of the batch, its row and position (the logits
    there are what the probes read). Batches without continuation positions are skipped."""
    from dtm_core.models.generation import (model_device, pad_id_of, plan_batches,
                                            right_padded, vocab_size)

    full = [list(p) + list(r) for p, r in zip(prompt_ids, references)]
    pad, dev = pad_id_of(dense.tokenizer), model_device(dense.model)
    for idx in plan_batches([len(s) for s in full], vocab_size(dense.model), batch_size):
        rows = torch.cat([torch.full((len(references[i]),), j) for j, i in enumerate(idx)])
        pos = torch.cat([torch.arange(len(references[i])) + len(prompt_ids[i]) - 1
                         for i in idx])
        if len(rows):
            yield (right_padded([full[i] for i in idx], pad).to(dev), rows.to(dev),
                   pos.to(dev))
