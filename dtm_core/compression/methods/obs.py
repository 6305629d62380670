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

from dtm_core.errors import DTMError

LOG = logging.getLogger("dtm_core")
BLOCK = 128


def _mirror(a, lower_to_upper: bool, block: int = 256) -> None:
    """Copy one triangle of a square numpy array onto the other, a strip at a time (no n x n
    temporary)."""
    import numpy as np

    n = a.shape[0]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        d = a[i0:i1, i0:i1]
        if lower_to_upper:
            d[...] = np.tril(d) + np.tril(d, -1).T
            a[i0:i1, i1:] = a[i1:, i0:i1].T
        else:
            d[...] = np.triu(d) + np.triu(d, 1).T
            a[i1:, i0:i1] = a[i0:i1, i1:].T


def _factor_in_place(h: torch.Tensor, damp: float, name: str):
    """CPU: the factor computed by LAPACK inside h's own memory (scipy's potrf / potri on a
    Fortran view of the symmetric H), so no Hessian-sized temporary exists; None when that
    cannot be done here (no scipy, another device or dtype)."""
    if h.device.type != "cpu" or h.dtype not in (torch.float32, torch.float64):
        return None
    try:
        import numpy as np
        from scipy.linalg import lapack
    except ImportError:
        return None
    single = h.dtype == torch.float32
    potrf, potri = (lapack.spotrf, lapack.spotri) if single else (lapack.dpotrf, lapack.dpotri)
    a = h.numpy().T                  # the same memory, Fortran order (H is symmetric)
    if not a.flags.f_contiguous:
        return None
    diag = np.diagonal(a).copy()
    mean = float(diag.mean()) or 1.0
    for attempt in range(6):
        d = damp * 10 ** attempt
        np.fill_diagonal(a, diag + d * mean)
        low, info = potrf(a, lower=1, overwrite_a=1, clean=0)
        if info != 0 or not np.shares_memory(low, a):
            if not np.shares_memory(low, a):
                return None
            _mirror(a, lower_to_upper=False)      # the upper triangle is still H: restore
            continue
        inv, info = potri(a, lower=1, overwrite_c=1)
        if info != 0 or not np.shares_memory(inv, a):
            raise DTMError(f"The inverse Hessian of {name or 'a component'} could not be "
                           "formed; give more calibration prompts or a larger dampening.")
        _mirror(a, lower_to_upper=True)
        up, info = potrf(a, lower=0, overwrite_a=1, clean=0)
        if info != 0 or not np.shares_memory(up, a):
            raise DTMError(f"The inverse Hessian of {name or 'a component'} is not positive "
                           "definite; give more calibration prompts or a larger dampening.")
        u = torch.from_numpy(a)          # U in the upper triangle (the lower one is never read)
        return u, d, attempt
    raise DTMError(f"The calibration Hessian of {name or 'a component'} stays singular even with "
                   f"{100 * damp * 1e5:.3g} % dampening; give more calibration prompts.")


def inverse_hessian_factor(h: torch.Tensor, damp: float, name: str = "") -> tuple[torch.Tensor,
                                                                                 float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so U^T U = that inverse), and
    the dampening used: a factorization that fails is retried with ten times the dampening, and
    the log says so. ``h`` is dampened and then overwritten by U (pass a copy: :func:`prepare`
    makes one). On CPU LAPACK works inside h itself (no other Hessian-sized matrix, only
    strips); elsewhere at most two Hessian-sized matrices are alive at once. Only U's upper
    triangle is meaningful."""
    done = _factor_in_place(h, damp, name)
    if done is not None:
        u, d, attempt = done
        if attempt:
            LOG.warning("%s: the Hessian was not positive definite with %.3g %% dampening; "
                        "used %.3g %%.", name or "a component", 100 * damp, 100 * d)
        return u, d
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
    """Fix the columns of W (in place; W is returned) one at a time: ``fix(i, current column, W1 block, i1)`` returns the
    fixed column i (quantized or pruned); the error (w - q) / U[i, i] updates the columns after
    it, inside the block at once and beyond it once per block (GPTQ's lazy batching).
    ``start_block(i1, i2, W1)`` runs before each block (SparseGPT chooses its mask there)."""
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        if start_block is not None:
            start_block(i1, i2, w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            qi = fix(i1 + i, col, w1, i)
            q1[:, i] = qi
            e = (col - qi) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = q1       # the fixed block takes the place of its columns: no second W
        for j in range(i2, cols, 4 * block):   # the lazy update in strips: no W-sized temporary
            w[:, j:j + 4 * block] -= err1 @ u[i1:i2, j:j + 4 * block]
    return w
