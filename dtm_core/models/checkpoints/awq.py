"""AutoAWQ checkpoints (``quant_method: awq``), de-quantized into the base architecture through
compressed-tensors' own AutoAWQ converter (AWQ is weight-only)."""
from __future__ import annotations

from pathlib import Path

from dtm_core.errors import DTMError
from dtm_core.models.checkpoints.base import Format, Shards, _bits_words, _require, register_format
from dtm_core.models.checkpoints.packed import PackedWeights, _describe_packed


@register_format
class AWQ(Format):
    name = "awq"
    methods = ("awq",)
    transformers_loads = False
    can_dequantize = True

    def requirements(self):
        _require("compressed_tensors", "compressed-tensors==0.20.0",
                 "Reading an AutoAWQ checkpoint (compressed-tensors' AutoAWQ converter)")

    def describe(self, path, config, info):
        q = config["quantization_config"]
        version = str(q.get("version", "gemm")).lower()
        info.format = version
        words = _bits_words(q.get("bits", 4), None, q.get("group_size", 128),
                            not q.get("zero_point", True))
        words += " (zero point)" if q.get("zero_point", True) else " (no zero point)"
        _describe_packed(path, info, words, "AWQ",
                         "compressed-tensors' AutoAWQ converter (AWQ is weight-only)")

    def reader(self, path, config):
        return AWQWeights(path, config)


class AWQWeights(PackedWeights):
    extras = ("qzeros", "scales")

    def __init__(self, path: Path, config: dict):
        from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

        self.shards = Shards(path)
        q = config["quantization_config"]
        try:
            self.conv = AutoAWQConverter.from_autoawq_config(q)
        except ValueError as exc:
            raise DTMError(f"This AutoAWQ checkpoint cannot be read: {exc} (compressed-tensors' "
                           "converter reads 4-bit GEMM checkpoints).") from exc
        self.scheme = self.conv._build_quant_config().config_groups["config_group_0"]

    def tensor(self, name):
        from compressed_tensors.compressors.base import BaseCompressor

        mod, _, p = name.rpartition(".")
        if p == "weight" and f"{mod}.qweight" in self.shards:
            t = {f"{mod}.{x}": self.shards.get(f"{mod}.{x}") for x in ("qweight", "qzeros", "scales")
                 if f"{mod}.{x}" in self.shards}
            t = self.conv.process(t)
            local = {k.rpartition(".")[2]: v for k, v in t.items()}
            comp = BaseCompressor.get_value_from_registry("pack-quantized")
            return comp.decompress(local, self.scheme)["weight"].float()
        return self.shards.get(name).float() if name in self.shards else None
