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
