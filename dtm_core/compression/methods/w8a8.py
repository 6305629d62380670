"""``w8a8``: int8 weights per channel and int8 activations per token (dynamic, symmetric); the
activation side is a forward pre-hook on the compressed module."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dtm_core.compression.methods.registry import register
from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.rtn import grid_scheme, grid_storage_bits, quantize_weight


def quantize_activation_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization (w8a8's activation side)."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)


def _act_quant_hook(module, args):
    return (quantize_activation_per_token(args[0]),) + tuple(args[1:])


@register
@dataclass(frozen=True)
class W8A8(Method):
    name = "w8a8"
    forms = ("w8a8",)
    summary = "int8 weights per channel and int8 activations per token"
    family = "quantization"
    presets = ("w8a8",)

    @property
    def bits(self) -> int:
        return 8

    @property
    def level(self) -> float:
        return 8.0

    def llama_cpp_type(self) -> str:
        return "q8_0"

    def storage_bits(self, cols, dtype_bits):
        return grid_storage_bits(8, None, False, cols)

    def llmcompressor_scheme(self):
        return {"modifier": "QuantizationModifier",
                "group": {"weights": grid_scheme(8, None, False),
                          "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                                "strategy": "token", "dynamic": True}}}

    def torchao_config(self):
        return {"config": "Int8DynamicActivationInt8WeightConfig", "kwargs": {}}

    def apply(self, w, stats, name=""):
        return quantize_weight(w, 8)

    def runtime_hook(self):
        return _act_quant_hook
