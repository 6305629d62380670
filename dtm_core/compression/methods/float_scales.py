"""Scales and rounding of the float formats (FP8 E4M3, FP4 E2M1, MX's power-of-two E8M0 scales),
each equal bit for bit to what compressed-tensors computes (``tests/test_formats.py`` holds every
function here to the library over the whole float range), in a few vectorized operations: the
library's own chains are a dozen small operations each, most of the time of fake-quantizing a
small matrix, and its CPU fallbacks for FP4 take hundreds of times longer."""
from __future__ import annotations

import torch


def gparam_of(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam(-amax, amax)`` (NVFP4's global scale for a tensor
    whose max |w| is ``amax``) in four operations instead of its dozen: FP8 max x FP4 max over
    max |w| (clamped to the smallest normal float), NaN and infinity replaced by 1.
    ``tests/test_formats.py`` holds it to the library over the whole float range."""
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA, FP8_E4M3_DATA

    m = amax.float().reshape(1).clamp(min=torch.finfo(torch.float32).tiny)
    # (the library's python-number / tensor is PyTorch's reciprocal times the number)
    return m.reciprocal_().mul_(FP8_E4M3_DATA.max * FP4_E2M1_DATA.max).nan_to_num_(1.0, 1.0, 1.0)


def e2m1_stays_in_range(scale8: torch.Tensor, vmax: float) -> bool:
    """Whether every NVFP4 value x / (s / g) already rounds into [-6, 6], so that the clamp to
    the range (a pass over the weight) changes nothing: s the groups' FP8 scales (``scale8``,
    before the global scale g is divided out), ``vmax`` = g max|w| / 6, the largest unrounded
    scale. When every s is at least 2^-6 (FP8's normal range, or a zero scale replaced by its
    eps 0.125) and vmax < 460, s is within 1/15 of g m / 6 for its group's max |w| m (FP8
    rounds to 3 mantissa bits; s = 448 for the clamped groups between 448 and 460), so
    |x| / (s / g) <= 6 x 15/14 < 7 (with float32's rounding of the two divisions), and float
    rounding takes every value below 7 to at most 6; ``tests/test_formats.py`` also compares
    both ways against the library."""
    return bool(scale8.numel()) and float(scale8.min()) >= 2.0 ** -6 and vmax < 460.0


def mx_scales(amax: torch.Tensor, num_bits: int) -> torch.Tensor:
    """The float32 power-of-two scales compressed-tensors' ``calculate_qparams`` gives MX
    arguments for groups whose max |w| is ``amax`` (float32, >= 0), in a few integer operations
    on the small tensor of scales instead of the library's dozen (``generate_mx_scales``: round
    to a power of two, which adds 2^21 to the bits and keeps the exponent field F; the E8M0
    exponent 127 + floor(log2 2^(F-127)) - offset is F - offset, 0 when F is 0 (log2 0 = -inf)
    and 255 when F is 255 (infinity), clamped to [0, 255]; the scale 2^(e - 127) is the float32
    whose bits are e << 23, or the subnormal 1 << 22 (2^-127) when e is 0).
    ``tests/test_formats.py`` holds it to the library, bit for bit, over the whole float range."""
    from compressed_tensors.quantization.utils.mxfp_utils import _MX_ELEM_OFFSET

    field = ((amax.view(torch.int32) + (1 << 21)) >> 23) & 0xFF
    e = (field - _MX_ELEM_OFFSET[num_bits]).clamp_(min=0)   # (0 where the field is 0)
    if field.numel() and field.max() == 255:
        e.masked_fill_(field == 255, 255)
    if e.numel() and e.min() == 0:
        return torch.where(e > 0, e << 23, 1 << 22).view(torch.float32)
    return (e << 23).view(torch.float32)


def symmetric_scales(m: torch.Tensor, args, gscale: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """compressed-tensors' ``calculate_qparams(-m, m, args, global_scale=gscale)`` scales for
    symmetric arguments that are not MX (those: :func:`mx_scales`), ``m`` the groups' max |w|
    (>= 0): the library's own steps in its order (max |w| over half the range, times the global
    scale, rounded to the scale dtype after clamping to its range, zeros replaced by that
    dtype's eps), without the steps that do nothing when min = -max (its zero points, the
    clamps at zero): a dozen small operations fewer, which on a small matrix is a third of
    the time of fake quantization. ``tests/test_formats.py`` holds it to the library, bit for
    bit, on every preset's arguments."""
    from compressed_tensors.quantization.utils import calculate_range
    from compressed_tensors.quantization.utils.helpers import _get_dtype_eps

    q_min, q_max = calculate_range(args, m.device)
    scales = m / ((q_max - q_min).to(m.dtype) / 2)
    if gscale is not None:
        scales = gscale * scales
    if args.scale_dtype is not None:
        fi = torch.finfo(args.scale_dtype)
        scales = scales.clamp_(fi.min, fi.max)
        scales = round_float(scales, 3, -6, inplace=True) \
            if args.scale_dtype == torch.float8_e4m3fn and scales.dtype == torch.float32 \
            else scales.to(args.scale_dtype).to(m.dtype)
    if not scales.numel() or scales.min() == 0:      # (a comparison pass only when needed)
        eps = _get_dtype_eps(args.scale_dtype if args.scale_dtype is not None else scales.dtype)
        scales = scales.masked_fill_(scales == 0, eps)
    return scales.reshape(1) if scales.ndim == 0 else scales


