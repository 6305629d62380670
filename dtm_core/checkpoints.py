"""Compressed checkpoints made by other tools: what they are, their weights de-quantized, and
whether they compress a given base.

A checkpoint is a transformers folder whose ``config.json`` carries a ``quantization_config``
(llm-compressor's compressed-tensors, GPTQModel/AutoGPTQ, AutoAWQ, bitsandbytes, torchao) or a
GGUF file. Each format is one :class:`Format` in :data:`FORMATS`, found by the config's
``quant_method``; it knows the packages it needs, how to describe its scheme, whether transformers
can load it here, and how to read one module's weight de-quantized to float32
(:class:`CheckpointWeights`, what ``from:PATH`` uses).

Loading the whole checkpoint goes through the library that defines its format wherever the
installed stack runs it (compressed-tensors through transformers, with the activation quantization
that the format defines in the forward pass; bitsandbytes and torchao through transformers).
GPTQ and AWQ kernels come with gptqmodel, which cannot be installed next to the pinned torch, so
those checkpoints are de-quantized (AWQ by compressed-tensors' own AutoAWQ converter, GPTQ by
:func:`unpack_gptq`) into the base architecture: they are weight-only formats, so the forward pass
of the de-quantized model is the checkpoint's function up to the kernels' rounding.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import DTMError

# parameters that quantization formats add next to a weight (scales, zero points, ...)
_QPARAMS = ("_scale", "_zero_point", "_global_scale", "weight_shape", "SCB", "g_idx",
            "weight_packed", "_observer")
_SIZE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "num_local_experts", "num_experts",
               "moe_intermediate_size", "n_embd", "n_layer", "n_head")


# ---------------------------------------------------------------------------------------------
# What a checkpoint is


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, in words a user checks at a glance."""

    source: str
    kind: str                     # compressed-tensors, gptq, awq, bitsandbytes, torchao, gguf, dense
    format: str                   # e.g. "pack-quantized", "Q4_1", "nf4"
    groups: list[str] = field(default_factory=list)    # one line per scheme / group of layers
    quantized: int = 0            # linears (or tensors) stored compressed
    kept: list[str] = field(default_factory=list)      # modules left in full precision
    activations: str = "weights only"   # what happens to activations in the forward pass
    loader: str = ""              # how the whole checkpoint is loaded here
    size_bytes: int | None = None
    base_size_bytes: int | None = None
    algorithm: str | None = None   # e.g. "GPTQModifier" from llm-compressor's recipe.yaml

    def lines(self) -> list[str]:
        out = [f"{self.kind} checkpoint ({self.format})" + (f", made with {self.algorithm}"
                                                            if self.algorithm else "")]
        out += [f"- {g}" for g in self.groups]
        if self.kept:
            shown = ", ".join(self.kept[:6]) + (f" and {len(self.kept) - 6} more"
                                                if len(self.kept) > 6 else "")
            out.append(f"- kept in full precision: {shown}")
        out.append(f"- activations: {self.activations}")
        if self.size_bytes is not None:
            size = f"- size on disk: {_gib(self.size_bytes)}"
            if self.base_size_bytes:
                size += (f" against {_gib(self.base_size_bytes)} for the base "
                         f"({self.size_bytes / self.base_size_bytes:.2f}x)")
            out.append(size)
        if self.loader:
            out.append(f"- loaded {self.loader}")
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

    def to_json(self) -> dict:
        return {"source": self.source, "kind": self.kind, "format": self.format,
                "groups": self.groups, "quantized": self.quantized, "kept": self.kept,
                "activations": self.activations, "loader": self.loader,
                "size_bytes": self.size_bytes, "base_size_bytes": self.base_size_bytes,
                "algorithm": self.algorithm}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def disk_size(source: str | os.PathLike) -> int | None:
    """Bytes of a checkpoint's weight files (a folder's, or one GGUF file)."""
    p = Path(os.path.expanduser(str(source)))
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.suffix in _SIZE_SUFFIXES)
    return None


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DTMError(f"Could not read the config.json of '{path}': {exc}") from exc


def quant_method(config: dict) -> str | None:
    q = config.get("quantization_config")
    if isinstance(q, dict):
        return str(q.get("quant_method") or "").lower() or None
    return None


