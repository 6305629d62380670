"""``none``: the compressed side equals the dense model (an identity pair, for checks)."""
from __future__ import annotations

from dataclasses import dataclass

from dtm_core.compression.methods.registry import register
from dtm_core.compression.methods.base import Method


@register
@dataclass(frozen=True)
class NoCompression(Method):
    name = "none"
    forms = ("none",)
    summary = "no change (an identical pair, for checks)"

    @property
    def changes_weights(self) -> bool:
        return False

    def storage_bits(self, cols, dtype_bits):
        return float(dtype_bits)

    def apply(self, w, stats, name=""):
        return w
