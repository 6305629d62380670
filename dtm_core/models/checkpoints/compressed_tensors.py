"""llm-compressor checkpoints (``quant_method: compressed-tensors``): schemes matched on the
architecture as the library matches them, each module's weight through the library's own
decompressor, legacy bitmask-sparse formats through its ``unpack_bitmasks``, and the scheme's
input-activation quantization reproduced in the forward pass.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from dtm_core.models.checkpoints.base import (CheckpointWeights, Format, Shards, _bits_words,
                                              _kept_linears, _require, meta_model, register_format)


@register_format
class CompressedTensors(Format):
    name = "compressed-tensors"
    methods = ("compressed-tensors",)
    can_dequantize = True

    def requirements(self):
        _require("compressed_tensors", "compressed-tensors==0.20.0",
                 "This llm-compressor (compressed-tensors) checkpoint")

    def via_transformers(self, config):
        # compressed-tensors 0.20 dropped the bitmask sparse compressors: transformers would
        # leave those weights uninitialized, so they are read here (bitmasks unpacked by the
        # library's own helper)
        return _ct_sparse_format(config) not in LEGACY_SPARSE

    def describe(self, path, config, info):
        q = _ct_quant_config(config)
        info.format = str(q.format) if q is not None else "dense"
        schemes = ct_schemes(path, config)
        acts = []
        for gname, scheme in (q.config_groups.items() if q is not None else ()):
            w = scheme.weights
            a = scheme.input_activations
            n = sum(1 for s in schemes.values() if s is scheme or s == scheme)
            named = float_scheme_words(w, a) if w is not None else None
            if w is None:
                text = "activations only"
            elif named is not None:
                text = named
            else:
                strat = str(getattr(w.strategy, "value", w.strategy))
                group = w.group_size if strat == "group" else None
                kind = "integer" if _is_int(w) else "float"
                words = _bits_words(w.num_bits, a.num_bits if a else None, group, w.symmetric,
                                    kind)
                if strat in ("tensor", "block"):
                    words = words.replace("per channel", f"per {strat}")
                if getattr(w, "actorder", None):
                    words += f", act-order {getattr(w.actorder, 'value', w.actorder)}"
                text = words
            if a is not None:
                acts.append(activation_words(a))
            info.groups.append(f"{gname}: {text}, {n} linears")
        sp = (config.get("quantization_config") or {}).get("sparsity_config") or {}
        sparse_mods = [k[:-len(".bitmask")] for k in Shards(path).keys() if k.endswith(".bitmask")]
        if sp and not sparse_mods:      # stored dense: the config's targets say which are sparse
            from compressed_tensors.utils.match import match_named_modules

            sparse_mods = [n for n, _ in match_named_modules(
                meta_model(str(path)), sp.get("targets") or ["Linear"], sp.get("ignore") or [])]
        if sp:
            fmt = sp.get("format", "dense")
            share = sp.get("global_sparsity")
            info.groups.append(
                f"sparsity: {sp.get('sparsity_structure') or 'unstructured'}, stored {fmt}"
                + (f", {len(sparse_mods)} linears" if sparse_mods else "")
                + (f", global sparsity {float(share):.1%}" if share is not None else ""))
            if q is None:
                info.format = fmt
        info.quantized = len(set(schemes) | set(sparse_mods))
        info.kept = _kept_linears(path, set(schemes) | set(sparse_mods))
        if acts:
            info.activations = "; ".join(sorted(set(acts))) + " (reproduced in the forward pass)"
        if self.via_transformers(config):
            info.loader = "through transformers with compressed-tensors (the format's own forward)"
        else:
            info.loader = ("de-quantized into the base architecture by DTM Inspector (the "
                           f"{_ct_sparse_format(config)} bitmasks through compressed-tensors' "
                           "unpack_bitmasks)")
        recipe = path / "recipe.yaml"
        if recipe.is_file():
            mods = re.findall(r"\b([A-Z][A-Za-z]*Modifier)\b", recipe.read_text(errors="replace"))
            if mods:
                info.algorithm = ", ".join(dict.fromkeys(mods))

    def reader(self, path, config):
        return CTWeights(path, config)


def _value(x) -> str:
    return str(getattr(x, "value", x))


def float_scheme_words(w, a) -> str | None:
    """A float scheme named as its maker names it (NVFP4, MXFP4, MXFP8, FP8 per channel / per
    tensor / block RxC, W4AFP8), with what its scales are, and the compressed-tensors preset it
    equals; None for the integer schemes the generic words describe."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    strat, fp = _value(w.strategy), not _is_int(w)
    scale = _value(w.scale_dtype) if getattr(w, "scale_dtype", None) is not None else ""
    if fp and w.num_bits == 4 and strat == "tensor_group":
        name = (f"NVFP4: FP4 E2M1 weights in groups of {w.group_size}, FP8 E4M3 group scales, "
                "one FP32 global scale per tensor")
    elif fp and strat == "group" and "uint8" in scale:
        elem = {4: "FP4 E2M1", 6: "FP6 E2M3", 8: "FP8 E4M3"}.get(w.num_bits, f"FP{w.num_bits}")
        name = (f"MXFP{w.num_bits}: {elem} weights in groups of {w.group_size}, power-of-two "
                "(E8M0) scales")
    elif fp and w.num_bits == 8 and strat == "block":
        r, c = w.block_structure
        name = f"FP8 block {r}x{c}: FP8 E4M3 weights, one scale per {r}x{c} block"
    elif fp and w.num_bits == 8 and strat in ("channel", "tensor"):
        name = f"FP8 per {strat}: FP8 E4M3 weights, one scale per {'output channel' if strat == 'channel' else 'tensor'}"
    elif (not fp and w.num_bits == 4 and a is not None and not _is_int(a)
          and a.num_bits == 8):
        name = (f"W4AFP8: int4 weights in groups of {w.group_size}, FP8 activations")
    else:
        return None
    same = [k for k, v in PRESET_SCHEMES.items() if _args_key(v.get("weights")) == _args_key(w)
            and _args_key(v.get("input_activations")) == _args_key(a)]
    return name + (f" (preset {same[0]})" if same else "")


