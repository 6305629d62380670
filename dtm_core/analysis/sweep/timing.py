"""How long a sweep will take on this machine, estimated without running the model."""
from __future__ import annotations

import time
from typing import Sequence

import torch

from dtm_core.models.generation import model_device
from dtm_core.models.load import LoadedModel


CELL_OF_FORWARD = 0.64   # a cell's cost as a share of a full forward (bench/bench_sweep.py)


def estimate_seconds(dense: LoadedModel, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
                     cells: int) -> float:
    """Rough wall time of a sweep on this machine, without touching the model (a job may be using
    it): a forward of the prompt set (each prompt with N more tokens) costs about 2 x parameters
    x tokens operations at 0.7 of this device's measured matrix-multiply rate (what the default
    model's forward reaches on the 2-core machine here); a sweep costs 0.64 of that per cell, as measured, plus about three for the
    references and the dense pass."""
    tokens = sum(len(p) + new_tokens for p in prompt_ids)
    params = sum(p.numel() for p in dense.model.parameters())
    forward = 2.0 * params * tokens / (0.7 * _matmul_rate(str(model_device(dense.model))))
    return forward * (CELL_OF_FORWARD * cells + 3)


_RATES: dict[str, float] = {}


def _matmul_rate(device: str) -> float:
    """Floating-point operations per second of a float32 matrix multiply here (measured once)."""
    if device not in _RATES:
        a = torch.randn(256, 1024, device=device)
        b = torch.randn(1024, 1024, device=device)
        a @ b
        t0 = time.perf_counter()
        for _ in range(8):
            a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        _RATES[device] = 8 * 2 * 256 * 1024 * 1024 / max(time.perf_counter() - t0, 1e-9)
    return _RATES[device]
