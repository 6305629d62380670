"""bitsandbytes checkpoints (4-bit NF4/FP4 and LLM.int8): loaded through transformers; read one
weight at a time by bitsandbytes' own de-quantization."""
from __future__ import annotations

from pathlib import Path

import torch

from dtm_core.models.checkpoints.base import (CheckpointWeights, Format, Shards, _require,
                                              register_format)


@register_format
class BitsAndBytes(Format):
    name = "bitsandbytes"
    methods = ("bitsandbytes",)

    def requirements(self):
        _require("bitsandbytes", "bitsandbytes==0.50.2", "This bitsandbytes checkpoint")

    def describe(self, path, config, info):
        q = config["quantization_config"]
        if q.get("load_in_4bit"):
            info.format = str(q.get("bnb_4bit_quant_type", "fp4"))
            info.groups.append(
                f"4-bit {info.format}, blocks of 64"
                + (", double-quantized scales" if q.get("bnb_4bit_use_double_quant") else "")
                + f", compute in {q.get('bnb_4bit_compute_dtype', 'float32')}")
            info.activations = "weights only (4-bit weights are de-quantized for each matmul)"
        else:
            info.format = "int8 (LLM.int8)"
            info.groups.append(f"int8 per row, outlier threshold "
                               f"{q.get('llm_int8_threshold', 6.0)}")
            info.activations = ("LLM.int8: activations in float16 with outlier columns kept "
                                "(reproduced in the forward pass; from: compares weights only)")
        skip = q.get("llm_int8_skip_modules") or ["lm_head"]
        info.kept = list(skip)
        info.loader = "through transformers with bitsandbytes"

    def reader(self, path, config):
        return BnbWeights(path, config)


class BnbWeights(CheckpointWeights):
    """bitsandbytes: each weight from its stored blocks and quant state by bitsandbytes' own
    de-quantization (4-bit: QuantState.from_dict + dequantize_4bit; 8-bit: int8 x SCB / 127),
    read one at a time."""

    def __init__(self, path: Path, config: dict):
        self.shards = Shards(path)

    def _extra(self, k: str) -> bool:
        mod, _, p = k.rpartition(".")
        return (".weight." in k or p in ("SCB", "weight_format")) and not k.endswith(".weight")

    def names(self):
        return [k for k in self.shards.keys() if not self._extra(k)]

    def tensor(self, name):
        if name not in self.shards:
            return None
        w = self.shards.get(name)
        state = {k[len(name) + 1:]: self.shards.get(k) for k in self.shards.keys()
                 if k.startswith(name + ".")}
        if any(k.startswith("quant_state.") for k in state):
            import bitsandbytes.functional as F

            qs = F.QuantState.from_dict(state, device=torch.device("cpu"))
            return F.dequantize_4bit(w, qs).float()
        scb = f"{name.rpartition('.')[0]}.SCB"
        if w.dtype == torch.int8 and scb in self.shards:
            return w.float() * self.shards.get(scb).float()[:, None] / 127.0
        return w.float()
