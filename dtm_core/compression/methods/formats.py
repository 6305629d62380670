"""The formats deployers ship on current GPUs (FP8, NVFP4, MXFP4, MXFP8, int4 with FP8
activations), as compressed-tensors defines them, over one shared fake quantizer.

A format's spec is a set of compressed-tensors ``QuantizationArgs`` (its preset scheme's:
``FP8_DYNAMIC``, ``FP8_BLOCK``, ``NVFP4A16``, ``MXFP4A16``, ...). The weights go through what
llm-compressor runs for that scheme: its memoryless min/max observer (per tensor, output channel,
group or 128x128 block; llm-compressor's ``flatten_for_calibration``), compressed-tensors' own
``calculate_qparams`` (FP8 E4M3 group scales under an FP32 global scale for NVFP4, power-of-two
E8M0 scales for MX) and its ``fake_quantize``: a spec's weights are the checkpoint's, bit for bit
(``tests/test_formats.py``). Written here only: the observer's reshapes (llm-compressor, which
defines them, cannot be installed next to transformers 5.23), and two extensions the library
refuses: a width that is not a multiple of the group size gets a shorter last group, quantized
as the library quantizes that group padded with zeros (what its block strategy does to a partial
block), and the fused global scale below.

NVFP4's FP32 global scale is shared by the linears that deployed kernels fuse (q/k/v, gate/up,
as llm-compressor's ``FUSED_LAYER_NAMES``; a slice of a fused weight shares its module's): it is
computed from the dense weights of the whole group before anything is compressed
(:meth:`FormatMethod.fused_stats`), so one component compressed alone equals the same component
of a whole-model checkpoint.

Activations (``fp8:dyn``, ``w4afp8``, ``nvfp4:a``) are fake-quantized at the module's input by a
forward pre-hook with the scheme's input arguments: dynamic per-token (or per group of 128 for
FP8 blocks) scales computed on the fly; NVFP4's activation global scale is static, from the
calibration inputs' max |x| (llm-compressor's ``static_minmax`` observer), its group scales
dynamic.
"""
from __future__ import annotations

import math
import re
from typing import ClassVar

import torch

from dtm_core.compression.methods.base import Method
from dtm_core.compression.methods.float_scales import (e2m1_stays_in_range, gparam_of,  # noqa: F401
                                                       mx_scales, round_e2m1, round_e4m3,
                                                       round_float, symmetric_scales)
from dtm_core.compression.methods.registry import bad_spec

# the linears deployed kernels fuse, which share NVFP4's global scale (llm-compressor's
# FUSED_LAYER_NAMES)
FUSED_LAYER_NAMES = (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"),
                     ("q_a_proj", "kv_a_proj_with_mqa"), ("w1", "w3"))

SCALE_BITS = 16        # a channel's or block's FP8 scale is stored in the model's 16-bit dtype


def _ct():
    from dtm_core.models.checkpoints.base import _require

    _require("compressed_tensors", "compressed-tensors==0.20.0", "The FP8/NVFP4/MX formats")
    import compressed_tensors.quantization as q
    return q


