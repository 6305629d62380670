"""KV-cache quantization: every key (after the rotary embedding) and value a layer stores is
quantized as it is stored, and every query reads the stored entries, its own position included.

The quantizers work on one cached vector at a time (a position's key or value of one KV head,
or a group of its head dimension), so quantizing the whole key/value tensor of a teacher-forced
pass gives every position exactly the entry a step-by-step decode with a quantizing cache would
have stored for it: teacher-forced FDT equals the first divergence of real greedy generation
with that cache (``tests/test_kvcache.py`` holds it to such a decode on every family). A static
per-layer scale (``kv:fp8:tensor``, engines' ``k_scale`` / ``v_scale``) is elementwise and so
the same.

Where: the attention function every supported family calls with the stored keys and values
(transformers' ``ALL_ATTENTION_FUNCTIONS`` entry, or the modeling file's
``eager_attention_forward``). Both are wrapped once, and the wrapper quantizes only for attention
modules that carry quantizers (:data:`ATTR`), so the dense model of a pair, which shares no module
object with its compressed copy, is never touched. During decoding the cache keeps dense entries
and the wrapper quantizes the whole cache at every step: the same numbers as a cache storing
quantized entries (each entry's quantization depends on that entry alone), at a cost linear in
the context per step.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from dtm_core.errors import DTMError

ATTR = "_dtm_kv_quant"          # attention module attribute: {"k": fn or None, "v": fn or None}
CACHES = ("kcache", "vcache")


# ---------------------------------------------------------------------------------------------
# quantizers of cached vectors (the last dimension is the head dimension)


def _absmax_scale(v: torch.Tensor, top: float) -> torch.Tensor:
    """max|v| / ``top`` over the last dimension (keepdim), 1 where a vector is zero."""
    scale = v.abs().amax(-1, keepdim=True) / top
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def int_quantize(x: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """Each vector (or each group of ``group`` values) of ``x``'s last dimension on a symmetric
    ``bits``-bit grid: scale = max|x| / (2^(bits-1) - 1), round to nearest (ties to even), a
    zero vector stays zero."""
    shape = x.shape
    v = x.float()
    if group is not None:
        v = v.unflatten(-1, (-1, group))
    qmax = 2 ** (bits - 1) - 1
    scale = _absmax_scale(v, qmax)
    out = torch.round(v / scale).clamp_(-qmax, qmax).mul_(scale)
    return out.reshape(shape).to(x.dtype)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` through FP8 E4M3 with one scale per vector (max|x| / 448) or the given static
    ``scale``: x / scale clamped to +-448, rounded as ``torch.float8_e4m3fn`` rounds, times
    scale."""
    from dtm_core.compression.methods.float_scales import round_float

    v = x.float()
    if scale is None:
        scale = _absmax_scale(v, 448.0)
    scaled = torch.div(v, scale).clamp_(-448.0, 448.0)
    return round_float(scaled, 3, -6, inplace=True).mul_(scale).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# the attention wrapper


def _quantized(module, key, value):
    quant = getattr(module, ATTR, None)
    if quant:
        if quant.get("k") is not None and not getattr(key, STORED, False):
            key = quant["k"](key)
        if quant.get("v") is not None and not getattr(value, STORED, False):
            value = quant["v"](value)
    return key, value


STORED = "_dtm_kv_stored"       # a tensor attribute: a cache already quantized these entries


def stored_quantizers(model) -> dict[int, dict]:
    """``{layer index: {"k": fn, "v": fn}}`` of ``model``'s quantized caches, for a cache that
    quantizes what it stores itself (IntactKV's, which keeps the pivot entries dense): it marks
    what it returns (:func:`mark_stored`), and the attention wrapper leaves marked entries as
    they are."""
    from dtm_core.models.components import num_layers

    out = {}
    for i in range(num_layers(model)):
        try:
            quant = getattr(attention_module(model, i)[1], ATTR, None)
        except DTMError:        # a layer without self-attention
            continue
        if quant:
            out[i] = dict(quant)
    return out


def mark_stored(t: torch.Tensor) -> torch.Tensor:
    setattr(t, STORED, True)
    return t


def _wrap(original: Callable) -> Callable:
    if getattr(original, "_dtm_kv_wrapper", False):
        return original

    def attention(module, query, key, value, *args, **kwargs):
        key, value = _quantized(module, key, value)
        return original(module, query, key, value, *args, **kwargs)

    attention._dtm_kv_wrapper = True
    attention.__wrapped__ = original
    return attention


