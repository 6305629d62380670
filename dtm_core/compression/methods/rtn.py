"""``intB[:gG][:asym]``: round-to-nearest weight quantization on a per-channel or per-group grid.

The grid (symmetric, or asymmetric with a zero point; per output channel or per group of G
consecutive input weights) is also the grid of GPTQ-like methods, which reuse :func:`quantize_weight`
and :func:`grid_options`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dtm_core.compression.methods.registry import register
from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.registry import bad_spec


def grid_params(x: torch.Tensor, bits: int, asym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of the grid of each row of x (rows are channels or groups); zero is 0
    on the symmetric grid."""
    if asym:
        qmax = 2 ** bits - 1
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.round(-lo / scale)
    scale = x.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.zeros_like(scale)


def on_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
            asym: bool) -> torch.Tensor:
    """x rounded to the nearest point of the grid (scale, zero)."""
    if asym:
        q = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
        return (q - zero) * scale
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


class IntGrid:
    """The ``intB[:gG][:asym]`` grid for column-by-column methods (GPTQ): a group's (scale, zero)
    from its current weights, and one column on that grid."""

    def __init__(self, bits: int, group: int | None = None, asym: bool = False):
        self.bits, self.group, self.asym = bits, group, asym

    def params(self, x: torch.Tensor):
        return grid_params(x, self.bits, self.asym)

    def quantize(self, col: torch.Tensor, params) -> torch.Tensor:
        return on_grid(col[:, None], *params, self.bits, self.asym)[:, 0]


def _quant_rows(x: torch.Tensor, bits: int, asym: bool) -> torch.Tensor:
    """Round-to-nearest fake quantization of each row of x (rows are channels or groups)."""
    return on_grid(x, *grid_params(x, bits, asym), bits, asym)