def preset_args(preset: str, part: str = "weights"):
    """A compressed-tensors preset scheme's quantization arguments (``part``: ``weights`` or
    ``input_activations``), e.g. ``preset_args("NVFP4A16")``."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    _ct()
    return PRESET_SCHEMES[preset].get(part)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def _fold(v: torch.Tensor, op) -> torch.Tensor:
    """``op`` (torch.maximum or torch.minimum) over the last dimension of ``v``: halves folded
    onto each other while the width is even and small (PyTorch's reductions over short innermost
    dimensions, NVFP4's 16, are several times slower), then one reduction. Exact: min and max
    do not depend on the order."""
    while 2 <= v.shape[-1] <= 16 and v.shape[-1] % 2 == 0:
        h = v.shape[-1] // 2
        v = op(v[..., :h], v[..., h:])
    return (v.amax(-1) if op is torch.maximum else v.amin(-1))


def observe(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's memoryless min/max of an (out, in) weight for ``args``' strategy: one
    value per tensor, output channel, group or block (the scales' shape). For symmetric
    arguments only the magnitude reaches the scale (compressed-tensors' ``calculate_qparams``
    takes max(|min|, |max|)), so (-max|w|, max|w|) is returned, in one pass."""
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    if args.strategy == S.TENSOR:
        flat = w.reshape(1, -1)
    elif args.strategy == S.CHANNEL:
        flat = w.unsqueeze(-2)
    elif args.strategy in (S.GROUP, S.TENSOR_GROUP):
        flat = w.unflatten(-1, (-1, args.group_size))
    elif args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        v = maybe_pad_tensor_for_block_quant(w, args.block_structure)
        rows, cols = v.shape
        # (fake_quantize_weight reduces symmetric blocks itself: _blocks_as_groups)
        flat = v.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2).flatten(-2, -1)
    else:
        raise ValueError(f"no weight observer for strategy {args.strategy}")
    if args.symmetric and args.strategy in (S.GROUP, S.TENSOR_GROUP) and args.group_size <= 32:
        # max pooling over |w|: several times faster than the fold over NVFP4's groups of 16,
        # a fifth faster than amax and amin over MX's groups of 32
        m = torch.nn.functional.max_pool1d(w.abs().unsqueeze(-2), args.group_size,
                                           args.group_size).squeeze(-2)
        return -m, m
    if args.symmetric and flat.shape[-1] > 16:      # one read of w, no |w| copy
        m = torch.maximum(flat.amax(-1), flat.amin(-1).neg_())
        return -m, m
    if args.symmetric:
        m = _fold(flat.abs(), torch.maximum)
        return -m, m
    return _fold(flat, torch.minimum), _fold(flat, torch.maximum)


def global_scale(matrices: list[torch.Tensor]) -> torch.Tensor:
    """NVFP4's FP32 global scale over one or more (fused) weights: compressed-tensors'
    ``generate_gparam`` of their joint min and max, which reads only their max |w|
    (:func:`gparam_of`)."""
    return gparam_of(torch.stack([torch.maximum(m.max(), -m.min()) for m in matrices]).max())


def qdq(x: torch.Tensor, scale: torch.Tensor, args, gscale: torch.Tensor | None = None,
        clamp: bool = True) -> torch.Tensor:
    """compressed-tensors' ``_quantize_dequantize`` for symmetric arguments, operation for
    operation (``x`` already shaped so that ``scale`` broadcasts), with the rounding done in a
    few vectorized float32 steps: the library's CPU fallbacks for FP4 take hundreds of times
    longer than round-to-nearest. ``clamp=False`` leaves out the clamp to the format's range
    where it changes nothing (:func:`e2m1_stays_in_range`). ``tests/test_formats.py`` holds it to
    the library bit for bit."""
    from compressed_tensors.quantization import QuantizationType
    from compressed_tensors.quantization.utils import calculate_range

    q_min, q_max = calculate_range(args, x.device)
    if gscale is not None:
        scale = scale / gscale
    scaled = torch.div(x, scale)
    if clamp:
        scaled.clamp_(float(q_min), float(q_max))
    if args.type == QuantizationType.FLOAT:
        if args.num_bits == 8 and scaled.dtype == torch.float32:
            rounded = round_float(scaled, 3, -6, inplace=True)       # E4M3, in place
        elif args.num_bits == 8:
            rounded = scaled.to(torch.float8_e4m3fn).to(x.dtype)
        elif args.num_bits == 4 and scaled.dtype == torch.float32:
            rounded = round_float(scaled, 1, 0, inplace=True)        # E2M1, in place
        elif args.num_bits == 4:
            rounded = round_e2m1(scaled)
        else:
            raise NotImplementedError(f"FP{args.num_bits} is not a format here")
    else:
        rounded = torch.round(scaled)
    return rounded.to(scale.dtype).mul_(scale)