def _install_wrappers(module: torch.nn.Module) -> None:
    """Route ``module``'s attention through the quantizing wrapper: its modeling file's
    ``eager_attention_forward`` and every registered attention implementation (each wrapped
    once; the wrapper is the original for modules without quantizers)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    home = sys.modules.get(type(module).__module__)
    fn = getattr(home, "eager_attention_forward", None)
    if fn is None:
        raise DTMError(f"{type(module).__name__} does not read its keys and values through "
                       "transformers' attention functions, so its KV cache cannot be quantized "
                       "here; KV specs support the families listed by `python -m dtm_core "
                       "families`.")
    if not getattr(fn, "_dtm_kv_wrapper", False):
        home.eager_attention_forward = _wrap(fn)
    for mapping in (AttentionInterface._global_mapping, ALL_ATTENTION_FUNCTIONS._local_mapping):
        for name, impl in list(mapping.items()):
            if not getattr(impl, "_dtm_kv_wrapper", False):
                mapping[name] = _wrap(impl)


@dataclass(frozen=True)
class CacheComponent:
    """One layer's key or value cache, ``LAYER.kcache`` / ``LAYER.vcache``: the stored entries of
    its attention module ``module`` (``path``)."""

    layer: int
    kind: str                 # kcache or vcache
    path: str
    module: torch.nn.Module
    experts = None
    rows = None
    transposed = False
    param = None

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def cache(self) -> str:
        return "k" if self.kind == "kcache" else "v"

    @property
    def params(self) -> int:
        return 0

    @property
    def weight(self):
        raise DTMError(f"{self.name} is a KV cache, which has no weight; weight specs take weight "
                       "components (LAYERS.KIND).")


def attention_module(model, layer: int):
    from dtm_core.models.components import family_of
    from dtm_core.models.families import get_path

    fam = family_of(model)
    lay = fam.decoder_layers(model)[layer]
    try:
        return f"{fam.layers}.{layer}.{fam.attention}", get_path(lay, fam.attention)
    except AttributeError:
        raise DTMError(f"Layer {layer} of this {fam.name} model has no self-attention module "
                       f"('{fam.attention}'), so it has no KV cache to quantize.") from None


def head_dim(model, comp: "CacheComponent") -> int:
    """The head dimension of a cache component's stored vectors."""
    cfg = getattr(model, "config", None)
    hd = getattr(comp.module, "head_dim", None) or getattr(cfg, "head_dim", None)
    if not hd:
        hd = cfg.hidden_size // cfg.num_attention_heads
    return int(hd)


def resolve_cache(model, selection: str) -> list[CacheComponent]:
    """The cache components a selection names: ``*`` / ``all`` every layer's keys and values,
    ``LAYERS.kcache``, ``LAYERS.vcache``, ``LAYERS.kv`` (both) or ``LAYERS.*`` (both), LAYERS
    ``*``, ``N`` or ``N-M``; comma-separated, in layer order."""
    from dtm_core.models.components import num_layers

    n = num_layers(model)
    if not isinstance(selection, str) or not selection.strip():
        raise DTMError("Empty component selection for a KV spec: give * or LAYERS.kcache, "
                       "LAYERS.vcache, LAYERS.kv.")
    wanted: dict[tuple[int, int], None] = {}
    for raw in selection.split(","):
        item = raw.strip()
        if item.lower() in ("*", "all", "*.*"):
            item = "*.kv"
        layers, dot, kind = item.partition(".")
        kind = {"*": "kv", "all": "kv"}.get(kind.strip().lower(), kind.strip().lower())
        layers = "*" if layers.strip().lower() in ("*", "all") else layers.strip()
        if not dot or kind not in ("kcache", "vcache", "kv"):
            raise DTMError(f"Component '{item}' is not a KV cache: a kv: spec takes * or "
                           f"LAYERS.kcache, LAYERS.vcache, LAYERS.kv (layers 0-{n - 1}, e.g. "
                           "*.kcache or 3-5.kv).")
        if layers == "*":
            span = range(n)
        else:
            a, _, b = layers.partition("-")
            if not a.isdigit() or (b and not b.isdigit()) or int(b or a) >= n or \
                    int(a) > int(b or a):
                raise DTMError(f"Layer '{layers}' is out of range: valid layers are 0-{n - 1} "
                               "(or *).")
            span = range(int(a), int(b or a) + 1)
        for i in span:
            for j, c in enumerate(CACHES):
                if kind in ("kv", c):
                    wanted[(i, j)] = None
    out = []
    for i, j in sorted(wanted):
        path, mod = attention_module(model, i)
        out.append(CacheComponent(i, CACHES[j], path, mod))
    return out


