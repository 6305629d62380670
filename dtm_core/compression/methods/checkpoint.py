"""``from:PATH``: a component's weight taken from a compressed checkpoint of the same base
(de-quantized to float32, see :mod:`dtm_core.models.checkpoints`), everything else left dense.

In a sweep it answers which components of *this* checkpoint cause the divergence; on every
component at once it is the whole checkpoint (with the activation quantization the checkpoint's
format defines, reproduced per module where the format has one: compressed-tensors W8A8/FP8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dtm_core.errors import DTMError
from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.registry import bad_spec, register


@register
@dataclass(frozen=True)
class FromCheckpoint(Method):
    name = "from"
    forms = ("from:PATH",)
    summary = "each component's weight from a compressed checkpoint of the same base"
    family = "checkpoint"
    keeps_case = True
    path: str = ""

    @classmethod
    def parse(cls, head, options, spec):
        path = ":".join(options).strip()
        if not path:
            raise bad_spec(spec, "from: needs the checkpoint's path, e.g. from:./llama-w4a16")
        return cls(path=path)

    def __str__(self) -> str:
        return f"from:{self.path}"

    @property
    def key(self) -> str:
        from dtm_core.models.checkpoints import fingerprint

        return f"from:{fingerprint(self.path)}"

    def _weights(self):
        from dtm_core.models.load import checkpoint_weights

        return checkpoint_weights(self.path)

    def apply(self, w, stats, name=""):
        raise DTMError("from:PATH takes each component's weight from the checkpoint by its "
                       "module, so it applies to components of a model, not to a bare matrix.")

    def apply_at(self, w, stats, component, expert=None):
        name = f"{component.path}.{component.param}"
        weights = self._weights()
        full = weights.tensor(name)
        if full is None and weights.path is not None:
            # e.g. experts stored one module each, fused into one parameter by the architecture
            full = weights.fused(name)
        if full is None:
            raise DTMError(f"The checkpoint '{self.path}' has no tensor '{name}' for component "
                           f"{component.name}; is it a compression of this base model?")
        m = full[expert] if expert is not None else full
        m = m.t() if component.transposed else m
        if component.rows is not None:
            m = m[component.rows]
        if tuple(m.shape) != tuple(w.shape):
            raise DTMError(f"The checkpoint's {component.name} is shaped {tuple(m.shape)} but the "
                           f"base's is {tuple(w.shape)}; it is not a compression of this base.")
        return m.to(torch.float32)

    def runtime_hook_at(self, component):
        return self._weights().input_hook(component.path)
