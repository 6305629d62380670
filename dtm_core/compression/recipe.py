"""Recipes of compression specs over components, and their reversible application.

A spec is a method config from the registry in :mod:`dtm_core.compression.methods` (``int4:g128``,
``magnitude:0.9``, ...); :func:`apply_recipe` applies a list of (selection, spec) to a model by
swapping in new weight tensors for the selected components only. :meth:`Applied.restore` puts the
very same original Parameter objects back, so restoring is bit-exact and costs nothing.

Every transform works on the weight as a float32 (out, in) matrix; GPT-2's Conv1D weights, stored
(in, out), are transposed on the way in and out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

import torch

from dtm_core.models.components import Component, resolve
from dtm_core.errors import DTMError
from dtm_core.compression.methods import Method, Spec, accepted_forms, parse_spec  # noqa: F401 (re-exported)
from dtm_core.compression.methods.magnitude import magnitude_prune  # noqa: F401
from dtm_core.compression.methods.nm import nm_prune  # noqa: F401
from dtm_core.compression.methods.rtn import quantize_weight  # noqa: F401
from dtm_core.compression.methods.w8a8 import quantize_activation_per_token  # noqa: F401
from dtm_core.compression.methods.wanda import wanda_prune  # noqa: F401


def transform_weight(w: torch.Tensor, spec: Method | str, in_norm: torch.Tensor | None = None,
                     name: str = "", stats: Mapping[str, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """Apply a spec to a float32 (out, in) matrix and return the new matrix (``in_norm``: the
    input norms a method such as wanda needs; ``stats``: any calibration statistics by name)."""
    stats = dict(stats or {})
    if in_norm is not None:
        stats.setdefault("input_norms", in_norm)
    return parse_spec(spec).apply(w, stats, name)


# ---------------------------------------------------------------------------------------------
# Recipes and reversible application


@dataclass(frozen=True)
class RecipeItem:
    selection: str
    spec: Method

    def __str__(self) -> str:
        return f"{self.spec}@{self.selection}"


@dataclass(frozen=True)
class Recipe:
    """An ordered list of (component selection, spec)."""

    items: tuple[RecipeItem, ...] = field(default_factory=tuple)

    @classmethod
    def single(cls, spec: str | Method, selection: str = "*.*") -> "Recipe":
        sp = parse_spec(spec)
        return cls((RecipeItem(selection.strip() if selection else "*.*", sp),))

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """``SPEC@SELECTION;SPEC@SELECTION`` (a bare SPEC means every component)."""
        items = []
        for chunk in (c.strip() for c in str(text).split(";")):
            if not chunk:
                continue
            spec, _, sel = chunk.partition("@")
            items.append(RecipeItem(sel.strip() or "*.*", parse_spec(spec)))
        if not items:
            raise DTMError("Empty recipe: give at least one SPEC@SELECTION.")
        return cls(tuple(items))

    def to_json(self) -> list[dict]:
        return [{"spec": str(i.spec), "components": i.selection} for i in self.items]

    @classmethod
    def from_json(cls, data) -> "Recipe":
        """A recipe from ``[{"spec":..., "components":...}]`` or ``{"recipe": [...]}``."""
        if isinstance(data, dict):
            data = data.get("recipe")
        if not isinstance(data, list) or not data:
            raise DTMError("A recipe file must hold a non-empty list under 'recipe' of "
                           "{\"spec\": ..., \"components\": ...} entries.")
        items = []
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or "spec" not in entry:
                raise DTMError(f"Recipe entry {i} has no 'spec'.")
            items.append(RecipeItem(str(entry.get("components") or "*.*"),
                                    parse_spec(str(entry["spec"]))))
        return cls(tuple(items))

    @classmethod
    def load(cls, path: str) -> "Recipe":
        try:
            with open(path, encoding="utf-8") as fh:
                return cls.from_json(json.load(fh))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DTMError(f"Could not read recipe file '{path}': {exc}") from exc

    def __str__(self) -> str:
        return ";".join(str(i) for i in self.items)

    @property
    def needs_calibration(self) -> bool:
        return any(i.spec.needs_calibration for i in self.items)

    @property
    def sequential_default(self) -> bool:
        """Whether a pair of this recipe is calibrated layer by layer unless told otherwise:
        when one of its methods is (GPTQ, SparseGPT, Wanda, AWQ, as llm-compressor runs them)."""
        return any(i.spec.sequential and i.spec.needs_calibration for i in self.items)

    def components(self, model) -> list[tuple[Component, Method]]:
        """(component, spec) in application order; validates every selection first. A KV-cache
        spec (``kv:...``) selects cache components (``LAYER.kcache`` / ``LAYER.vcache``)."""
        from dtm_core.compression.kvcache import resolve_cache

        out = []
        for item in self.items:
            if item.spec.targets_cache:
                out += [(c, item.spec) for c in resolve_cache(model, item.selection)]
                continue
            kinds = {part.strip().rpartition(".")[2].lower() for part in item.selection.split(",")}
            if kinds & {"kcache", "vcache", "kv"}:
                raise DTMError(f"{item.spec} is a weight spec, and '{item.selection}' names KV "
                               "caches; caches take a kv: spec (kv:int8, kv:fp8, ...).")
            out += [(c, item.spec) for c in resolve(model, item.selection)]
        return out

    @property
    def has_cache_specs(self) -> bool:
        return any(i.spec.targets_cache for i in self.items)


class Applied:
    """Handle of an applied recipe: :meth:`restore` puts the original tensors back.

    ``keeper`` (an :class:`~dtm_core.compression.inplace.Keeper`) decides where a replaced tensor
    waits until :meth:`restore` when the recipe compresses the dense model itself (in memory, in
    CPU memory, re-read from the model's files, or dropped); None keeps it as it is (a copy's
    tensors are the dense model's own)."""

    def __init__(self, keeper=None):
        self._saved: list[tuple[torch.nn.Module, str, object]] = []
        self._hooks: list = []
        self.keeper = keeper
        self.changed_bytes = 0
        self.changed_params = 0
        self.layer_by_layer = False   # statistics gathered on the compressed layers' outputs

    @property
    def in_place(self) -> bool:
        return self.keeper is not None

    def save(self, module: torch.nn.Module, name: str, orig) -> None:
        """Remember ``module.name``'s original tensor (through the keeper when in place)."""
        held = orig if self.keeper is None else self.keeper.keep(module, name, orig)
        self._saved.append((module, name, held))

    def restore(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        saved, self._saved = self._saved, []
        for module, name, held in reversed(saved):
            setattr(module, name, held if self.keeper is None else self.keeper.back(held))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _plain_components(model, layer: int) -> dict[str, Component]:
    """Module path -> the whole 2-D component of that module in one layer (no slices, no
    experts)."""
    out = {}
    for c in resolve(model, f"{layer}.*"):
        if c.experts is None and c.rows is None:
            out.setdefault(c.path, c)
    return out


def _stat_keys(c: Component) -> list[str]:
    """The names a component's statistics are kept under: its module path, or one per expert."""
    from dtm_core.compression.calibration import expert_key

    if c.experts is None:
        return [c.path]
    return [expert_key(c.path, c.param, e) for e in c.experts]


def gather_statistics(model, pairs, calibration) -> dict:
    """``{(module path, spec): statistics}`` for every (component, spec) of ``pairs`` whose
    method needs calibration: one pass over the calibration set for everything missing. For
    methods that compress the components reading one input together (AWQ), it also finds those
    groups (every module of the layers involved is observed once), works out each group's shared
    result once per calibration (kept by it, so a sweep's cells reuse it) and adds it as
    ``"group"``."""
    calibrating = [(c, sp) for c, sp in pairs if sp.needs]
    if not calibrating:
        return {}
    if calibration is None:
        names = ", ".join(sorted({sp.name for _, sp in calibrating}))
        raise DTMError(f"{names} needs calibration prompts to measure input activations.")
    wanted = sorted({s for _, sp in calibrating for s in sp.needs})
    if isinstance(calibration, dict):     # {path: input norms}, the form before named statistics
        return {(c.path, sp): {"input_norms": calibration.get(c.path)} for c, sp in calibrating}
    grouped = [(c, sp) for c, sp in calibrating if sp.shares_input]
    plain: dict[int, dict[str, Component]] = {}
    if grouped:
        layers = sorted({c.layer for c, _ in grouped})
        plain = {n: _plain_components(model, n) for n in layers}
        # a cheap statistic of every module of those layers tells who reads the same input
        calibration.many(["input_absmean"], [p for n in layers for p in plain[n]])
    paths = list(dict.fromkeys(
        [p for c, _ in calibrating for p in _stat_keys(c)]
        + [p for c, _ in grouped for p in calibration.peers(c.path) if p in plain[c.layer]]))
    got = calibration.many(wanted, paths)
    out = {}
    for c, sp in calibrating:
        if c.experts is not None:       # each expert on the tokens routed to it, on its own
            for key in _stat_keys(c):
                if any(v is None for v in got[key].values()):
                    raise DTMError(f"Expert {key.split(':')[-1]} of layer {c.layer} received no "
                                   f"calibration token, so {sp.name} has no statistics for "
                                   f"{c.name}; give more calibration prompts.")
                out[(key, sp)] = got[key]
            continue
        st = dict(got[c.path])
        if sp.shares_input:
            group = tuple(p for p in calibration.peers(c.path) if p in plain[c.layer])
            def prepare(group=group, sp=sp, st=st, comps=plain[c.layer]):
                return sp.prepare_group(
                    {p: comps[p].matrices(comps[p].weight.detach())[0].float() for p in group},
                    st)
            st["group"] = calibration.memo(("group", str(sp), group), prepare)
        out[(c.path, sp)] = st
    return out


def apply_recipe(model, recipe: Recipe, calibration=None, sequential: bool = False,
                 keeper=None) -> Applied:
    """Compress the recipe's components in place, swapping in new tensors only for those.

    ``calibration`` provides the statistics the recipe's methods need: a
    :class:`~dtm_core.compression.calibration.Calibration` of the dense model (whose modules have the same
    paths), or a dict ``{module path: input norms}`` for code written before statistics were named.
    With ``sequential`` the statistics of each layer's components are gathered on the outputs of
    the layers before it as already compressed (full-model GPTQ's order,
    :func:`dtm_core.compression.calibration.sequential`); otherwise every component sees the dense model's
    inputs. A recipe of one layer's components is the same either way. ``keeper``: compress
    ``model`` itself, the replaced tensors held by it (:mod:`dtm_core.compression.inplace`).
    """
    pairs = recipe.components(model)  # validate before touching anything
    caches = [(c, sp) for c, sp in pairs if sp.targets_cache]
    pairs = [(c, sp) for c, sp in pairs if not sp.targets_cache]
    for comp, spec in pairs:
        part = comp.experts is not None or comp.rows is not None
        if part and spec.runtime_hook_at(comp) is not None:
            raise DTMError(f"{spec} also changes the input of the whole module at {comp.path}, "
                           f"so it cannot apply to the part {comp.name} alone; give the whole "
                           "(fused or experts) kind instead.")
    applied = Applied(keeper)
    fresh: dict[tuple[int, str], torch.Tensor] = {}   # (module, param) -> this recipe's copy
    fused = _fused_statistics(model, pairs)            # read before anything changes
    # static cache scales come from the dense model: measured before any weight changes (in
    # place, the dense model is the one being compressed)
    absmax = cache_absmax(model, caches, calibration) if caches else {}
    try:
        needs = sorted({c.layer for c, sp in pairs if sp.needs})
        if _layer_by_layer(pairs, calibration, sequential):
            from dtm_core.compression.calibration import sequential as layer_by_layer

            applied.layer_by_layer = True

            def compress_layer(n, layer_calib):
                here = [(c, sp) for c, sp in pairs if c.layer == n]
                _compress(here, _merged(gather_statistics(model, here, layer_calib), fused),
                          applied, fresh)
            # every layer up to the last calibrated one is compressed in order, so that what
            # comes after sees it; the layers after that need no statistics
            last = max(needs)
            layer_by_layer(calibration, model, sorted({c.layer for c, _ in pairs
                                                      if c.layer <= last}), compress_layer)
            _compress([(c, sp) for c, sp in pairs if c.layer > last], fused, applied, fresh)
        else:
            _compress(pairs, _merged(gather_statistics(model, pairs, calibration), fused),
                      applied, fresh)
        if caches:
            _quantize_caches(model, caches, absmax, applied)
    except BaseException:
        applied.restore()
        raise
    return applied


def _layer_by_layer(pairs, calibration, sequential: bool) -> bool:
    """Layer by layer only changes something when a compressed layer comes before a calibrated
    one; otherwise the shared statistics of the dense inputs are the same."""
    needs = [c.layer for c, sp in pairs if sp.needs and not sp.targets_cache]
    pairs = [(c, sp) for c, sp in pairs if not sp.targets_cache]
    return bool(sequential and needs and not isinstance(calibration, dict)
                and calibration is not None and min(c.layer for c, _ in pairs) < max(needs))


def runs_layer_by_layer(model, recipe: Recipe, calibration, sequential: bool) -> bool:
    """Whether :func:`apply_recipe` would gather statistics layer by layer (told before it
    runs)."""
    return _layer_by_layer(recipe.components(model), calibration, sequential)


def _fused_statistics(model, pairs) -> dict:
    """``{(statistics key, spec): statistics}`` that specs read from the dense weights of the
    modules deployed fused with a component (:meth:`Method.fused_stats`)."""
    out = {}
    for comp, spec in pairs:
        st = spec.fused_stats(model, comp)
        if st:
            for sk in _stat_keys(comp):
                out[(sk, spec)] = st
    return out


def _merged(stats: dict, fused: dict) -> dict:
    if not fused:
        return stats
    out = dict(stats)
    for k, st in fused.items():
        out[k] = {**out.get(k, {}), **st}
    return out


def _compress(pairs, stats: dict, applied: Applied, fresh: dict) -> None:
    """Swap in compressed copies of the pairs' weights (one copy per parameter)."""
    for comp, spec in pairs:
        if not spec.changes_weights:
            continue
        key = (id(comp.module), comp.param)
        if comp.experts is not None and not applied.in_place:
            _compress_experts(comp, spec, stats, applied, fresh, key)
            continue
        if key not in fresh:   # one copy per parameter, however many of its parts change
            orig = getattr(comp.module, comp.param)
            fresh[key] = orig.detach().clone(memory_format=torch.contiguous_format)
            if comp.experts is None:
                applied.changed_bytes += orig.numel() * orig.element_size()
                applied.changed_params += orig.numel()
            applied.save(comp.module, comp.param, orig)
            setattr(comp.module, comp.param,
                    torch.nn.Parameter(fresh[key], requires_grad=False))
            del orig
        full = fresh[key]
        # each (out, in) matrix is compressed on its own (with its own statistics); in place,
        # an experts parameter is copied whole and its experts' matrices compressed in it
        experts = comp.experts if comp.experts is not None else [None]
        for sk, m, e in zip(_stat_keys(comp), comp.matrices(full), experts):
            if e is not None:
                applied.changed_bytes += m.numel() * m.element_size()
                applied.changed_params += m.numel()
            _compress_matrix(m, comp, spec, stats.get((sk, spec), {}),
                             None if e is None else int(e))
        hook = spec.runtime_hook_for(comp, stats.get((_stat_keys(comp)[0], spec), {}))
        if hook is not None:
            applied._hooks.append(comp.module.register_forward_pre_hook(hook))


def _compress_experts(comp: Component, spec: Method, stats: dict, applied: Applied, fresh: dict,
                      key) -> None:
    """Experts: the 3-D parameter is replaced by an :class:`ExpertOverrides` over the dense one,
    and only the compressed experts' matrices are copied."""
    from dtm_core.compression.expert_overrides import ExpertOverrides

    if key not in fresh:
        orig = getattr(comp.module, comp.param)
        fresh[key] = ExpertOverrides(orig)
        applied.save(comp.module, comp.param, orig)
        setattr(comp.module, comp.param, fresh[key])
    over = fresh[key]
    for sk, e in zip(_stat_keys(comp), comp.experts):
        new_copy = int(e) not in over._over
        m = over.override(e)
        if new_copy:
            applied.changed_bytes += m.numel() * m.element_size()
            applied.changed_params += m.numel()
        _compress_matrix(m.t() if comp.transposed else m, comp, spec, stats.get((sk, spec), {}),
                         int(e))


def _compress_matrix(m: torch.Tensor, comp: Component, spec: Method, stats,
                     expert: int | None = None) -> None:
    """Compress one (out, in) matrix view in place (only the component's rows of a fused one)."""
    w = (m[comp.rows] if comp.rows is not None else m).float()
    new = spec.apply_at(w.contiguous(), stats, comp, expert)
    if comp.rows is not None:
        m[comp.rows] = new.to(m.dtype)
    else:
        m.copy_(new)


def _quantize_caches(model, caches, absmax: dict, applied: Applied) -> None:
    """Put the KV specs' quantizers on the attention modules of the cache components (static
    scales from the calibration prompts on the dense model, shared by every pair of that
    calibration)."""
    from dtm_core.compression.kvcache import KVHandle, head_dim

    handle = KVHandle()
    applied._hooks.append(handle)
    for comp, spec in caches:
        fn = spec.quantizer(head_dim(model, comp), absmax.get((comp.layer, comp.kind)),
                            comp.name)
        handle.add(comp, fn)


def cache_absmax(model, caches, calibration) -> dict:
    """max |entry| per (layer, kind) of the (component, spec) pairs whose spec has static scales,
    on the dense model over the calibration prompts (memoized on the calibration); {} when none
    has."""
    from dtm_core.compression.kvcache import record_absmax

    if not any(sp.needs_calibration for _, sp in caches):
        return {}
    if calibration is None or isinstance(calibration, dict):
        names = ", ".join(sorted({str(sp) for _, sp in caches if sp.needs_calibration}))
        raise DTMError(f"{names} needs calibration prompts for its static scales: give a "
                       "prompt set or --calibration.")
    dense = calibration._model() or model
    comps = [c for c, sp in caches]
    return calibration.memo(("kv_absmax", tuple(c.name for c in comps)),
                            lambda: record_absmax(dense, _same_caches(dense, comps),
                                                  calibration.seqs))


def _same_caches(model, comps):
    """The cache components of ``model`` at the places of ``comps`` (of another model tree)."""
    from dtm_core.compression.kvcache import resolve_cache

    return resolve_cache(model, ",".join(c.name for c in comps))
