"""``w4afp8``: compressed-tensors' ``W4AFP8``: symmetric int4 weights in groups of 128 with dynamic
per-token FP8 activations at the module's input."""
from __future__ import annotations

from dataclasses import dataclass

from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.formats import FormatMethod, preset_args
from dtm_core.compression.methods.registry import register
from dtm_core.compression.methods.rtn import grid_storage_bits


@register
@dataclass(frozen=True)
class W4AFP8(FormatMethod, Method):
    name = "w4afp8"
    forms = ("w4afp8",)
    summary = "int4 weights in groups of 128 with dynamic per-token FP8 activations"
    preset = "W4AFP8"
    element_bits = 4

    def weight_args(self):
        return preset_args("W4AFP8")

    def input_args(self):
        return preset_args("W4AFP8", "input_activations")

    def storage_bits(self, cols, dtype_bits):
        return grid_storage_bits(4, 128, False, cols)

    def llama_cpp_type(self):
        return "q4_0"

    def torchao_config(self):
        return {"config": "Float8DynamicActivationInt4WeightConfig", "kwargs": {}}
