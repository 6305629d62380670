"""What every checkpoint format shares: :class:`CheckpointInfo` (what a checkpoint is, in words),
the :class:`Format` registry (:data:`FORMATS`, found by the config's ``quant_method``),
:class:`CheckpointWeights` (one tensor at a time, de-quantized to float32, under the base model's
names), safetensors shards read lazily, and the helpers the formats' modules use.
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

from dtm_core.errors import DTMError


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
    """A checkpoint's config.json; an NVIDIA ModelOpt export that states its quantization only
    in ``hf_quant_config.json`` gets it as ``quantization_config`` (``quant_method: modelopt``)."""
    try:
        config = json.loads((path / "config.json").read_text())
        extra = path / "hf_quant_config.json"
        if "quantization_config" not in config and extra.is_file():
            q = json.loads(extra.read_text())
            config["quantization_config"] = {"quant_method": "modelopt",
                                             **(q.get("quantization") or {}),
                                             "producer": q.get("producer")}
        return config
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


def _kept_linears(path: Path, quantized: set[str]) -> list[str]:
    model = meta_model(str(path))
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n not in quantized]
    return _shorten(kept)


def _shorten(names: list[str]) -> list[str]:
    """``model.layers.3.mlp.gate`` for every layer -> ``model.layers.*.mlp.gate``."""
    pats = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    return pats


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


class PlainWeights(CheckpointWeights):
    """Plain safetensors (an unquantized folder, or a GGUF's de-quantized cache), read lazily."""

    def __init__(self, folder: Path):
        self.shards = Shards(folder)

    def names(self):
        return list(self.shards.keys())

    def tensor(self, name):
        return self.shards.get(name).float() if name in self.shards else None


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