def _args_key(args) -> tuple | None:
    """What makes two quantization arguments the same scheme (observers aside)."""
    if args is None:
        return None
    return tuple(_value(getattr(args, k, None)) for k in (
        "num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic",
        "scale_dtype"))


def activation_words(a) -> str:
    """What happens to a module's input under a scheme's input-activation arguments."""
    how = "dynamic" if a.dynamic is True else ("static" if not a.dynamic else
                                               "dynamic group scales, static global scale")
    strat = _value(a.strategy)
    if not _is_int(a) and a.num_bits == 4 and strat == "tensor_group":
        kind = "NVFP4"
    elif not _is_int(a) and strat == "group" and "uint8" in _value(a.scale_dtype or ""):
        kind = f"MXFP{a.num_bits}"
    else:
        kind = f"{'int' if _is_int(a) else 'fp'}{a.num_bits}"
    per = (f"per group of {a.group_size}" if strat in ("group", "tensor_group") else
           f"per-{strat}")
    return f"{kind} {how} {per} input activations"


FP4_COMPRESSORS = ("NVFP4PackedCompressor", "MXFP4PackedCompressor")


def decompress(compressor, local: dict, scheme) -> torch.Tensor:
    """One module's weight through its compressor. The FP4 compressors unpack into bfloat16
    (their default), which rounds the format's exact values (FP4 x FP8 or E8M0 scale / global
    scale); for those the library's own unpacking and ``dequantize`` run in float32 instead."""
    cls = compressor if isinstance(compressor, type) else type(compressor)
    if "weight_packed" in local and cls.__name__ in FP4_COMPRESSORS:
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        packed = local["weight_packed"]
        m, n = packed.shape
        q = unpack_fp4_from_uint8(packed, m, n * 2, dtype=torch.float32)
        scale = compressor._decompress_scale(local["weight_scale"], torch.float32)
        return dequantize(q, scale, args=scheme.weights,
                          global_scale=local.get("weight_global_scale"), dtype=torch.float32)
    return compressor.decompress(local, scheme)["weight"]


def exact_fp4_weights(model) -> dict:
    """Before transformers' compressed-tensors integration decompresses a loaded model: the exact
    float32 weight of every FP4-packed module (see :func:`decompress`), by module."""
    out = {}
    for m in model.modules():
        scheme = getattr(m, "quantization_scheme", None)
        w = getattr(scheme, "weights", None)
        if w is None or not hasattr(m, "weight_packed") or w.num_bits != 4 or _is_int(w):
            continue
        from compressed_tensors.compressors.base import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format

        comp = BaseCompressor.get_value_from_registry(
            _value(infer_module_format(torch.nn.Linear, scheme)))
        local = {k: getattr(m, k).data for k in ("weight_packed", "weight_scale",
                                                  "weight_global_scale") if hasattr(m, k)}
        out[m] = decompress(comp, local, scheme)
    return out


def _is_int(args) -> bool:
    """Whether compressed-tensors quantization arguments are of the integer type."""
    from compressed_tensors.quantization import QuantizationType

    return args.type == QuantizationType.INT


