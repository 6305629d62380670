"""``kv:intB[:gG]``, ``kv:fp8[:tensor]``: KV-cache quantization (keys after the rotary embedding,
and values, quantized as they are stored; see :mod:`dtm_core.compression.kvcache`), on the cache
components ``LAYER.kcache`` / ``LAYER.vcache``.

- ``kv:intB`` (B = 2..8): each stored vector (one position, one KV head) symmetric absmax,
  scale = max|x| / (2^(B-1) - 1); ``kv:intB:gG`` the same per group of G along the head dimension.
- ``kv:fp8``: E4M3, one scale per position and head, max|x| / 448.
- ``kv:fp8:tensor``: E4M3 with one static scale per layer and cache, max|x| / 448 over the
  calibration prompts (engines' ``k_scale`` / ``v_scale``).

KIVI (keys per channel over groups of tokens, the most recent R tokens in full precision) is not
offered: a key's stored value then depends on how many tokens followed it (a group is quantized
once it is full, the residual window moves), so one teacher-forced pass cannot give every query
the cache it would have read, which this tool's exactness requires.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.registry import bad_spec, register

SCALE_BITS = 16      # a stored scale in the cache's 16-bit dtype


@register
@dataclass(frozen=True)
class KVQuant(Method):
    fmt: str = "int"              # int or fp8
    bits: int = 8
    group: int | None = None      # int: values per scale along the head dimension (None: all)
    static: bool = False          # fp8: one calibrated scale per layer and cache
    name = "kv"
    forms = ("kv:intB", "kv:intB:gG", "kv:fp8", "kv:fp8:tensor")
    summary = ("KV-cache quantization on LAYER.kcache / LAYER.vcache: keys (after RoPE) and values "
               "quantized as stored; intB per position and head (or groups of G), fp8 per position "
               "and head, fp8:tensor one calibrated scale per layer")
    family = "quantization"
    level_axis = "bits"
    presets = ("kv:int8", "kv:fp8", "kv:int4")
    level_methods = ("kv:int",)
    targets_cache: ClassVar[bool] = True

    @classmethod
    def parse(cls, head, options, spec):
        if not options:
            raise bad_spec(spec, "kv needs a format: kv:int4, kv:int8:g32, kv:fp8, kv:fp8:tensor")
        fmt, rest = options[0], options[1:]
        if fmt == "fp8":
            if rest == ["tensor"]:
                return cls("fp8", 8, None, True)
            if rest:
                raise bad_spec(spec, f"unknown kv:fp8 option '{rest[0]}' (tensor)")
            return cls("fp8", 8)
        if fmt == "kivi" or "kivi" in rest:
            raise bad_spec(spec, "KIVI is not offered: a key's stored value would depend on the "
                                 "tokens after it, which one teacher-forced pass cannot give each "
                                 "query (see the README)")
        if not (fmt.startswith("int") and fmt[3:].isdigit() and 2 <= int(fmt[3:]) <= 8):
            raise bad_spec(spec, f"'{fmt}' is not a KV format (int2..int8 or fp8)")
        group = None
        for opt in rest:
            if opt.startswith("g") and opt[1:].isdigit() and int(opt[1:]) > 0 and group is None:
                group = int(opt[1:])
            else:
                raise bad_spec(spec, f"unknown kv option '{opt}' (gG, a group size)")
        return cls("int", int(fmt[3:]), group)

    def __str__(self):
        if self.fmt == "fp8":
            return "kv:fp8" + (":tensor" if self.static else "")
        return f"kv:int{self.bits}" + (f":g{self.group}" if self.group else "")

    @property
    def changes_weights(self) -> bool:
        return False

    @property
    def needs_calibration(self) -> bool:
        return self.static

    @property
    def level(self) -> float:
        return float(self.bits)

    def with_level(self, level: float) -> "KVQuant":
        return KVQuant("int", int(round(level)), self.group)

    @classmethod
    def at_level(cls, level: float, options: str = "") -> "KVQuant":
        group = int(options[1:]) if options.startswith("g") and options[1:].isdigit() else None
        return cls("int", int(round(level)), group)

    def cache_bits(self, head_dim: int) -> float:
        """Bits per cached value, scales included (a 16-bit scale per vector or group; the
        static scale is once per layer)."""
        if self.static:
            return 8.0
        per = self.group or head_dim
        return float(self.bits) + SCALE_BITS / per

    def storage_bits(self, cols, dtype_bits):
        return None     # a cache holds no weights

    def quantizer(self, head_dim: int, absmax: float | None = None, where: str = ""):
        """The function that quantizes a (..., head_dim) tensor of cached vectors."""
        import torch

        from dtm_core.compression.kvcache import fp8_quantize, int_quantize
        from dtm_core.errors import DTMError

        if self.group and head_dim % self.group:
            raise DTMError(f"{self} groups {self.group} values of the head dimension, which is "
                           f"{head_dim} in {where or 'this model'}; pick a group size that "
                           f"divides {head_dim}.")
        if self.fmt == "int":
            return lambda x: int_quantize(x, self.bits, self.group)
        if not self.static:
            return fp8_quantize
        if absmax is None:
            raise DTMError(f"{self} needs calibration prompts for its static scales: give a "
                           "prompt set or --calibration.")
        scale = torch.tensor(absmax / 448.0 if absmax > 0 else 1.0)
        return lambda x: fp8_quantize(x, scale.to(x.device))

    def llama_cpp_type(self):
        return {8: "q8_0", 4: "q4_0"}.get(self.bits) if self.fmt == "int" else None
