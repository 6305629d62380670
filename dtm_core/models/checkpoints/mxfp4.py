"""transformers' MXFP4 checkpoints (``quant_method: mxfp4``: gpt-oss as OpenAI ships it),
de-quantized into the base architecture here.

Each quantized 3-D experts parameter ``P`` (``gate_up_proj``, ``down_proj``; held by the model as
``(experts, in, out)``) is stored as ``P_blocks`` (uint8, ``(experts, out, in / 32, 16)``: two FP4
E2M1 codes per byte, the first value in the low nibble) and ``P_scales`` (uint8,
``(experts, out, in / 32)``: E8M0 exponents, 127 = 2^0): w = e2m1 x 2^(scale - 127), in groups of
32 along the input, the OCP MX format. transformers' kernels need triton (and run MXFP4 only on
recent GPUs); on a CPU it falls back to de-quantizing into bfloat16. Here the tensors are
de-quantized by transformers' own converter (``convert_moe_packed_tensors``) into float32, where
every value is exact (an E2M1 value times a power of two), and loaded as a plain model: a
weight-only format, so its forward pass is the checkpoint's function up to the kernels' rounding.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dtm_core.models.checkpoints.base import (CheckpointWeights, Format, Shards, _shorten,
                                              register_format)

_BLOCKS, _SCALES = "_blocks", "_scales"


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``P`` as the architecture holds it, in float32, from its ``P_blocks`` and ``P_scales``
    (transformers' own de-quantization, at float32)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


@register_format
class TransformersMXFP4(Format):
    name = "mxfp4"
    methods = ("mxfp4",)
    transformers_loads = False
    can_dequantize = True

    def describe(self, path, config, info):
        q = config.get("quantization_config") or {}
        shards = Shards(path)
        packed = [k[:-len(_BLOCKS)] for k in shards.keys() if k.endswith(_BLOCKS)]
        info.format = "MXFP4"
        info.algorithm = None
        info.groups.append(
            "MXFP4 (transformers' layout, as gpt-oss ships): FP4 E2M1 weights in groups of 32 "
            "along the input, E8M0 power-of-two scales (*_blocks / *_scales), "
            f"{len(packed)} tensors" + (f" ({', '.join(_shorten(packed)[:3])})" if packed else ""))
        info.quantized = len(packed)
        info.kept = list(q.get("modules_to_not_convert") or [])
        info.activations = "weights only (the MXFP4 kernels compute in bfloat16)"
        info.loader = ("de-quantized into the base architecture by transformers' "
                       "convert_moe_packed_tensors, in float32 (exact)")

    def reader(self, path, config):
        return MXFP4Weights(path)


class MXFP4Weights(CheckpointWeights):
    """The checkpoint's tensors under the model's names, the MXFP4 ones de-quantized exactly."""

    def __init__(self, path: Path):
        self.shards = Shards(path)

    def names(self):
        out = []
        for k in self.shards.keys():
            if k.endswith(_BLOCKS):
                out.append(k[:-len(_BLOCKS)])
            elif not (k.endswith(_SCALES) and f"{k[:-len(_SCALES)]}{_BLOCKS}" in self.shards):
                out.append(k)
        return out

    def tensor(self, name):
        if f"{name}{_BLOCKS}" in self.shards:
            return dequantize_mxfp4(self.shards.get(f"{name}{_BLOCKS}"),
                                    self.shards.get(f"{name}{_SCALES}"))
        return self.shards.get(name).float() if name in self.shards else None
