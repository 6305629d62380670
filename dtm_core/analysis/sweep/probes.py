"""Random probes of the logits' Fisher, shared by the weight and the KV-cache estimates
(:mod:`~dtm_core.analysis.sweep.estimate`, :mod:`~dtm_core.analysis.sweep.estimate_kv`)."""
from __future__ import annotations

import torch

PROBES = ("gauss", "sample", "argmax")


def _probe(z: torch.Tensor, probe: str, gen: torch.Generator) -> torch.Tensor:
    """(positions, V) probe vectors u with E[u u'] = diag(p) - p p' (``argmax``: the greedy
    token's score, onehot - p) for logits ``z``."""
    p = torch.softmax(z.detach().float(), -1)
    if probe == "gauss":
        e = torch.randn(p.shape, generator=gen, device="cpu").to(p.device)
        s = p.sqrt()
        return s * e - p * (s * e).sum(-1, keepdim=True)
    if probe == "sample":
        t = torch.multinomial(p.cpu(), 1, generator=gen).to(p.device)
    else:
        t = p.argmax(-1, keepdim=True)
    return torch.zeros_like(p).scatter_(-1, t, 1.0) - p


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
