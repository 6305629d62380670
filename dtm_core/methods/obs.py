"""The optimal-brain-surgeon machinery that GPTQ and SparseGPT share (Frantar et al. 2022, 2023):
the upper Cholesky factor of the inverse of the dampened layer-input Hessian, and the lazy-batch
loop that fixes one column at a time and spreads its error over the columns not yet fixed.

Written here rather than taken from a package: the reference implementations (IST-DASLab's gptq and
sparsegpt, llm-compressor's GPTQModifier) run on whole modules with their own hooks and state, while
this tool compresses one component's matrix from its recorded inputs, reversibly.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..errors import DTMError

LOG = logging.getLogger("dtm_core")
BLOCK = 128


def inverse_hessian_factor(h: torch.Tensor, damp: float, name: str = "") -> tuple[torch.Tensor,
                                                                                 float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so U^T U = that inverse), and
    the dampening used: a factorization that fails is retried with ten times the dampening, and
    the log says so. ``h`` is dampened and then overwritten by U (pass a copy: :func:`prepare`
    makes one), so at most two Hessian-sized matrices are alive at once."""
    diag = torch.diagonal(h)
    mean = float(diag.mean()) or 1.0
    added = 0.0
    for attempt in range(6):
        d = damp * 10 ** attempt
        diag.add_(d * mean - added)
        added = d * mean
        low, info = torch.linalg.cholesky_ex(h)
        if int(info):
            del low
            continue
        # the rest reuses h's storage: at most two Hessian-sized matrices at once
        h.copy_(low)
        del low
        torch.cholesky_inverse(h, out=h)
        u, info = torch.linalg.cholesky_ex(h, upper=True, out=(h, torch.empty(
            (), dtype=torch.int32, device=h.device)))
        if int(info):
            raise DTMError(f"The inverse Hessian of {name or 'a component'} is not positive "
                           "definite; give more calibration prompts or a larger dampening.")
        if attempt:
            LOG.warning("%s: the Hessian was not positive definite with %.3g %% dampening; "
                        "used %.3g %%.", name or "a component", 100 * damp, 100 * d)
        return u, d
    raise DTMError(f"The calibration Hessian of {name or 'a component'} stays singular even with "
                   f"{100 * damp * 1e5:.3g} % dampening; give more calibration prompts.")


def prepare(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies of W and H with dead inputs (never active in calibration) handled as the
    reference does: their weights are zero and their Hessian entry 1."""
    w = w.float().clone()
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def lazy_batch(w: torch.Tensor, u: torch.Tensor, fix: Callable, block: int = BLOCK,
               start_block: Callable | None = None) -> torch.Tensor:
    """Fix the columns of W one at a time: ``fix(i, current column, W1 block, i1)`` returns the
    fixed column i (quantized or pruned); the error (w - q) / U[i, i] updates the columns after
    it, inside the block at once and beyond it once per block (GPTQ's lazy batching).
    ``start_block(i1, i2, W1)`` runs before each block (SparseGPT chooses its mask there)."""
    cols = w.shape[1]
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        if start_block is not None:
            start_block(i1, i2, w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            qi = fix(i1 + i, col, w1, i)
            q[:, i1 + i] = qi
            e = (col - qi) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q
