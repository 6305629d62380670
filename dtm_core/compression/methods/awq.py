"""``awq:intB[:gG][:asym]``: activation-aware weight quantization (AWQ, Lin et al., MLSys 2024).

The linears that read the same input (q/k/v of an attention block, gate/up of an MLP, observed by
:class:`~dtm_core.compression.calibration.Calibration`, so any family) share one per-input-channel scale
s = a^alpha / sqrt(max(a^alpha) min(a^alpha)), with a the mean |x| of each input channel over the
calibration tokens and alpha chosen from a grid of 20 exponents (0, 0.05, ..., 0.95) by the output
error of the whole group, sum over its linears of ||X W^T - X W_hat^T||^2 (computed exactly from
the input Hessian: n/2 tr(D H D^T) with D = W - W_hat). Each weight is quantized as Q(W diag(s)) on
the ``intB[:gG][:asym]`` grid.

The deployed model folds 1/s into the operation before the group (the norm: see
:func:`fold_scales`) and stores Q(W diag(s)); the function is the same as using
W_hat = Q(W diag(s)) diag(s)^-1 with the norm untouched, which is what a component gets here, so a
single component can be compressed while its peers and the norm stay dense. alpha = 0 is
round-to-nearest itself, so on the calibration inputs AWQ's group error is never above RTN's.
Weight clipping (AWQ's second search) is not done.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from dtm_core.errors import DTMError
from dtm_core.compression.methods.formats import OnFormatOrGrid, format_grid_of
from dtm_core.compression.methods.base import Method, need_stat
from dtm_core.compression.methods.registry import bad_spec, register
from dtm_core.compression.methods.rtn import (OnGrid, grid_method_at_level, grid_options,
                                              grid_suffix, leading_bits, quantize_weight)

GRID = 20


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr(D H D^T) with D = W - W_hat: the layer-output error on the calibration inputs, up to
    the factor n/2 of H = 2/n sum x x^T."""
    d = (w - w_hat).float()
    return float(((d @ h.float()) * d).sum(dtype=torch.float64))


def scales_at(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scales for one exponent (normalized as the reference does)."""
    s = absmean.float().clamp(min=1e-4).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_quantize(w: torch.Tensor, s: torch.Tensor, bits: int, group: int | None,
                 asym: bool, fmt=None, gscale: torch.Tensor | None = None) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1: the weight a model with the scales folded into its norm
    effectively uses (Q: the ``intB`` grid, or the format ``fmt`` under the global scale
    ``gscale`` of the scaled weights)."""
    if fmt is not None:
        from dtm_core.compression.methods.formats import fake_quantize_weight
        return fake_quantize_weight(w * s[None, :], fmt.weight_args(), gscale) / s[None, :]
    return quantize_weight(w * s[None, :], bits, group, asym) / s[None, :]


def _scaled_global_scale(weights, s, fmt):
    """NVFP4's global scale shared by the group's scaled weights (None for other grids)."""
    if fmt is None or fmt.per_tensor_bits == 0:
        return None
    from dtm_core.compression.methods.formats import global_scale
    return global_scale([w * s[None, :] for w in weights])


def search_scales(weights: Mapping[str, torch.Tensor], absmean: torch.Tensor, h: torch.Tensor,
                  bits: int, group: int | None, asym: bool, fmt=None) -> dict:
    """The group's best exponent on the grid: ``{"alpha", "scales", "errors"}`` (errors per
    exponent, summed over the group's matrices; with NVFP4 also the group's global scale)."""
    if not weights:
        raise DTMError("AWQ needs at least one weight matrix in a group.")
    h = h.to(next(iter(weights.values())).device)
    errors = []
    best = None
    for n in range(GRID):
        alpha = n / GRID
        s = scales_at(absmean, alpha).to(h.device)
        g = _scaled_global_scale(weights.values(), s, fmt)
        err = sum(output_error(w, awq_quantize(w, s, bits, group, asym, fmt, g), h)
                  for w in weights.values())
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s, g)
    return {"alpha": best[1], "scales": best[2], "errors": errors, "global_scale": best[3]}


