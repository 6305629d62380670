"""``magnitude:S``: zero the fraction S of a matrix's weights with the smallest magnitude."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dtm_core.compression.methods.registry import register
from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.registry import bad_spec, parse_sparsity


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

    llmcompressor_modifier: ClassVar[str | None] = None   # a one-shot pruning modifier

    def llmcompressor_scheme(self):
        if self.llmcompressor_modifier is None:
            return None
        return {"modifier": self.llmcompressor_modifier,
                "args": {"sparsity": float(self.sparsity), "mask_structure": "0:0"}}

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

    def llmcompressor_scheme(self):
        """llm-compressor's magnitude pruning is a training schedule: one that starts and ends
        at step 0 prunes at once."""
        s = float(self.sparsity)
        return {"modifier": "MagnitudePruningModifier",
                "args": {"init_sparsity": s, "final_sparsity": s, "start": 0, "end": 0,
                         "update_frequency": 1}}

    def apply(self, w, stats, name=""):
        return magnitude_prune(w, self.sparsity)
