"""``sparsegpt:S`` and ``sparsegpt:N:M``: SparseGPT (Frantar & Alistarh, ICML 2023).

From the layer-input Hessian (``input_hessian``, dampened by 1 % of its mean diagonal), columns are
fixed one at a time and each column's pruning error is spread over the columns not yet fixed (the
same lazy-batch OBS update as GPTQ). The mask is adaptive: per block of 128 columns, the
round(S x block size) weights of smallest w^2 / [H^-1]_jj^2 on the block's up-to-date weights are
pruned; with N:M, in every M consecutive inputs of a row the M - N smallest scores are pruned when
the loop reaches them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dtm_core.compression.methods.base import Method, need_stat
from dtm_core.compression.methods.obs import BLOCK, inverse_hessian_factor, lazy_batch, prepare
from dtm_core.compression.methods.registry import bad_spec, parse_sparsity, register


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5, n: int = 0,
                    m: int = 0, damp: float = 0.01, name: str = "") -> torch.Tensor:
    """SparseGPT of a float (out, in) matrix: unstructured at ``sparsity``, or N:M when n > 0."""
    w, h = prepare(w, h)
    u, _ = inverse_hessian_factor(h, damp, name)
    d = torch.diag(u)
    mask = torch.zeros_like(w, dtype=torch.bool)    # True = pruned

    def start_block(i1, i2, w1):
        if n:
            return
        score = w1 ** 2 / d[i1:i2][None, :] ** 2
        k = int(round(sparsity * score.numel()))
        if k:
            idx = torch.topk(score.flatten(), k, largest=False).indices
            block = torch.zeros(score.numel(), dtype=torch.bool, device=w.device)
            block[idx] = True
            mask[:, i1:i2] = block.view(score.shape)

    def fix(c, col, w1, i):
        if n and c % m == 0:
            score = w1[:, i:i + m] ** 2 / d[c:c + m][None, :] ** 2
            drop = torch.topk(score, m - n, dim=1, largest=False).indices
            mask[:, c:c + m].scatter_(1, drop, True)
        return torch.where(mask[:, c], torch.zeros_like(col), col)

    return lazy_batch(w, u, fix, BLOCK, start_block)


@register
@dataclass(frozen=True)
class SparseGPT(Method):
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    name = "sparsegpt"
    forms = ("sparsegpt:S", "sparsegpt:N:M")
    summary = "SparseGPT: OBS pruning with an adaptive mask and error feedback (needs calibration)"
    family = "pruning"
    needs = ("input_hessian",)
    sequential = True
    level_axis = "sparsity"
    presets = ("sparsegpt:0.5",)
    level_methods = ("sparsegpt",)

    @classmethod
    def parse(cls, head, options, spec):
        if len(options) == 1:
            return cls(sparsity=parse_sparsity(spec, options[0]))
        if len(options) == 2 and all(o.isdigit() for o in options):
            n, m = int(options[0]), int(options[1])
            if not 0 < n < m or m > 256 or BLOCK % m:
                raise bad_spec(spec, "sparsegpt N:M needs 0 < N < M and M dividing 128")
            return cls(sparsity=1 - n / m, n=n, m=m)
        raise bad_spec(spec, "sparsegpt takes a sparsity S or N:M")

    def __str__(self) -> str:
        return f"sparsegpt:{self.n}:{self.m}" if self.n else f"sparsegpt:{self.sparsity:g}"

    @property
    def level(self) -> float:
        return self.sparsity

    def with_level(self, level: float) -> "SparseGPT":
        return SparseGPT(sparsity=float(level))

    @classmethod
    def at_level(cls, level: float, options: str = "") -> "SparseGPT":
        if options:
            raise bad_spec(f"sparsegpt:{options}", "sparsegpt level curves take no options")
        return cls(sparsity=float(level))

    def llmcompressor_scheme(self):
        return {"modifier": "SparseGPTModifier",
                "args": {"sparsity": float(self.sparsity),
                         "mask_structure": f"{self.n}:{self.m}" if self.n else "0:0"}}

    def apply(self, w, stats, name=""):
        if self.n and w.shape[1] % self.m:
            from dtm_core.errors import DTMError
            raise DTMError(f"{self} needs the input dimension to be a multiple of {self.m}, but "
                           f"{name or 'this weight'} has {w.shape[1]} inputs.")
        h = need_stat(stats, "input_hessian", "sparsegpt")
        return sparsegpt_prune(w, h.to(w.device), self.sparsity, self.n, self.m, name=name)