class KVHandle:
    """The quantizers one recipe put on attention modules; :meth:`remove` takes them off."""

    def __init__(self):
        self._put: list[tuple[torch.nn.Module, str]] = []

    def add(self, comp: CacheComponent, fn: Callable) -> None:
        _install_wrappers(comp.module)
        quant = dict(getattr(comp.module, ATTR, None) or {})
        quant[comp.cache] = fn
        setattr(comp.module, ATTR, quant)
        self._put.append((comp.module, comp.cache))

    def remove(self) -> None:
        for module, cache in reversed(self._put):
            quant = dict(getattr(module, ATTR, None) or {})
            quant.pop(cache, None)
            if quant:
                setattr(module, ATTR, quant)
            elif hasattr(module, ATTR):
                delattr(module, ATTR)
        self._put.clear()


@contextlib.contextmanager
def cache_hooks(comps: list[CacheComponent], make: Callable):
    """For the duration: each component's entries go through ``make(component, own)`` instead of
    its own quantizer ``own`` (None on a dense model); the modules' quantizers are restored
    after (explain records and patches cache entries with it)."""
    saved = {}
    for c in comps:
        _install_wrappers(c.module)
        saved.setdefault(id(c.module), (c.module, getattr(c.module, ATTR, None)))
    try:
        for c in comps:
            quant = dict(getattr(c.module, ATTR, None) or {})
            quant[c.cache] = make(c, (saved[id(c.module)][1] or {}).get(c.cache))
            setattr(c.module, ATTR, quant)
        yield
    finally:
        for module, old in saved.values():
            if old is not None:
                setattr(module, ATTR, old)
            elif hasattr(module, ATTR):
                delattr(module, ATTR)


def recorder(store: dict) -> Callable:
    """A :func:`cache_hooks` maker that keeps what each component stores (its own quantizer's
    output, or the dense entries) in ``store[name]``."""
    def make(comp, own):
        def fn(x):
            y = own(x) if own is not None else x
            store[comp.name] = y.detach()
            return y
        return fn
    return make


def _watch(model, comps: list[CacheComponent], see: Callable, sequences, use_cache=False):
    """Forward passes of ``model`` on ``sequences`` (token-id lists, one at a time) with
    ``see(component, entries)`` called on each component's stored entries; the last output."""
    def make(comp, own):
        def fn(x):
            see(comp, x)
            return x
        return fn
    out = None
    with cache_hooks(comps, make), torch.no_grad():
        device = next(model.parameters()).device
        for ids in sequences:
            out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=use_cache)
    return out


def record_absmax(model, comps: list[CacheComponent], sequences) -> dict[tuple[int, str], float]:
    """max |entry| of each cache component over forward passes of ``model`` on ``sequences``
    (no padding entries): the calibration of static per-layer scales, as engines calibrate
    their ``k_scale`` / ``v_scale``."""
    seen: dict[tuple[int, str], float] = {}

    def see(c, x):
        key = (c.layer, c.kind)
        seen[key] = max(seen.get(key, 0.0), float(x.detach().abs().amax()))
    _watch(model, comps, see, sequences)
    return seen


@dataclass(frozen=True)
class CacheSlot:
    """What one cache component holds per token of context: ``values`` numbers (KV heads x head
    dimension), on a sliding-window layer of ``window`` tokens (None: every token)."""

    values: int
    window: int | None = None

    def tokens(self, context: int) -> int:
        """Tokens this cache holds between steps with ``context`` tokens of context, as
        transformers' cache holds them: every one, or the last ``window - 1`` on a
        sliding-window layer (the next token's entry makes the window)."""
        return context if self.window is None else min(context, self.window - 1)


def cache_layout(model, comps: list[CacheComponent]) -> dict[str, CacheSlot]:
    """Each cache component's :class:`CacheSlot`, read from what a one-token forward pass of
    ``model`` stores: the entries its attention reads (their heads and head dimension) and the
    window of the cache layer transformers gives it (sliding-window layers)."""
    shapes: dict[str, int] = {}

    def see(c, x):
        shapes[c.name] = int(x.shape[-3] * x.shape[-1]) if x.dim() >= 3 else int(x.shape[-1])
    out = _watch(model, comps, see, [[0]], use_cache=True)
    layers = getattr(getattr(out, "past_key_values", None), "layers", None) or []
    windows = {i: int(layer.sliding_window) for i, layer in enumerate(layers)
               if getattr(layer, "is_sliding", False) and getattr(layer, "sliding_window", None)}
    return {c.name: CacheSlot(shapes[c.name], windows.get(c.layer)) for c in comps}


__all__ = ["ATTR", "CacheComponent", "CacheSlot", "KVHandle", "cache_hooks", "cache_layout",
           "fp8_quantize", "recorder",
           "int_quantize", "mark_stored", "record_absmax", "resolve_cache", "stored_quantizers"]