def _require(package: str, pip: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise DTMError(f"{what} needs the {package} package, which is not installed: "
                       f"pip install {pip}")
    if package == "compressed_tensors":
        try:   # its loguru warnings (group sizes, formats) are not the user's business here
            from loguru import logger
            logger.disable("compressed_tensors")
        except ImportError:
            pass


# ---------------------------------------------------------------------------------------------
# Reading tensors from safetensors shards


class Shards:
    """Every tensor of a folder's safetensors files, opened lazily."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise DTMError(f"'{folder}' holds no .safetensors file; only safetensors "
                           "checkpoints can be read component by component.")
        self.where: dict[str, object] = {}
        for f in files:
            h = safe_open(str(f), "pt", device="cpu")
            for k in h.keys():
                self.where[k] = h

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self):
        return self.where.keys()

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


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


# ---------------------------------------------------------------------------------------------
# Formats


class Format:
    """One checkpoint format: detection by ``quant_method``, description, loading, reading."""

    name = ""
    methods: tuple[str, ...] = ()
    transformers_loads = True       # False: de-quantized into the base architecture here
    can_dequantize = False          # True: load_dequantized can read it (module by module)

    def via_transformers(self, config: dict) -> bool:
        """Whether transformers loads this checkpoint here (else :func:`load_dequantized`)."""
        return self.transformers_loads

    def requirements(self) -> None:
        """Raise one sentence naming what is missing to load this format here."""

    def describe(self, path: Path, config: dict, info: CheckpointInfo) -> None:
        q = config.get("quantization_config") or {}
        info.format = str(q.get("quant_method"))

    def reader(self, path: Path, config: dict) -> "CheckpointWeights | None":
        """How to read one tensor at a time; None: from the whole model loaded by transformers
        (:class:`dtm_core.models.LoadedWeights`)."""
        return None


FORMATS: dict[str, Format] = {}


def register_format(cls):
    fmt = cls()
    for m in cls.methods:
        FORMATS[m] = fmt
    return cls


def _bits_words(bits, abits, group, sym, kind="int", extra=""):
    gtxt = f"g{group}" if group and group > 0 else "per channel"
    a = f"A{abits}" if abits else "A16"
    return (f"W{bits}{a} {gtxt} {'symmetric' if sym else 'asymmetric'}"
            + ("" if kind.startswith("int") else f" {kind}") + extra)


@functools.lru_cache(maxsize=4)
def meta_model(path: str):
    """A checkpoint's architecture on the meta device (module names and types, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(path)
    if hasattr(conf, "quantization_config"):
        del conf.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


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
            if w is None:
                text = "activations only"
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
                how = "dynamic" if a.dynamic else "static"
                strat = str(getattr(a.strategy, "value", a.strategy))
                atype = "int" if _is_int(a) else "fp"
                acts.append(f"{atype}{a.num_bits} {how} per-{strat} input activations")
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


def _kept_linears(path: Path, quantized: set[str]) -> list[str]:
    model = meta_model(str(path))
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n not in quantized]
    return _shorten(kept)


def _shorten(names: list[str]) -> list[str]:
    """``model.layers.3.mlp.gate`` for every layer -> ``model.layers.*.mlp.gate``."""
    pats = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    return pats


def _describe_packed(path: Path, info: CheckpointInfo, words: str, algorithm: str,
                     by: str) -> None:
    """GPTQ and AWQ: one scheme over the modules that have a packed ``qweight``."""
    mods = PackedWeights.packed_modules(Shards(path))
    info.groups.append(f"{words}, {len(mods)} linears")
    info.quantized = len(mods)
    info.kept = _kept_linears(path, set(mods))
    info.algorithm = algorithm
    info.loader = f"de-quantized into the base architecture by {by}"


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


@register_format
class TorchAO(Format):
    name = "torchao"
    methods = ("torchao",)

    def requirements(self):
        _require("torchao", "torchao==0.18.0", "This torchao checkpoint")

    def describe(self, path, config, info):
        q = config["quantization_config"]
        qt = q.get("quant_type")
        name = qt.get("default", qt) if isinstance(qt, dict) else qt
        if isinstance(name, dict):
            name = name.get("_type", "torchao config")
        info.format = str(name)
        info.groups.append(f"{name}")
        if "Dynamic" in str(name):
            info.activations = ("dynamically quantized activations (reproduced in the forward "
                                "pass; from: compares weights only)")
        info.loader = "through transformers with torchao"


# ---------------------------------------------------------------------------------------------
# De-quantized weights of one module at a time


