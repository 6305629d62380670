"""torchao checkpoints: loaded through transformers with torchao (optional package)."""
from __future__ import annotations

from dtm_core.models.checkpoints.base import Format, _require, register_format


@register_format
class TorchAO(Format):
    name = "torchao"
    methods = ("torchao",)

    def requirements(self):
        _require("torchao", "torchao==0.18.0", "This torchao checkpoint")

    def describe(self, path, config, info):
        q = config["quantization_config"]
        qt = q.get("quant_type")
        name = qt.get("default", qt) if isinstance(qt, dict) else qt
        if isinstance(name, dict):
            name = name.get("_type", "torchao config")
        info.format = str(name)
        info.groups.append(f"{name}")
        if "Dynamic" in str(name):
            info.activations = ("dynamically quantized activations (reproduced in the forward "
                                "pass; from: compares weights only)")
        info.loader = "through transformers with torchao"
