"""NVIDIA ModelOpt exports (``quant_method: modelopt``, ``hf_quant_config.json``): NVFP4 and FP8,
de-quantized into the base architecture here.

NVFP4: ``weight`` holds two FP4 E2M1 codes per byte (the first value in the low nibble),
``weight_scale`` one FP8 E4M3 scale per 16 inputs, ``weight_scale_2`` one FP32 scale per tensor:
w = e2m1 x weight_scale x weight_scale_2. ModelOpt's per-tensor scale is amax / (6 x 448), the
inverse of compressed-tensors' global scale (448 x 6 / amax), so the same weights are stored with
the reciprocal convention. ``input_scale`` is the activations' static per-tensor scale: their
NVFP4 global scale is its inverse, the group scales are computed on the fly.

FP8: ``weight`` in FP8 E4M3 with one FP32 ``weight_scale`` per tensor (w = weight x scale), and
static per-tensor FP8 activations x -> fp8(x / input_scale) x input_scale.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dtm_core.errors import DTMError
from dtm_core.models.checkpoints.base import (CheckpointWeights, Format, Shards, _kept_linears,
                                              register_format)

_EXTRAS = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale",
           "pre_quant_scale")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _algo(config: dict) -> str:
    q = config.get("quantization_config") or {}
    return str(q.get("quant_algo") or "").upper()


@register_format
class ModelOpt(Format):
    name = "modelopt"
    methods = ("modelopt",)
    transformers_loads = False
    can_dequantize = True

    def describe(self, path, config, info):
        q = config.get("quantization_config") or {}
        algo = _algo(config)
        info.format = algo.lower() or "modelopt"
        producer = q.get("producer") or {}
        info.algorithm = f"NVIDIA ModelOpt {producer.get('version', '')}".strip()
        mods = ModelOptWeights.quantized_modules(Shards(path))
        if algo == "NVFP4":
            words = (f"NVFP4: FP4 E2M1 weights in groups of {q.get('group_size', 16)}, FP8 E4M3 "
                     "group scales, one FP32 scale per tensor (weight_scale_2 = amax / (6 x 448), "
                     "the inverse of compressed-tensors' global scale)")
            info.activations = ("NVFP4 input activations: group scales on the fly, a static "
                                "per-tensor scale (input_scale; reproduced in the forward pass)")
        elif algo == "FP8":
            words = "FP8 per tensor: FP8 E4M3 weights, one FP32 scale per tensor"
            info.activations = ("FP8 static per-tensor input activations (input_scale; "
                                "reproduced in the forward pass)")
        else:
            raise DTMError(f"ModelOpt's {algo or 'unnamed'} export is not read here; DTM "
                           "Inspector reads its NVFP4 and FP8 exports.")
        info.groups.append(f"{words}, {len(mods)} linears")
        info.quantized = len(mods)
        info.kept = _kept_linears(path, set(mods))
        info.loader = "de-quantized into the base architecture by DTM Inspector (ModelOpt's layout)"

    def reader(self, path, config):
        return ModelOptWeights(path, config)


class ModelOptWeights(CheckpointWeights):
    """Each quantized linear's weight de-quantized in float32 from ModelOpt's tensors, and its
    static activation quantization as a forward pre-hook."""

    def __init__(self, path: Path, config: dict):
        self.shards = Shards(path)
        self.algo = _algo(config)
        if self.algo not in ("NVFP4", "FP8"):
            raise DTMError(f"ModelOpt's {self.algo or 'unnamed'} export is not read here; DTM "
                           "Inspector reads its NVFP4 and FP8 exports.")

    @staticmethod
    def quantized_modules(shards: Shards) -> list[str]:
        return [k[:-len(".weight_scale")] for k in shards.keys() if k.endswith(".weight_scale")]

    def names(self):
        return [k for k in self.shards.keys() if k.rpartition(".")[2] not in _EXTRAS]

    def tensor(self, name):
        if name not in self.shards:
            return None
        mod, _, p = name.rpartition(".")
        w = self.shards.get(name)
        if p != "weight" or f"{mod}.weight_scale" not in self.shards:
            return w.float()
        scale = self.shards.get(f"{mod}.weight_scale").float()
        if self.algo == "FP8":
            return w.float() * scale
        codes = torch.stack([w & 0x0F, w >> 4], -1).reshape(w.shape[0], -1).long()
        q = E2M1[codes]
        group = q.shape[1] // scale.shape[1]
        s2 = self.shards.get(f"{mod}.weight_scale_2").float()
        return (q.reshape(q.shape[0], -1, group) * (scale[..., None] * s2)).reshape(q.shape)

    def input_hook(self, module):
        """The module's static activation quantization by compressed-tensors' own forward: the
        NVFP4 preset's input arguments under the global scale 1 / input_scale (group scales on
        the fly), or the FP8 preset's static per-tensor ones with input_scale."""
        key = f"{module}.input_scale"
        if key not in self.shards:
            return None
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

        scale = self.shards.get(key).float()
        holder = torch.nn.Module()
        holder.quantization_status = QuantizationStatus.FROZEN
        if self.algo == "NVFP4":
            args = PRESET_SCHEMES["NVFP4"]["input_activations"]
            holder.input_global_scale = (1.0 / scale).reshape(1, 1)
        else:
            args = PRESET_SCHEMES["FP8"]["input_activations"]
            holder.input_scale = scale.reshape(1)

        def hook(m, inputs):
            x = inputs[0]
            for name in ("input_global_scale", "input_scale"):
                t = getattr(holder, name, None)
                if t is not None and t.device != x.device:
                    setattr(holder, name, t.to(x.device))
            return (forward_quantize(holder, x, "input", args),) + tuple(inputs[1:])
        return hook
