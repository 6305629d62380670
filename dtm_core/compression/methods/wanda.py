"""``wanda:S`` (Sun et al., ICLR 2024): prune by |W| x ||X_j||_2 within each output row; the input
norms come from calibration prompts (:mod:`dtm_core.compression.calibration`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dtm_core.compression.methods.registry import register
from dtm_core.compression.methods.base import need_stat
from dtm_core.compression.methods.magnitude import SparsityMethod


def wanda_prune(w: torch.Tensor, sparsity: float, in_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: score |W| * ||X_j||_2, prune the lowest scores of each output row."""
    rows, cols = w.shape
    k = int(round(sparsity * cols))
    out = w.clone()
    if k > 0:
        score = w.abs() * in_norm.to(w)[None, :]
        idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        out.scatter_(1, idx, 0.0)
    return out


@register
@dataclass(frozen=True)
class Wanda(SparsityMethod):
    name = "wanda"
    forms = ("wanda:S",)
    summary = "pruning by |w| x input-activation norm per output row (needs calibration)"
    needs = ("input_norms",)
    sequential = True
    presets = ("wanda:0.5",)
    llmcompressor_modifier = "WandaPruningModifier"
    level_methods = ("wanda",)

    def apply(self, w, stats, name=""):
        return wanda_prune(w, self.sparsity, need_stat(stats, "input_norms", "wanda"))
