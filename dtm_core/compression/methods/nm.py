"""``nm:N:M``: semi-structured pruning, N of every M consecutive input weights kept."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dtm_core.errors import DTMError
from dtm_core.compression.methods.registry import register
from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.registry import bad_spec


def nm_prune(w: torch.Tensor, n: int, m: int, name: str = "") -> torch.Tensor:
    """In every M consecutive weights along the input dimension keep the N largest."""
    rows, cols = w.shape
    if cols % m:
        raise DTMError(f"nm:{n}:{m} needs the input dimension to be a multiple of {m}, but "
                       f"{name or 'this weight'} has {cols} inputs.")
    g = w.reshape(rows, cols // m, m)
    keep = torch.topk(g.abs(), n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return (g * mask).reshape(rows, cols)


@register
@dataclass(frozen=True)
class NM(Method):
    n: int = 2
    m: int = 4
    name = "nm"
    forms = ("nm:N:M",)
    summary = "N:M semi-structured pruning along the input dimension (2:4 on sparse tensor cores)"
    family = "pruning"
    level_axis = "sparsity"
    presets = ("nm:2:4",)

    @classmethod
    def parse(cls, head, options, spec):
        if len(options) != 2 or not all(o.isdigit() for o in options):
            raise bad_spec(spec, "nm takes two integers N:M")
        n, m = int(options[0]), int(options[1])
        if not 0 < n < m or m > 256:
            raise bad_spec(spec, "nm needs 0 < N < M <= 256")
        return cls(n=n, m=m)

    def __str__(self) -> str:
        return f"nm:{self.n}:{self.m}"

    @property
    def level(self) -> float:
        return 1 - self.n / self.m

    def llmcompressor_scheme(self):
        s = 1 - self.n / self.m
        return {"modifier": "MagnitudePruningModifier",
                "args": {"init_sparsity": s, "final_sparsity": s, "start": 0, "end": 0,
                         "update_frequency": 1, "mask_structure": f"{self.n}:{self.m}"}}

    def apply(self, w, stats, name=""):
        return nm_prune(w, self.n, self.m, name)
