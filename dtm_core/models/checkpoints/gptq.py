"""GPTQModel / AutoGPTQ checkpoints (``quant_method: gptq``), de-quantized into the base
architecture here (gptqmodel's kernels cannot be installed next to the pinned torch; GPTQ is
weight-only, so the de-quantized model is the checkpoint's function up to the kernels' rounding).
"""
from __future__ import annotations

from pathlib import Path

import torch

from dtm_core.errors import DTMError
from dtm_core.models.checkpoints.base import Format, Shards, _bits_words, register_format
from dtm_core.models.checkpoints.packed import PackedWeights, _describe_packed, unpack_bits


def unpack_gptq(qweight, qzeros, scales, g_idx, bits: int, group_size: int,
                v1: bool = True) -> torch.Tensor:
    """The (out, in) float32 weight of a GPTQ-packed linear: qweight (in*bits/32, out) packed
    along the input, qzeros (groups, out*bits/32) packed along the output, scales (groups, out),
    g_idx (in,) each input channel's group (act-order); ``v1``: the AutoGPTQ format that stores
    each zero point minus one."""
    out = scales.shape[1]
    n_in = qweight.shape[0] * 32 // bits
    if g_idx is not None:
        n_in = g_idx.shape[0]
    q = unpack_bits(qweight, bits, n_in, 0)                        # (in, out)
    z = unpack_bits(qzeros, bits, out, 1)                          # (groups, out)
    if v1:
        z = z + 1
    if g_idx is None:
        gs = group_size if group_size and group_size > 0 else n_in
        g_idx = torch.arange(n_in) // gs
    g = g_idx.long()
    w = scales.float()[g] * (q - z[g]).float()                     # (in, out)
    return w.t().contiguous()


@register_format
class GPTQ(Format):
    name = "gptq"
    methods = ("gptq",)
    transformers_loads = False
    can_dequantize = True

    def describe(self, path, config, info):
        q = config["quantization_config"]
        fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq")
        info.format = fmt
        words = _bits_words(q.get("bits", 4), None, q.get("group_size", 128), q.get("sym", True))
        if q.get("desc_act"):
            words += ", act-order (desc_act)"
        _describe_packed(path, info, words, "GPTQ",
                         "DTM Inspector (gptqmodel's kernels are not needed: GPTQ is weight-only)")

    def reader(self, path, config):
        return GPTQWeights(path, config)


class GPTQWeights(PackedWeights):
    extras = ("qzeros", "scales", "g_idx")

    def __init__(self, path: Path, config: dict):
        self.shards = Shards(path)
        q = config["quantization_config"]
        self.bits = int(q.get("bits", 4))
        self.group = int(q.get("group_size", 128) or -1)
        fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise DTMError(f"GPTQ checkpoint format '{fmt}' is not supported here; DTM Inspector "
                           "reads the gptq and gptq_v2 layouts.")
        self.v1 = fmt == "gptq"

    def tensor(self, name):
        mod, _, p = name.rpartition(".")
        if p == "weight" and f"{mod}.qweight" in self.shards:
            g = self.shards.get(f"{mod}.g_idx") if f"{mod}.g_idx" in self.shards else None
            return unpack_gptq(self.shards.get(f"{mod}.qweight"), self.shards.get(f"{mod}.qzeros"),
                               self.shards.get(f"{mod}.scales"), g, self.bits, self.group,
                               self.v1)
        return self.shards.get(name).float() if name in self.shards else None
