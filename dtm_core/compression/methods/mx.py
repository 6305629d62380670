"""``mxfp4`` and ``mxfp8``: the OCP microscaling formats as compressed-tensors defines them
(``MXFP4A16``, ``MXFP8A16``): FP4 E2M1 or FP8 E4M3 values in groups of 32 along the input, each
group with a power-of-two E8M0 scale (the format gpt-oss ships its experts in)."""
from __future__ import annotations

from dataclasses import dataclass

from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.formats import FormatMethod, preset_args
from dtm_core.compression.methods.registry import register


@dataclass(frozen=True)
class _MX(FormatMethod, Method):
    def weight_args(self):
        return preset_args(self.preset)

    def storage_bits(self, cols, dtype_bits):
        return self.element_bits + 8.0 / 32      # an 8-bit E8M0 scale per 32 values


@register
@dataclass(frozen=True)
class MXFP4(_MX):
    name = "mxfp4"
    forms = ("mxfp4",)
    summary = "MXFP4: FP4 E2M1 weights in groups of 32 with power-of-two (E8M0) scales"
    presets = ("mxfp4",)
    preset = "MXFP4A16"
    element_bits = 4

    def llama_cpp_type(self):
        return "mxfp4"

    def torchao_config(self):
        return {"config": "MXDynamicActivationMXWeightConfig",
                "kwargs": {"activation_dtype": "float4_e2m1fn_x2",
                           "weight_dtype": "float4_e2m1fn_x2"},
                "note": "torchao's MX config quantizes activations too (no weight-only MX)"}


@register
@dataclass(frozen=True)
class MXFP8(_MX):
    name = "mxfp8"
    forms = ("mxfp8",)
    summary = "MXFP8: FP8 E4M3 weights in groups of 32 with power-of-two (E8M0) scales"
    preset = "MXFP8A16"
    element_bits = 8

    def llama_cpp_type(self):
        return "q8_0"     # llama.cpp has no MXFP8 type; its 8-bit blocks are the nearest