class CheckpointWeights:
    """A checkpoint's tensors under the base model's names, de-quantized to float32."""

    def tensor(self, name: str) -> torch.Tensor | None:
        """The tensor ``name`` (e.g. ``model.layers.0.mlp.down_proj.weight``), or None when the
        checkpoint has none of that name."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Every tensor name the checkpoint provides, as the base model names them."""
        raise NotImplementedError

    def input_hook(self, module: str) -> Callable | None:
        """The forward pre-hook reproducing the format's quantization of this module's input
        (None for weight-only formats)."""
        return None

    path: Path | None = None            # set by checkpoint_weights

    def as_model(self, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        """The whole checkpoint de-quantized into its config's architecture (no activation
        hooks), through transformers' loading of a state dict."""
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        state = {n: t.to(dtype) for n in self.names() if (t := self.tensor(n)) is not None}
        cls = AutoModelForCausalLM._model_mapping[type(cfg)]
        try:
            model, info = cls.from_pretrained(None, config=cfg, state_dict=state, dtype=dtype,
                                              output_loading_info=True)
        except (RuntimeError, ValueError) as exc:
            raise DTMError(f"The checkpoint '{self.path}' does not fit its own config's "
                           f"architecture: {str(exc).splitlines()[0][:160]}") from exc
        missing = [n for n in info.get("missing_keys", []) if not n.endswith("lm_head.weight")]
        if missing:
            raise DTMError(f"The checkpoint '{self.path}' does not fit its own config's "
                           f"architecture: {len(missing)} tensors missing (e.g. {missing[0]}).")
        return model.eval()

    def fused(self, name: str) -> torch.Tensor | None:
        """A parameter as the architecture holds it when the checkpoint stores it otherwise
        (experts one module each, fused into one 3-D parameter on load): from the whole
        checkpoint de-quantized once (one more copy of the model, kept with this reader)."""
        if getattr(self, "_whole", None) is None:
            self._whole = dict(self.as_model().named_parameters())
        t = self._whole.get(name)
        return None if t is None else t.detach().float()


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
        return comp.decompress(local, scheme)["weight"].float()

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


class PlainWeights(CheckpointWeights):
    """Plain safetensors (an unquantized folder, or a GGUF's de-quantized cache), read lazily."""

    def __init__(self, folder: Path):
        self.shards = Shards(folder)

    def names(self):
        return list(self.shards.keys())

    def tensor(self, name):
        return self.shards.get(name).float() if name in self.shards else None


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


def dequantized(w: torch.Tensor, module=None) -> torch.Tensor:
    """A (possibly quantized) parameter as a plain tensor: bitsandbytes 4-bit and int8
    parameters, torchao tensor subclasses, or the tensor itself."""
    cls = type(w).__name__
    if cls == "Params4bit":
        import bitsandbytes.functional as F

        return F.dequantize_4bit(w.data, w.quant_state).float()
    if cls == "Int8Params":
        scb = getattr(w, "SCB", None)
        if scb is None and module is not None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise DTMError("A bitsandbytes int8 weight has no row scales (SCB) to de-quantize.")
        return w.data.float() * scb.float()[:, None] / 127.0
    if hasattr(w, "dequantize") and cls not in ("Parameter", "Tensor"):
        return w.dequantize()
    return w.detach()


def located(reader: CheckpointWeights, path: str) -> CheckpointWeights:
    reader.path = Path(path)
    return reader


def resolve_source(source: str) -> str:
    """A checkpoint's local path: a folder, a .gguf file, or a hub id's folder in the local
    Hugging Face cache."""
    from .sources import _classify, local_snapshot

    if source.strip() == "default":
        return "default"
    p = Path(os.path.expanduser(source.strip()))
    if not p.exists():
        kind, _ = _classify(source.strip())     # a bad path or hub id: its own sentence
        snap = local_snapshot(source.strip()) if kind == "hub" else None
        if snap is None:
            raise DTMError(f"Checkpoint '{source}' is not in the local Hugging Face cache and "
                           "cannot be downloaded here; give a local folder.")
        p = snap
    if p.is_dir() and not (p / "config.json").is_file():
        raise DTMError(f"Folder '{source}' holds no config.json, so it is not a checkpoint.")
    return str(p.resolve())


def stamp(path: str) -> tuple:
    if path == "default":
        return ("default",)
    p = Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def fingerprint(source: str) -> str:
    """What identifies a checkpoint's contents (its files' names, sizes and times)."""
    import hashlib

    path = resolve_source(source)
    return hashlib.sha256(json.dumps([path, stamp(path)]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The whole checkpoint


def inspect(source: str, base: str | None = None) -> CheckpointInfo:
    """What a checkpoint is (without loading its weights): format, schemes, what is kept,
    activations, size on disk (against ``base``'s when given)."""
    from .sources import _classify

    kind, path = _classify(source)
    if kind == "hub":
        kind, path = "folder", Path(resolve_source(source))
    info = CheckpointInfo(source=source, kind="dense", format="unquantized")
    if kind in ("default", "gguf"):
        _describe_gguf(path, info)
    elif kind == "folder":
        config = read_config(path)
        method = quant_method(config)
        if method:
            fmt = FORMATS.get(method)
            info.kind = method
            if fmt is None:
                info.format = method
                info.loader = "through transformers (a format DTM Inspector does not describe)"
            else:
                fmt.requirements()
                fmt.describe(path, config, info)
        else:
            info.loader = "through transformers"
        info.size_bytes = disk_size(path)
    if base:
        try:
            bk, bpath = _classify(base)
            info.base_size_bytes = disk_size(bpath) if bpath is not None else None
        except DTMError:
            info.base_size_bytes = None
    return info


def _describe_gguf(path: Path, info: CheckpointInfo) -> None:
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in r.tensors if len(t.shape) > 1)
    info.kind = "gguf"
    info.format = ", ".join(f"{k}" for k, _ in types.most_common(1)) or "gguf"
    info.groups = [f"{k}: {n} matrices" for k, n in types.most_common()]
    info.quantized = sum(n for k, n in types.items() if k not in ("F32", "F16", "BF16"))
    info.size_bytes = path.stat().st_size
    info.loader = "de-quantized by transformers (gguf-py), cached as safetensors"


def load_dequantized(path: Path, config: dict, weights: CheckpointWeights, dtype: torch.dtype,
                     device: torch.device, trust_remote_code: bool = False):
    """(tokenizer, model) of a checkpoint that transformers cannot load here: the base
    architecture from its config, every tensor from :class:`CheckpointWeights`, handed to
    transformers as a state dict (so its own conversions apply: experts stored one module each
    are fused as the architecture wants them, tied weights are tied)."""
    from transformers import AutoTokenizer

    FORMATS[quant_method(config)].requirements()
    model = weights.as_model(dtype, trust_remote_code)
    for name, mod in model.named_modules():     # the format's activation quantization
        hook = weights.input_hook(name)
        if hook is not None:
            mod.register_forward_pre_hook(hook)
    model.to(device)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return tok, model


def finish_load(model) -> None:
    """After transformers loaded a compressed-tensors checkpoint: decompress its weights now
    (the library would on the first forward), keeping its activation quantization."""
    q = getattr(model, "hf_quantizer", None)
    comp = getattr(q, "compressor", None)
    if comp is not None and hasattr(comp, "decompress_model"):
        if any(str(getattr(m, "quantization_status", "")) == "QuantizationStatus.COMPRESSED"
               or getattr(getattr(m, "quantization_status", None), "value", None) == "compressed"
               for m in model.modules()):
            comp.decompress_model(model)


def explain_load_error(source: str, config: dict, exc: BaseException) -> DTMError | None:
    """One sentence for a checkpoint that the installed stack cannot run here."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    method = quant_method(config)
    m = re.search(r"[Rr]equires? (?:the )?`?([A-Za-z0-9_.-]+)`?\s*(>=\s*[\d.]+)?", msg)
    if "GPU is required" in msg or "CUDA" in msg and "required" in msg:
        return DTMError(f"The {method} checkpoint '{source}' needs a CUDA GPU to run its kernels, "
                        "and none is available here.")
    if isinstance(exc, ImportError) or m:
        pkg = m.group(1) if m else msg
        return DTMError(f"The {method} checkpoint '{source}' needs {pkg}"
                        f"{' ' + m.group(2).replace(' ', '') if m and m.group(2) else ''}, which "
                        f"the installed stack lacks here ({msg.rstrip('.')}).")
    return None


# ---------------------------------------------------------------------------------------------
# Is it a compression of the base?


def config_differences(dense_cfg, comp_cfg) -> list[str]:
    """What differs between two configs in architecture and shapes, in words."""
    out = []
    a = dense_cfg.to_dict() if hasattr(dense_cfg, "to_dict") else dict(dense_cfg)
    b = comp_cfg.to_dict() if hasattr(comp_cfg, "to_dict") else dict(comp_cfg)
    if a.get("model_type") != b.get("model_type"):
        out.append(f"architecture {b.get('model_type')} against the base's {a.get('model_type')}")
    for k in _SHAPE_KEYS:
        if k in a and k in b and a[k] != b[k]:
            out.append(f"{k} {b[k]} against the base's {a[k]}")
    return out


def shape_differences(dense: torch.nn.Module, comp: torch.nn.Module) -> list[str]:
    """Parameters missing on either side or shaped differently (after de-quantization)."""
    dp = dict(dense.named_parameters())
    cp = dict(comp.named_parameters())
    out = []
    missing = [n for n in dp if n not in cp and not n.endswith("lm_head.weight")]
    extra = [n for n in cp if n not in dp and not n.endswith(_QPARAMS)]
    if missing:
        out.append(f"{len(missing)} of the base's tensors are missing (e.g. {missing[0]})")
    if extra:
        out.append(f"{len(extra)} tensors the base lacks (e.g. {extra[0]})")
    for n, t in dp.items():
        c = cp.get(n)
        if c is None or type(c).__name__ in ("Params4bit", "Int8Params"):
            continue
        if tuple(c.shape) != tuple(t.shape):
            out.append(f"{n} is {tuple(c.shape)} against the base's {tuple(t.shape)}")
            break
    return out
