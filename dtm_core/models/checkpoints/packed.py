"""What GPTQ and AWQ checkpoints share: a linear stored as a packed ``qweight`` with its scales and
zero points beside it, and the little-endian bit unpacking of GPTQ's layout."""
from __future__ import annotations

from pathlib import Path

import torch

from dtm_core.models.checkpoints.base import CheckpointInfo, CheckpointWeights, Shards, _kept_linears


# ---------------------------------------------------------------------------------------------
# GPTQ (GPTQModel / AutoGPTQ layout)


def unpack_bits(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """The ``count`` unsigned ``bits``-bit values packed along ``dim`` of an int32 tensor, as a
    little-endian bit stream (GPTQ's layout: value i at bits i*bits .. i*bits+bits-1 of the
    stream of words, so 3-bit values cross word boundaries)."""
    w = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    val = w[word] >> off.view(-1, *([1] * (w.dim() - 1)))
    spill = (off + bits > 32)
    if bool(spill.any()):
        nxt = w[(word + 1).clamp(max=w.shape[0] - 1)] << (32 - off).view(-1, *([1] * (w.dim() - 1)))
        val = torch.where(spill.view(-1, *([1] * (w.dim() - 1))), val | nxt, val)
    return (val & ((1 << bits) - 1)).movedim(0, dim)


def _describe_packed(path: Path, info: CheckpointInfo, words: str, algorithm: str,
                     by: str) -> None:
    """GPTQ and AWQ: one scheme over the modules that have a packed ``qweight``."""
    mods = PackedWeights.packed_modules(Shards(path))
    info.groups.append(f"{words}, {len(mods)} linears")
    info.quantized = len(mods)
    info.kept = _kept_linears(path, set(mods))
    info.algorithm = algorithm
    info.loader = f"de-quantized into the base architecture by {by}"


class PackedWeights(CheckpointWeights):
    """Formats that store a linear as a packed ``qweight`` with its parameters beside it."""

    extras: tuple[str, ...] = ()      # the parameters stored beside each qweight

    @staticmethod
    def packed_modules(shards: Shards) -> list[str]:
        return [k[:-len(".qweight")] for k in shards.keys() if k.endswith(".qweight")]

    def names(self):
        out = []
        for k in self.shards.keys():
            mod, _, p = k.rpartition(".")
            if p == "qweight":
                out.append(f"{mod}.weight")
            elif p not in self.extras:
                out.append(k)
        return out
