"""A sweep cell's output error of its component: SQNR (dB) and cosine error of the compressed
component's output against the dense one, on the inputs the component sees in the cell's own pass.

With one component compressed, everything before it is dense, so its inputs are exactly the dense
model's; the dense output is the same module called again on the same inputs (taken before any of
the spec's input hooks, such as dynamic activation quantization) with the dense parameter swapped
back in. Scored at the positions the metrics score (the continuation positions); a slice of a
fused weight (``q`` inside ``qkv``) is scored on its own output rows; an experts component on the
experts module's combined output.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from dtm_core.models.components import resolve

COLUMNS = ("output_sqnr_db", "output_cos_error")


class OutputError:
    """Running sums over scored positions: Σ|y|², Σ|y - y'|², Σ (1 - cos(y, y')), count."""

    def __init__(self):
        self.signal = self.noise = self.cos = 0.0
        self.n = 0
        self.rows = self.pos = None      # the scored positions of the batch being run
        self.batch_shape = (0, 0)        # (batch, positions) of that batch

    def add(self, y: torch.Tensor, y_c: torch.Tensor) -> None:
        y, y_c = y.double(), y_c.double()
        self.signal += float(y.pow(2).sum())
        self.noise += float((y - y_c).pow(2).sum())
        cos = torch.nn.functional.cosine_similarity(y, y_c, dim=-1, eps=1e-30)
        self.cos += float((1 - cos).sum())
        self.n += len(y)

    def values(self) -> dict:
        if self.n == 0:
            return {c: float("nan") for c in COLUMNS}
        sqnr = (10 * math.log10(self.signal / self.noise) if self.noise > 0
                else float("inf"))
        return {"output_sqnr_db": sqnr, "output_cos_error": self.cos / self.n}


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return next(t for t in out if isinstance(t, torch.Tensor))


def _scored(y: torch.Tensor, acc: OutputError) -> torch.Tensor:
    """The rows of a module output at the scored positions, as (n, features)."""
    b, t = acc.batch_shape
    if y.dim() >= 3 and y.shape[0] == b and y.shape[1] == t:
        return y[acc.rows, acc.pos].reshape(len(acc.rows), -1)
    if y.dim() == 2 and y.shape[0] == b * t:            # experts: tokens flattened
        return y[acc.rows * t + acc.pos]
    return y.reshape(-1, y.shape[-1])


@contextmanager
def measuring(dense_model, work, name: str, acc: OutputError):
    """While open, every call of component ``name``'s module in ``work`` (compressed) adds its
    output error against the dense parameter of ``dense_model`` to ``acc``."""
    comp = resolve(work, name)[0]
    dense_param = getattr(resolve(dense_model, name)[0].module, comp.param)
    mod, shape = comp.module, {}

    def pre(m, args, kwargs):
        shape["call"] = (args, kwargs)         # before the spec's input hooks

    def post(m, args, kwargs, out):
        args0, kwargs0 = shape.pop("call", (args, kwargs))
        if acc.rows is None:
            return
        cur = getattr(m, comp.param)
        setattr(m, comp.param, dense_param)
        try:
            with torch.no_grad():
                ref = _first_tensor(m.forward(*args0, **kwargs0))
        finally:
            setattr(m, comp.param, cur)
        y_c = _first_tensor(out)
        y, y_c = _scored(ref, acc), _scored(y_c, acc)
        if comp.rows is not None and comp.experts is None:
            y, y_c = y[:, comp.rows.to(y.device)], y_c[:, comp.rows.to(y.device)]
        acc.add(y, y_c)

    h1 = mod.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    h2 = mod.register_forward_hook(post, with_kwargs=True)
    try:
        yield acc
    finally:
        h1.remove()
        h2.remove()