@register
@dataclass(frozen=True)
class AWQ(OnFormatOrGrid, OnGrid, Method):
    bits: int = 4
    group: int | None = None
    asym: bool = False
    fmt: str | None = None            # a format's grid (nvfp4, mxfp4, fp8, ...) instead of intB
    name = "awq"
    forms = ("awq:intB[:gG][:asym]", "awq:FORMAT")
    summary = ("AWQ: per-input-channel scales searched on calibration activations, shared by the "
               "linears that read the same input (needs calibration)")
    family = "quantization"
    needs = ("input_absmean", "input_hessian")
    sequential = True
    shares_input = True
    level_axis = "bits"
    presets = ("awq:int4:g128",)
    level_methods = ("awq:int", "awq:int:g128")

    @classmethod
    def parse(cls, head, options, spec):
        fmt = format_grid_of(options[0] if options else "", spec)
        if fmt is not None:
            if options[1:]:
                raise bad_spec(spec, "awq on a format takes no further options")
            return cls(bits=fmt.element_bits, fmt=str(fmt))
        bits = leading_bits("awq", options, spec)
        group, asym = grid_options(options[1:], spec)
        return cls(bits=bits, group=group, asym=asym)

    def __str__(self) -> str:
        return f"awq:{self.fmt}" if self.fmt else \
            f"awq:int{self.bits}" + grid_suffix(self.group, self.asym)

    @property
    def level(self) -> float:
        return float(self.bits)

    def with_level(self, level: float) -> "AWQ":
        if self.fmt:
            return super().with_level(level)
        return AWQ(int(level), self.group, self.asym)

    @classmethod
    def at_level(cls, level: float, options: str = "") -> "AWQ":
        return grid_method_at_level(cls, level, options)

    def llmcompressor_scheme(self):
        return {"modifier": "AWQModifier", "group": {"weights": self.weight_scheme()}}

    def prepare_group(self, weights: Mapping[str, torch.Tensor], stats: Mapping) -> dict:
        """The scales of a group of (out, in) float32 matrices that read one input."""
        return search_scales(weights, need_stat(stats, "input_absmean", "awq"),
                             need_stat(stats, "input_hessian", "awq"), self.bits, self.group,
                             self.asym, self.format)

    def apply(self, w, stats, name=""):
        found = stats.get("group") if stats else None
        if found is None:      # alone: the group is this matrix
            found = self.prepare_group({name: w}, stats)
        g = found.get("global_scale")
        return awq_quantize(w, found["scales"].to(w.device, w.dtype), self.bits, self.group,
                            self.asym, self.format, g)


@torch.no_grad()
def fold_scales(model, layer: int, kind: str, s: torch.Tensor) -> list[str]:
    """Fold per-input-channel scales into layer ``layer`` in place, as a deployed AWQ model does:
    the norm whose output ``kind`` reads is divided by ``s`` and every kind of the layer that reads
    that norm has its weight's input columns multiplied by ``s`` (the function is unchanged up to
    rounding). Returns the kinds scaled."""
    from dtm_core.models.components import decoder_layers, family_of, get_path, resolve

    fam = family_of(model)
    norm_path = fam.input_norm(model.config, kind)
    if norm_path is None:
        raise DTMError(f"The input of '{kind}' in {fam.name}-family models comes from no norm "
                       "that a scale can be folded into.")
    norm = get_path(decoder_layers(model)[layer], norm_path)
    kinds = [k for k in fam.kinds_in(decoder_layers(model)[layer])
             if fam.input_norm(model.config, k) == norm_path]
    w = norm.weight
    s = s.to(w.device, torch.float32)
    w.copy_(((fam.norm_offset + w.float()) / s - fam.norm_offset).to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
    for k in kinds:
        comp = resolve(model, f"{layer}.{k}")[0]
        for m in comp.matrices(comp.weight.data):
            m.copy_((m.float() * s[None, :]).to(m.dtype))
    return kinds