LEGACY_SPARSE = ("sparse-bitmask", "sparse-24-bitmask")


def _ct_sparse_format(config: dict) -> str | None:
    sp = (config.get("quantization_config") or {}).get("sparsity_config") or {}
    return sp.get("format")


def _ct_quant_config(config: dict):
    """The QuantizationConfig of a compressed-tensors config, or None for a sparse-only one."""
    from compressed_tensors.quantization import QuantizationConfig

    q = config["quantization_config"]
    if not q.get("config_groups"):
        return None
    return QuantizationConfig.model_validate(q)


def ct_schemes(path: Path, config: dict) -> dict:
    """Module path -> its compressed-tensors QuantizationScheme, matched on the architecture the
    way the library matches it (targets and ignore over module names and types)."""
    from compressed_tensors.utils.match import match_named_modules

    q = _ct_quant_config(config)
    if q is None:
        return {}
    model = meta_model(str(path))
    out = {}
    for scheme in q.config_groups.values():
        for name, _ in match_named_modules(model, scheme.targets, q.ignore or []):
            out[name] = scheme
    return out


class CTWeights(CheckpointWeights):
    """compressed-tensors: each module's weight through the library's own decompressor."""

    _SPARSE = ("compressed", "bitmask", "shape", "row_offsets")

    def __init__(self, path: Path, config: dict):
        from compressed_tensors.compressors.base import BaseCompressor

        self.shards = Shards(path)
        self.q = _ct_quant_config(config)
        self.schemes = ct_schemes(path, config)
        self._compressor = BaseCompressor.get_value_from_registry

    def names(self):
        out = []
        for k in self.shards.keys():
            mod, _, p = k.rpartition(".")
            if f"{mod}.bitmask" in self.shards and p in self._SPARSE:
                out.append(f"{mod}.weight")
            elif mod in self.schemes:
                if p in ("weight", "weight_packed"):
                    out.append(f"{mod}.weight")
                elif p == "bias":
                    out.append(k)
            else:
                out.append(k)
        return list(dict.fromkeys(out))

    def _sparse(self, mod: str) -> torch.Tensor:
        """A legacy bitmask-compressed weight, dense again: the kept values at the bitmask's
        positions in row-major order (sparse-bitmask and sparse-24-bitmask alike)."""
        from compressed_tensors.utils.helpers import unpack_bitmasks

        shape = self.shards.get(f"{mod}.shape").flatten().tolist()
        values = self.shards.get(f"{mod}.compressed")
        mask = unpack_bitmasks(self.shards.get(f"{mod}.bitmask"), shape)
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[mask] = values.flatten()
        return dense

    def _format(self, scheme) -> str:
        fmt = scheme.format or (self.q.format if self.q is not None else None)
        if fmt in (None, "mixed-precision"):
            from compressed_tensors.compressors.format import infer_module_format

            fmt = infer_module_format(torch.nn.Linear, scheme)
        return str(getattr(fmt, "value", fmt))

    def tensor(self, name):
        mod, _, p = name.rpartition(".")
        scheme = self.schemes.get(mod)
        sparse = p == "weight" and f"{mod}.bitmask" in self.shards
        if scheme is None or p != "weight" or scheme.weights is None:
            if sparse:
                return self._sparse(mod).float()
            return self.shards.get(name).float() if name in self.shards else None
        comp = self._compressor(self._format(scheme))
        local = {pn: self.shards.get(f"{mod}.{pn}")
                 for pn in comp.compression_param_names(scheme) if f"{mod}.{pn}" in self.shards}
        if sparse:    # sparse and quantized: the bitmask holds the quantized values
            local["weight"] = self._sparse(mod)
        if not local:
            return None
        return decompress(comp, local, scheme).float()

    def input_hook(self, module):
        scheme = self.schemes.get(module)
        if scheme is None or scheme.input_activations is None:
            return None
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        holder = torch.nn.Module()
        holder.quantization_status = QuantizationStatus.FROZEN
        for pn in ("input_scale", "input_zero_point", "input_global_scale"):
            if f"{module}.{pn}" in self.shards:
                setattr(holder, pn, self.shards.get(f"{module}.{pn}"))
        args = scheme.input_activations

        def hook(m, inputs):
            x = inputs[0]
            for pn in ("input_scale", "input_zero_point", "input_global_scale"):
                t = getattr(holder, pn, None)
                if t is not None and t.device != x.device:
                    setattr(holder, pn, t.to(x.device))
            return (forward_quantize(holder, x, "input", args),) + tuple(inputs[1:])
        return hook