def round_float(x: torch.Tensor, mantissa: int, min_exp: int, inplace: bool = False
                ) -> torch.Tensor:
    """Each float32 value of ``x`` (already clamped to the format's range) rounded to the nearest
    value of a float format with ``mantissa`` stored bits and smallest normal exponent
    ``min_exp``, ties to even: FP8 E4M3 (3, -6), FP4 E2M1 (1, 0). Exactly what
    ``x.to(torch.float8_e4m3fn)`` and compressed-tensors' ``cast_to_fp4`` give (its ties:
    0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).

    The format's spacing near x is 2^(E - mantissa), E = max(floor(log2|x|), min_exp). With
    c = 1.5 * 2^(E + 23 - mantissa) (2^E read from x's exponent bits), x + c falls in the float32
    binade of c whether x is positive or negative (|x| < 2^(E+1) is far less than half of c),
    and that binade's spacing is exactly the format's: float32 addition rounds x to the grid, to
    nearest, ties to even (c is an even multiple of the spacing, so the parity of the sum's
    last bit is the grid index's), and subtracting c is exact. Two float32 operations and one
    bit mask per value; four times faster on CPU than PyTorch's float8 cast and far faster
    than the library's masked assignments (``tests/test_formats.py`` holds it to both, bit for
    bit but for the sign of a negative value rounded to zero: +0 here, -0 there, which no
    product or sum tells apart). ``inplace`` rounds ``x`` itself (one tensor fewer to allocate,
    which on CPU is much of the time of a pass over a few megabytes)."""
    c = (x.view(torch.int32) & 0x7F800000).view(torch.float32)
    c.clamp_(min=2.0 ** min_exp).mul_(1.5 * 2.0 ** (23 - mantissa))
    return (x.add_(c) if inplace else torch.add(x, c)).sub_(c)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Each value of ``x`` (already clamped to [-6, 6]) to its nearest FP4 E2M1 point, ties as
    compressed-tensors' ``cast_to_fp4`` breaks them (see :func:`round_float`)."""
    if x.dtype == torch.float32:
        return round_float(x, 1, 0)
    return round_float(x.float(), 1, 0).to(x.dtype)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Each value of ``x`` (already clamped to [-448, 448]) to its nearest FP8 E4M3 value, as
    ``x.to(torch.float8_e4m3fn)`` rounds (see :func:`round_float`)."""
    return round_float(x, 3, -6)