def _is_mx(args) -> bool:
    from compressed_tensors.quantization.utils.mxfp_utils import should_generate_mx_scales

    return bool(args.symmetric and should_generate_mx_scales(args))


def _blocks_as_groups(w: torch.Tensor, args) -> torch.Tensor:
    """Symmetric 128x128 blocks (``fp8:block128``) as groups of 128 along the input whose scales
    repeat over 128 rows: every value meets the scale the library's zero-padded blocks give it
    (zeros do not change a block's max |w|), without the padded copy of the weight or a 4-D
    broadcast."""
    bh, bw = args.block_structure
    rows, cols = w.shape
    g = _pad_last(w, bw).unflatten(-1, (-1, bw))
    m = torch.maximum(g.amax(-1), g.amin(-1).neg_())                  # (rows, column blocks)
    m = torch.nn.functional.pad(m, (0, 0, 0, (-rows) % bh)).unflatten(0, (-1, bh)).amax(1)
    scale = symmetric_scales(m, args)
    out = qdq(g, scale.repeat_interleave(bh, 0)[:rows].unsqueeze(-1), args)
    return out.flatten(-2)[:, :cols]


def fake_quantize_weight(w: torch.Tensor, args, gscale: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """A float32 (out, in) weight quantized and de-quantized as the scheme ``args`` defines
    (``gscale``: the tensor-group global scale, computed from ``w`` alone when not given)."""
    q = _ct()
    from compressed_tensors.quantization.utils import (calculate_qparams,
                                                       maybe_pad_tensor_for_block_quant)

    S = q.QuantizationStrategy
    rows, cols = w.shape
    if args.strategy == S.BLOCK and args.symmetric:
        return _blocks_as_groups(w, args)
    grouped = args.strategy in (S.GROUP, S.TENSOR_GROUP)
    x = _pad_last(w, args.group_size) if grouped else w
    if args.strategy != S.TENSOR_GROUP:
        gscale = None
    if args.strategy == S.BLOCK:        # padded once, for the observer and the rounding
        x = maybe_pad_tensor_for_block_quant(w, args.block_structure)
    lo, hi = observe(x, args)
    if args.strategy == S.TENSOR_GROUP and gscale is None:
        # w's own global scale: generate_gparam reads only max |w|, the largest group's
        # (the zeros padding a last group change no max |w|)
        gscale = gparam_of(hi.max())
    if _is_mx(args) and gscale is None:
        scale = mx_scales(hi, args.num_bits)
    elif args.symmetric:
        scale = symmetric_scales(hi, args, gscale)
    else:
        scale, _ = calculate_qparams(lo, hi, args, global_scale=gscale)
    clamp = True
    if args.strategy == S.TENSOR_GROUP and args.type == q.QuantizationType.FLOAT \
            and args.num_bits == 4 and args.symmetric and gscale is not None \
            and args.scale_dtype == torch.float8_e4m3fn:
        clamp = not e2m1_stays_in_range(scale, float(hi.max()) * float(gscale.max()) / 6)
    if grouped:
        out = qdq(x.unflatten(-1, (-1, args.group_size)), scale.unsqueeze(-1), args, gscale,
                  clamp)
        return out.flatten(-2)[:, :cols]
    if args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        blocks = x.reshape(x.shape[0] // bh, bh, x.shape[1] // bw, bw)    # a view, no copy
        out = qdq(blocks, scale[:, None, :, None], args).reshape(x.shape)
        return out[:rows, :cols]
    return qdq(x, scale, args)


class FormatGrid:
    """A format's weight grid for column-by-column methods (GPTQ): a group's scale from its
    current weights (``params``, compressed-tensors' ``calculate_qparams`` under the global
    scale) and one column on that grid (``quantize``, :func:`qdq`), as llm-compressor's GPTQ
    quantizes with these schemes."""

    def __init__(self, args, gscale: torch.Tensor | None = None):
        from compressed_tensors.quantization import QuantizationStrategy as S

        self.args = args
        self.gscale = gscale if args.strategy == S.TENSOR_GROUP else None
        self.group = args.group_size if args.strategy in (S.GROUP, S.TENSOR_GROUP) else None
        self.whole = args.strategy == S.TENSOR      # one scale for the whole matrix

    def params(self, x: torch.Tensor) -> torch.Tensor:
        from compressed_tensors.quantization.utils import calculate_qparams

        if self.whole:
            lo, hi = x.amin().reshape(1, 1), x.amax().reshape(1, 1)
        else:
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        return calculate_qparams(lo, hi, self.args, global_scale=self.gscale)[0]

    def quantize(self, col: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return qdq(col[:, None], scale, self.args, self.gscale)[:, 0]


def fake_quantize_activation(x: torch.Tensor, args, gscale: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """Dynamic activation quantization as compressed-tensors' ``forward_quantize`` does it:
    scales from the tensor itself by the library's ``compute_dynamic_scales_and_zp`` (per token,
    or per group of the last dimension, a partial last group padded with zeros), ``gscale`` the
    static global scale of tensor-group schemes, then :func:`qdq`."""
    q = _ct()
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    shape, width = x.shape, x.shape[-1]
    v = x.reshape(-1, 1, width) if x.dim() != 3 else x     # (batch, tokens, width)
    grouped = args.strategy in (q.QuantizationStrategy.GROUP,
                                q.QuantizationStrategy.TENSOR_GROUP)
    if grouped:
        v = _pad_last(v, args.group_size)
    scale, _ = compute_dynamic_scales_and_zp(v, args, None, global_scale=gscale)
    if grouped:
        out = qdq(v.unflatten(-1, (-1, args.group_size)), scale.unsqueeze(-1), args,
                  gscale).flatten(-2)
    else:
        out = qdq(v, scale, args, gscale)
    return out[..., :width].reshape(shape).to(x.dtype)


def activation_hook(args, gscale: torch.Tensor | None = None):
    """A forward pre-hook fake-quantizing the module's input with ``args``."""
    def hook(module, inputs):
        g = gscale.to(inputs[0].device) if gscale is not None else None
        return (fake_quantize_activation(inputs[0], args, g),) + tuple(inputs[1:])
    return hook


def fused_matrices(model, component) -> list[torch.Tensor] | None:
    """The dense (out, in) weights that share ``component``'s NVFP4 global scale: a fused
    weight's whole matrix for a slice of it, the q/k/v or gate/up siblings of its module, or
    None (the matrix alone: an expert's matrix, a module fused with nothing)."""
    if component.experts is not None:
        return None
    if component.rows is not None:
        return component.matrices(component.weight.detach())
    parent_path, _, leaf = component.path.rpartition(".")
    for names in FUSED_LAYER_NAMES:
        if leaf not in names:
            continue
        parent = model.get_submodule(parent_path) if parent_path else model
        mods = [getattr(parent, n, None) for n in names]
        if all(m is not None and hasattr(m, component.param) for m in mods):
            return [getattr(m, component.param).detach().float()
                    if not component.transposed else getattr(m, component.param).detach().float().t()
                    for m in mods]
    return None


class FormatMethod(Method):
    """What the float formats share: the scheme's weight and activation arguments
    (:meth:`weight_args`, :meth:`input_args`), the llm-compressor preset that names the scheme,
    storage, exports and the bits axis."""

    family = "quantization"
    level_axis = "bits"
    preset: ClassVar[str | None] = None   # the compressed-tensors / llm-compressor preset name
    element_bits: ClassVar[int] = 8       # bits of one stored value

    def weight_args(self):
        raise NotImplementedError

    def input_args(self):
        """The scheme's input-activation arguments, or None for a weight-only scheme."""
        return None

    @property
    def bits(self) -> int:
        return self.element_bits

    @property
    def level(self) -> float:
        return float(self.element_bits)

    def apply(self, w, stats, name=""):
        peers = stats.get("fused") if stats else None
        gscale = global_scale(peers) if peers else None
        return fake_quantize_weight(w, self.weight_args(), gscale)

    def runtime_hook(self):
        args = self.input_args()
        return None if args is None else activation_hook(args)

    def llmcompressor_scheme(self):
        group = {"weights": _args_dict(self.weight_args())}
        if self.input_args() is not None:
            group["input_activations"] = _args_dict(self.input_args())
        out = {"modifier": "QuantizationModifier", "group": group}
        if self.preset is not None:
            out["preset"] = self.preset
        return out


def format_grid_of(head: str, spec: str):
    """The weight-only format a grid-first method names (``gptq:nvfp4``): its spec, or None when
    ``head`` is an integer grid."""
    if re.fullmatch(r"int\d+", head or ""):
        return None
    from dtm_core.compression.methods.registry import METHODS

    cls = METHODS.get(head)
    if cls is None or not issubclass(cls, FormatMethod):
        return None
    fmt = cls.parse(head, [], head)
    strategy = fmt.weight_args().strategy
    if fmt.input_args() is not None or str(getattr(strategy, "value", strategy)) == "block":
        raise bad_spec(spec, f"'{head}' quantizes activations; the grid-first methods take a "
                             "weight-only format (nvfp4, mxfp4, mxfp8, fp8)")
    return fmt


class OnFormatOrGrid:
    """What a grid-first method (GPTQ, AWQ: ``bits``, ``group``, ``asym``, ``fmt`` fields)
    deploys as: a format's storage, types and scheme when ``fmt`` names one, the ``intB`` grid's
    otherwise (:class:`~dtm_core.compression.methods.rtn.OnGrid`)."""

    @property
    def format(self):
        """The format whose grid this runs on, or None on the ``intB`` grid."""
        return None if self.fmt is None else format_grid_of(self.fmt, str(self))

    def storage_bits(self, cols, dtype_bits):
        return self.format.storage_bits(cols, dtype_bits) if self.fmt else \
            super().storage_bits(cols, dtype_bits)

    @property
    def per_tensor_bits(self) -> int:
        return self.format.per_tensor_bits if self.fmt else 0

    def llama_cpp_type(self):
        return self.format.llama_cpp_type() if self.fmt else super().llama_cpp_type()

    def torchao_config(self):
        return self.format.torchao_config() if self.fmt else super().torchao_config()

    def weight_scheme(self) -> dict:
        """The weights' quantization arguments as llm-compressor's recipe writes them."""
        from dtm_core.compression.methods.rtn import grid_scheme

        return _args_dict(self.format.weight_args()) if self.fmt else \
            grid_scheme(self.bits, self.group, self.asym)


def _args_dict(args) -> dict:
    """Quantization arguments as llm-compressor's recipe YAML and a checkpoint's config write
    them (the library's own serialization; its observers included), JSON-able."""
    d = args.model_dump(mode="json", exclude_none=True)
    return {k: v for k, v in d.items() if v != {}}


def nominal_bits(method: Method, cols: int = 4096) -> float:
    """Bits per weight of a large (cols x cols) matrix in this spec (the x axis of level curves
    across formats)."""
    bits = method.bits_per_weight(cols, cols, 16)
    return float(bits) if bits is not None else math.nan


__all__ = ["FUSED_LAYER_NAMES", "FormatMethod", "activation_hook", "fake_quantize_activation",
           "fake_quantize_weight", "format_grid_of", "fused_matrices", "global_scale", "nominal_bits",
           "observe", "preset_args", "round_e2m1", "round_e4m3", "round_float"]
