"""``gptq:intB[:gG][:asym][:act][:dampD]``: GPTQ (Frantar et al., ICLR 2023) on the grid of ``intB``.

Per linear, from H = 2/n sum x x^T of its calibration inputs (``input_hessian``), dampened by D
(default 0.01) x mean(diag H): columns are quantized one at a time on the same grid as ``intB``
(per output channel, or per group of G inputs; symmetric or with a zero point) and each column's
error is spread over the columns not yet quantized through the upper Cholesky factor of H^-1, in
lazy-batch blocks of 128 columns (whole groups per block, so a group's grid is found on its
up-to-date weights). ``:act`` quantizes columns in order of decreasing diag H with static groups
(each group's grid found on the original weights, in the original column order).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dtm_core.compression.methods.base import Method, need_stat
from dtm_core.compression.methods.formats import OnFormatOrGrid, format_grid_of
from dtm_core.compression.methods.obs import BLOCK, inverse_hessian_factor, lazy_batch, prepare
from dtm_core.compression.methods.registry import bad_spec, register
from dtm_core.compression.methods.rtn import (IntGrid, OnGrid, grid_method_at_level,
                                              grid_suffix, leading_bits)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group: int | None = None,
                  asym: bool = False, act_order: bool = False, damp: float = 0.01,
                  name: str = "", grid=None) -> torch.Tensor:
    """GPTQ of a float (out, in) matrix with input Hessian ``h`` (in, in), on the ``intB`` grid
    (``bits``, ``group``, ``asym``) or on ``grid`` (a format's
    :class:`~dtm_core.compression.methods.formats.FormatGrid`, with its own group size)."""
    grid = grid if grid is not None else IntGrid(bits, group, asym)
    w, h = prepare(w, h)
    cols = w.shape[1]
    group = grid.group if grid.group and grid.group < cols else None
    perm = None
    static = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        if group:   # static groups: each group's grid from the original weights, original order
            static = [grid.params(w[:, g:g + group]) for g in range(0, cols, group)]
        w = w[:, perm]
        h = h[perm]           # one permutation at a time: never three Hessians at once
        h = h[:, perm]
    u, _ = inverse_hessian_factor(h, damp, name)
    params: list = [None]

    def fix(c, col, w1, i):
        if static is not None:
            p = static[int(perm[c]) // group]
        elif group:
            if c % group == 0:      # a new group: its grid on the up-to-date weights
                params[0] = grid.params(w1[:, i:i + group])
            p = params[0]
        else:
            if params[0] is None:
                params[0] = grid.params(w)   # per channel (or tensor), on the original rows
            p = params[0]
        return grid.quantize(col, p)

    block = BLOCK if not group or static is not None else group * max(1, BLOCK // group)
    q = lazy_batch(w, u, fix, block)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q


@register
@dataclass(frozen=True)
class GPTQ(OnFormatOrGrid, OnGrid, Method):
    bits: int = 4
    group: int | None = None
    asym: bool = False
    act: bool = True                  # act-order with static groups, llm-compressor's default
    damp: float = 0.01
    fmt: str | None = None            # a format's grid (nvfp4, mxfp4, fp8, ...) instead of intB
    name = "gptq"
    forms = ("gptq:intB[:gG][:asym][:noact]", "gptq:FORMAT[:noact]")
    summary = ("GPTQ: column-by-column quantization with Hessian error feedback, act-order on "
               "unless :noact (needs calibration); FORMAT: nvfp4, mxfp4, mxfp8, fp8")
    family = "quantization"
    needs = ("input_hessian",)
    sequential = True
    level_axis = "bits"
    presets = ("gptq:int4:g128",)
    level_methods = ("gptq:int", "gptq:int:g128")

    @classmethod
    def parse(cls, head, options, spec):
        fmt = format_grid_of(options[0] if options else "", spec)
        bits = fmt.element_bits if fmt is not None else leading_bits("gptq", options, spec)
        group, asym, act, damp = None, False, True, 0.01
        seen = set()
        for opt in options[1:]:
            key = "g" if re.fullmatch(r"g\d+", opt) else "damp" if opt.startswith("damp") else \
                "act" if opt in ("act", "noact") else opt
            if key in seen:
                raise bad_spec(spec, f"option '{opt}' given twice")
            seen.add(key)
            if key == "g" and int(opt[1:]) > 0 and fmt is None:
                group = int(opt[1:])
            elif opt == "asym" and fmt is None:
                asym = True
            elif opt in ("act", "noact"):
                act = opt == "act"
            elif key == "damp":
                try:
                    damp = float(opt[4:])
                except ValueError:
                    raise bad_spec(spec, f"'{opt}' is not dampD with a number D") from None
                if not 0 < damp < 1:
                    raise bad_spec(spec, "dampening must lie in (0, 1)")
            else:
                raise bad_spec(spec, f"unknown option '{opt}'")
        return cls(bits=bits, group=group, asym=asym, act=act, damp=damp,
                   fmt=None if fmt is None else str(fmt))

    def __str__(self) -> str:
        grid = self.fmt if self.fmt else f"int{self.bits}" + grid_suffix(self.group, self.asym)
        return (f"gptq:{grid}" + ("" if self.act else ":noact")
                + (f":damp{self.damp:g}" if self.damp != 0.01 else ""))

    @property
    def level(self) -> float:
        return float(self.bits)

    def with_level(self, level: float) -> "GPTQ":
        if self.fmt:
            return super().with_level(level)
        return GPTQ(int(level), self.group, self.asym, self.act, self.damp)

    @classmethod
    def at_level(cls, level: float, options: str = "") -> "GPTQ":
        return grid_method_at_level(cls, level, options)

    def llmcompressor_scheme(self):
        weights = self.weight_scheme()
        if self.act:
            weights["actorder"] = "static"     # act order with static groups, as ours
        return {"modifier": "GPTQModifier", "modifier_args": {"dampening_frac": self.damp},
                "group": {"weights": weights}}

    def fused_stats(self, model, component):
        return self.format.fused_stats(model, component) if self.fmt else None

    def apply(self, w, stats, name=""):
        h = need_stat(stats, "input_hessian", "gptq")
        grid = None
        if self.fmt:
            from dtm_core.compression.methods.formats import FormatGrid, global_scale
            peers = stats.get("fused")
            grid = FormatGrid(self.format.weight_args(), global_scale(peers or [w]))
        return gptq_quantize(w, h.to(w.device), self.bits, self.group, self.asym, self.act,
                             self.damp, name, grid=grid)
