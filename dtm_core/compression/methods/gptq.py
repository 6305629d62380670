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
from dtm_core.compression.methods.obs import BLOCK, inverse_hessian_factor, lazy_batch, prepare
from dtm_core.compression.methods.registry import bad_spec, register
from dtm_core.compression.methods.rtn import (OnGrid, grid_method_at_level, grid_params,
                                              grid_scheme, grid_suffix, leading_bits, on_grid)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group: int | None = None,
                  asym: bool = False, act_order: bool = False, damp: float = 0.01,
                  name: str = "") -> torch.Tensor:
    """GPTQ of a float (out, in) matrix with input Hessian ``h`` (in, in)."""
    w, h = prepare(w, h)
    cols = w.shape[1]
    group = group if group and group < cols else None
    perm = None
    static = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        if group:   # static groups: each group's grid from the original weights, original order
            static = [grid_params(w[:, g:g + group], bits, asym) for g in range(0, cols, group)]
        w = w[:, perm]
        h = h[perm]           # one permutation at a time: never three Hessians at once
        h = h[:, perm]
    u, _ = inverse_hessian_factor(h, damp, name)
    params: list = [None]

    def fix(c, col, w1, i):
        if static is not None:
            scale, zero = static[int(perm[c]) // group]
        elif group:
            if c % group == 0:      # a new group: its grid on the up-to-date weights
                params[0] = grid_params(w1[:, i:i + group], bits, asym)
            scale, zero = params[0]
        else:
            if params[0] is None:
                params[0] = grid_params(w, bits, asym)   # per channel, on the original rows
            scale, zero = params[0]
        return on_grid(col[:, None], scale, zero, bits, asym)[:, 0]

    block = BLOCK if not group or static is not None else group * max(1, BLOCK // group)
    q = lazy_batch(w, u, fix, block)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q


@register
@dataclass(frozen=True)
class GPTQ(OnGrid, Method):
    bits: int = 4
    group: int | None = None
    asym: bool = False
    act: bool = False
    damp: float = 0.01
    name = "gptq"
    forms = ("gptq:intB[:gG][:asym][:act]",)
    summary = ("GPTQ: column-by-column quantization with Hessian error feedback (needs "
               "calibration)")
    family = "quantization"
    needs = ("input_hessian",)
    level_axis = "bits"
    presets = ("gptq:int4:g128",)
    level_methods = ("gptq:int", "gptq:int:g128")

    @classmethod
    def parse(cls, head, options, spec):
        bits = leading_bits("gptq", options, spec)
        group, asym, act, damp = None, False, False, 0.01
        seen = set()
        for opt in options[1:]:
            key = "g" if re.fullmatch(r"g\d+", opt) else "damp" if opt.startswith("damp") else opt
            if key in seen:
                raise bad_spec(spec, f"option '{opt}' given twice")
            seen.add(key)
            if key == "g" and int(opt[1:]) > 0:
                group = int(opt[1:])
            elif opt == "asym":
                asym = True
            elif opt == "act":
                act = True
            elif key == "damp":
                try:
                    damp = float(opt[4:])
                except ValueError:
                    raise bad_spec(spec, f"'{opt}' is not dampD with a number D") from None
                if not 0 < damp < 1:
                    raise bad_spec(spec, "dampening must lie in (0, 1)")
            else:
                raise bad_spec(spec, f"unknown option '{opt}'")
        return cls(bits=bits, group=group, asym=asym, act=act, damp=damp)

    def __str__(self) -> str:
        return (f"gptq:int{self.bits}" + grid_suffix(self.group, self.asym)
                + (":act" if self.act else "") + (f":damp{self.damp:g}" if self.damp != 0.01
                                                   else ""))

    @property
    def level(self) -> float:
        return float(self.bits)

    def with_level(self, level: float) -> "GPTQ":
        return GPTQ(int(level), self.group, self.asym, self.act, self.damp)

    @classmethod
    def at_level(cls, level: float, options: str = "") -> "GPTQ":
        return grid_method_at_level(cls, level, options)

    def llmcompressor_scheme(self):
        weights = grid_scheme(self.bits, self.group, self.asym)
        if self.act:
            weights["actorder"] = "static"     # act order with static groups, as ours
        return {"modifier": "GPTQModifier", "modifier_args": {"dampening_frac": self.damp},
                "group": {"weights": weights}}

    def apply(self, w, stats, name=""):
        h = need_stat(stats, "input_hessian", "gptq")
        return gptq_quantize(w, h.to(w.device), self.bits, self.group, self.asym, self.act,
                             self.damp, name)
