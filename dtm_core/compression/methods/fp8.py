"""``fp8[:tensor|:block128][:dyn]``: FP8 E4M3 weights as compressed-tensors defines them: one scale
per output channel (``FP8_DYNAMIC``'s weights), per tensor (``FP8``'s) or per 128x128 block
(``FP8_BLOCK``'s, a partial block padded with zeros); ``:dyn`` adds the preset's dynamic FP8
activations at the module's input: per token (``FP8_DYNAMIC``), per group of 128 for blocks
(``FP8_BLOCK``)."""
from __future__ import annotations

from dataclasses import dataclass

from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.formats import SCALE_BITS, FormatMethod, preset_args
from dtm_core.compression.methods.registry import bad_spec, register

_WEIGHTS = {"channel": "FP8_DYNAMIC", "tensor": "FP8", "block128": "FP8_BLOCK"}
_ACTS = {"channel": "FP8_DYNAMIC", "tensor": "FP8_DYNAMIC", "block128": "FP8_BLOCK"}


@register
@dataclass(frozen=True)
class FP8(FormatMethod, Method):
    granularity: str = "channel"      # channel, tensor or block128
    dynamic: bool = False             # dynamic FP8 activations at the input
    name = "fp8"
    forms = ("fp8", "fp8:tensor", "fp8:block128", "fp8[...]:dyn")
    summary = ("FP8 E4M3 weights, one scale per output channel, per tensor or per 128x128 block; "
               ":dyn adds dynamic FP8 activations (per token; per 128 for blocks)")
    presets = ("fp8",)
    element_bits = 8

    @classmethod
    def parse(cls, head, options, spec):
        gran, dyn = "channel", False
        for opt in options:
            if opt in ("tensor", "block128") and gran == "channel" and not dyn:
                gran = opt
            elif opt == "dyn" and not dyn:
                dyn = True
            else:
                raise bad_spec(spec, f"unknown fp8 option '{opt}' (tensor, block128, dyn)")
        return cls(gran, dyn)

    def __str__(self):
        return "fp8" + ("" if self.granularity == "channel" else f":{self.granularity}") + \
            (":dyn" if self.dynamic else "")

    @property
    def preset(self):
        if self.dynamic:
            return {"channel": "FP8_DYNAMIC", "block128": "FP8_BLOCK"}.get(self.granularity)
        return None

    def weight_args(self):
        return preset_args(_WEIGHTS[self.granularity])

    def input_args(self):
        return preset_args(_ACTS[self.granularity], "input_activations") if self.dynamic else None

    def storage_bits(self, cols, dtype_bits):
        per = {"channel": cols, "tensor": None, "block128": 128 * 128}[self.granularity]
        return 8.0 + (SCALE_BITS / per if per else 0.0)

    @property
    def per_tensor_bits(self) -> int:
        return SCALE_BITS if self.granularity == "tensor" else 0

    def llama_cpp_type(self):
        return "q8_0"     # llama.cpp has no FP8 type; its 8-bit blocks are the nearest

    def torchao_config(self):
        if self.dynamic:
            gran = {"channel": {"PerRow": None}, "tensor": {"PerTensor": None}}.get(self.granularity)
            if gran is None:
                return None
            return {"config": "Float8DynamicActivationFloat8WeightConfig",
                    "kwargs": {"granularity": gran}}
        return {"config": "Float8WeightOnlyConfig", "kwargs": {}} \
            if self.granularity == "channel" else None
