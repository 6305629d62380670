"""``nvfp4[:a]``: NVIDIA's FP4 as compressed-tensors defines it (``NVFP4A16``; ``:a`` is
``NVFP4``, with NVFP4 activations): FP4 E2M1 values in groups of 16 along the input, each group
with an FP8 E4M3 scale, under one FP32 global scale per tensor that the linears deployed fused
(q/k/v, gate/up) share, as llm-compressor writes them. With ``:a`` the module's input is
quantized the same way: group scales computed on the fly, the global scale static, from the max
|x| of the calibration inputs."""
from __future__ import annotations

from dataclasses import dataclass


from dtm_core.compression.methods.base import Method, need_stat
from dtm_core.compression.methods.formats import (FormatMethod, activation_hook, fused_matrices,
                                                  preset_args)
from dtm_core.compression.methods.registry import bad_spec, register


@register
@dataclass(frozen=True)
class NVFP4(FormatMethod, Method):
    activations: bool = False
    name = "nvfp4"
    forms = ("nvfp4", "nvfp4:a")
    summary = ("NVFP4: FP4 E2M1 weights in groups of 16 with FP8 scales and an FP32 global scale "
               "(shared by q/k/v and gate/up); :a adds NVFP4 activations")
    presets = ("nvfp4",)
    element_bits = 4
    per_tensor_bits = 32

    @classmethod
    def parse(cls, head, options, spec):
        if options not in ([], ["a"]):
            raise bad_spec(spec, "nvfp4 takes ':a' (NVFP4 activations) or nothing")
        return cls(bool(options))

    def __str__(self):
        return "nvfp4:a" if self.activations else "nvfp4"

    @property
    def needs(self):
        return ("input_absmax",) if self.activations else ()

    @property
    def preset(self):
        return "NVFP4" if self.activations else "NVFP4A16"

    def weight_args(self):
        return preset_args(self.preset)

    def input_args(self):
        return preset_args("NVFP4", "input_activations") if self.activations else None

    def storage_bits(self, cols, dtype_bits):
        return 4.0 + 8.0 / 16         # an FP8 scale per 16 values (+ the global scale per tensor)

    def fused_stats(self, model, component):
        peers = fused_matrices(model, component)
        return None if peers is None else {"fused": peers}

    def runtime_hook_for(self, component, stats):
        if not self.activations:
            return None
        from compressed_tensors.quantization.utils import generate_gparam

        amax = need_stat(stats, "input_absmax", str(self)).max().reshape(1, 1)
        return activation_hook(self.input_args(), generate_gparam(-amax, amax))

    def runtime_hook(self):
        # the hook needs the calibration's input range: see runtime_hook_for
        return activation_hook(self.input_args()) if self.activations else None

    def llama_cpp_type(self):
        return "nvfp4"

    def torchao_config(self):
        return {"config": "NVFP4DynamicActivationNVFP4WeightConfig" if self.activations
                else "NVFP4WeightOnlyConfig", "kwargs": {}}


