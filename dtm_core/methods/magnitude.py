"""``magnitude:S``: zero the fraction S of a matrix's weights with the smallest magnitude."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import register
from .base import Method
from .registry import bad_spec, parse_sparsity


def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly round(sparsity * numel) weights of smallest magnitude."""
    k = int(round(sparsity * w.numel()))
    out = w.clone(memory_format=torch.contiguous_format)
    if k > 0:
        idx = torch.topk(w.abs().flatten(), k, largest=False, sorted=False).indices
        out.view(-1)[idx] = 0
    return out


@dataclass(frozen=True)
class SparsityMethod(Method):
    """A pruning method with one sparsity parameter (``NAME:S``)."""

    sparsity: float = 0.5
    family = "pruning"
    level_axis = "sparsity"

    @classmethod
    def parse(cls, head, options, spec):
        if len(options) != 1:
            raise bad_spec(spec, f"{head} takes one sparsity")
        return cls(sparsity=parse_sparsity(spec, options[0]))

    def __str__(self) -> str:
        return f"{self.name}:{self.sparsity:g}"

    @property
    def level(self) -> float:
        return self.sparsity

    def with_level(self, level: float) -> "SparsityMethod":
        return type(self)(sparsity=float(level))

    @classmethod
    def at_level(cls, level: float, options: str = "") -> "SparsityMethod":
        if options:
            raise bad_spec(f"{cls.name}:{options}", f"{cls.name} level curves take no options")
        return cls(sparsity=float(level))


@register
@dataclass(frozen=True)
class Magnitude(SparsityMethod):
    name = "magnitude"
    forms = ("magnitude:S",)
    summary = "unstructured pruning of the smallest |w| in each matrix"
    presets = ("magnitude:0.5",)
    level_methods = ("magnitude",)

    def apply(self, w, stats, name=""):
        return magnitude_prune(w, self.sparsity)