def quantize_weight(w: torch.Tensor, bits: int, group: int | None = None,
                    asym: bool = False) -> torch.Tensor:
    """Per output channel, or per group of G consecutive input weights (a shorter last group)."""
    rows, cols = w.shape
    if not group or group >= cols:
        return _quant_rows(w, bits, asym)
    full = cols // group * group
    parts = [_quant_rows(w[:, :full].reshape(rows, full // group, group), bits, asym)
             .reshape(rows, full)]
    if full < cols:
        parts.append(_quant_rows(w[:, full:], bits, asym))
    return torch.cat(parts, dim=1)


def grid_options(options: list[str], spec: str) -> tuple[int | None, bool]:
    """``gG`` and ``asym`` options (each at most once, group first), as (group, asym)."""
    group, asym = None, False
    for opt in options:
        mg = re.fullmatch(r"g(\d+)", opt)
        if mg and group is None and not asym and int(mg.group(1)) > 0:
            group = int(mg.group(1))
        elif opt == "asym" and not asym:
            asym = True
        else:
            raise bad_spec(spec, f"unknown option '{opt}'")
    return group, asym


SCALE_BITS = 16   # a group's scale is stored as float16 (GGUF blocks, compressed-tensors, GPTQ)


def grid_storage_bits(bits: int, group: int | None, asym: bool, cols: int) -> float:
    """Bits per weight of ``intB[:gG][:asym]`` on an (out, cols) matrix: B, plus per group (or per
    output channel) one float16 scale and, on the asymmetric grid, a B-bit zero point."""
    size = group if group and group < cols else cols
    return bits + (SCALE_BITS + (bits if asym else 0)) / size


def grid_scheme(bits: int, group: int | None, asym: bool) -> dict:
    """The grid as llm-compressor's (compressed-tensors') weight quantization arguments."""
    q = {"num_bits": int(bits), "type": "int", "symmetric": not asym}
    q.update({"strategy": "group", "group_size": int(group)} if group else
             {"strategy": "channel"})
    return q


def grid_torchao(bits: int, group: int | None, asym: bool) -> dict:
    """The grid as torchao's ``IntxWeightOnlyConfig`` (its symmetric scale is max|w| / (2^(B-1)
    - 1/2), a little finer than ours, max|w| / (2^(B-1) - 1))."""
    return {"config": "IntxWeightOnlyConfig",
            "kwargs": {"weight_dtype": f"int{bits}",
                       "granularity": {"PerGroup": group} if group else {"PerAxis": 0},
                       "mapping_type": "ASYMMETRIC" if asym else "SYMMETRIC"}}


def grid_suffix(group: int | None, asym: bool) -> str:
    return (f":g{group}" if group else "") + (":asym" if asym else "")


def leading_bits(name: str, options: list[str], spec: str) -> int:
    """The bit width of a method that takes a grid first (``gptq:int4:...``, ``awq:int4:...``)."""
    if not options or not re.fullmatch(r"int\d+", options[0]):
        raise bad_spec(spec, f"{name} takes a grid first, e.g. {name}:int4:g128")
    bits = int(options[0][3:])
    if not 2 <= bits <= 8:
        raise bad_spec(spec, "bit width must be 2-8")
    return bits


def grid_method_at_level(cls, level: float, options: str = ""):
    """A grid-first method at ``level`` bits: level-curve names are ``NAME:int`` or
    ``NAME:int:g128`` (the grid's bits come from the level)."""
    rest = options.split(":")[1:] if options.startswith("int") else \
        (options.split(":") if options else [])
    spec = ":".join([f"{cls.name}:int{int(level)}"] + rest)
    return cls.parse(cls.name, spec.split(":")[1:], spec)


LLAMA_CPP_TYPES = {8: ("q8_0", "q8_0"), 7: ("q8_0", "q8_0"), 6: ("q6_K", "q6_K"),
                   5: ("q5_0", "q5_1"), 4: ("q4_0", "q4_1"), 3: ("q3_K", "q3_K"),
                   2: ("q2_K", "q2_K")}   # bits -> (symmetric, asymmetric)


class OnGrid:
    """What a method on the ``intB[:gG][:asym]`` grid (``bits``, ``group``, ``asym`` fields)
    deploys as: its llama.cpp type, storage size, and torchao config."""

    def llama_cpp_type(self) -> str:
        return LLAMA_CPP_TYPES[self.bits][int(self.asym)]

    def storage_bits(self, cols, dtype_bits):
        return grid_storage_bits(self.bits, self.group, self.asym, cols)

    def torchao_config(self):
        """The grid in torchao (for GPTQ/AWQ applied with round-to-nearest: quantize the model
        ``--save`` wrote, whose weights already lie on this grid)."""
        return grid_torchao(self.bits, self.group, self.asym)


@register
@dataclass(frozen=True)
class RTN(OnGrid, Method):
    bits: int = 8
    group: int | None = None
    asym: bool = False
    name = "int"
    forms = ("intB", "intB:gG", "intB:asym", "intB:gG:asym")
    summary = "round-to-nearest weight quantization, per channel or per group of G inputs"
    family = "quantization"
    level_axis = "bits"
    presets = ("int8", "int4:g128", "int3:g64")
    level_methods = ("int", "int:g128")

    @classmethod
    def matches(cls, head: str) -> bool:
        return re.fullmatch(r"int\d+", head) is not None

    @classmethod
    def parse(cls, head, options, spec):
        bits = int(head[3:])
        if not 2 <= bits <= 8:
            raise bad_spec(spec, "bit width must be 2-8")
        group, asym = grid_options(options, spec)
        return cls(bits=bits, group=group, asym=asym)

    def __str__(self) -> str:
        return f"int{self.bits}" + grid_suffix(self.group, self.asym)

    @property
    def level(self) -> float:
        return float(self.bits)

    def with_level(self, level: float) -> "RTN":
        return RTN(bits=int(level), group=self.group, asym=self.asym)

    @classmethod
    def at_level(cls, level: float, options: str = "") -> "RTN":
        spec = f"int{int(level)}" + (f":{options}" if options else "")
        return cls.parse(f"int{int(level)}", options.split(":") if options else [], spec)

    def llmcompressor_scheme(self):
        return {"modifier": "QuantizationModifier",
                "group": {"weights": grid_scheme(self.bits, self.group, self.asym)}}

    def apply(self, w, stats, name=""):
        return quantize_weight(w, self.bits, self.group, self.asym)
