"""Component names ``LAYER.KIND`` <-> modules, stable across architecture families.

The kinds of each family and their module paths live in the family adapters
(:mod:`dtm_core.models.families`), e.g. Llama ``q k v o gate up down``, GPT-2 (Conv1D, weights stored as
(in, out)) ``qkv o up down``, OPT ``q k v o up down``.

A selection is a comma-separated list (spaces allowed) of ``LAYERS.KIND``, or ``*`` / ``all`` for
every component, where LAYERS is ``*``, ``all``, ``N`` or ``N-M`` and KIND is ``*``, ``all``, a kind,
a slice of a fused weight (``q`` in Phi-3's ``qkv``) or one expert (``e3.down``, ``e*.down``):
``*.q, *.k, 0-3.down``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dtm_core.errors import DTMError
from dtm_core.models.families import Family, family_of, get_path  # noqa: F401 (family_of re-exported)


@dataclass(frozen=True, eq=False)
class Component:
    """One compressible weight, named ``LAYER.KIND``: a module's 2-D weight, rows of a fused one
    (``q`` inside ``qkv``), or expert matrices of a 3-D experts parameter (``experts.down`` for
    all, ``e3.down`` for expert 3). Every (out, in) matrix it covers is compressed on its own."""

    layer: int
    kind: str
    path: str                      # fully qualified module name
    module: torch.nn.Module
    transposed: bool
    param: str = "weight"          # the parameter's attribute name on the module
    rows: torch.Tensor | None = None           # output rows of a fused weight
    experts: tuple[int, ...] | None = None     # the experts of a 3-D parameter

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def params(self) -> int:
        w = self.weight
        per = w[0].numel() if self.experts is not None else w.numel()
        if self.rows is not None:
            out = w.shape[-1] if self.transposed else w.shape[-2]
            per = per // out * len(self.rows)
        return per * (len(self.experts) if self.experts is not None else 1)

    def matrices(self, full: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``full`` (a tensor shaped like the parameter) as the (out, in) matrices this
        component covers, before row selection."""
        mats = [full[e] for e in self.experts] if self.experts is not None else [full]
        return [m.t() if self.transposed else m for m in mats]


def decoder_layers(model) -> list:
    return family_of(model).decoder_layers(model)


def tail_modules(model) -> list:
    """The modules applied after the last decoder layer and before the LM head."""
    return family_of(model).tail_modules(model)


def num_layers(model) -> int:
    return len(decoder_layers(model))


_EXPERT = re.compile(r"^e(\*|\d+|\d+-\d+)\.([A-Za-z_]+)$")


def _component(fam: Family, model, layer_obj, i: int, kind: str, expert: int | None = None):
    """The component ``i.kind`` (``expert`` picks one expert of an experts kind), or None when
    this layer has no such module."""
    base = f"experts.{kind}" if expert is not None else kind
    k = fam.kind(base)
    try:
        mod = get_path(layer_obj, k.path)
        w = getattr(mod, k.param)
    except AttributeError:
        return None
    if not isinstance(w, torch.Tensor):
        return None
    experts = None
    if k.experts:
        experts = (expert,) if expert is not None else tuple(range(w.shape[0]))
    rows = k.rows(model.config) if k.rows is not None else None
    name = f"e{expert}.{kind}" if expert is not None else kind
    transposed = fam.transposed if k.transposed is None else k.transposed
    return Component(i, name, f"{fam.layers}.{i}.{k.path}", mod, transposed, k.param, rows,
                     experts)


def all_components(model) -> list[Component]:
    """Every component of the primary kinds (what ``*`` selects), in model order."""
    fam = family_of(model)
    out = []
    for i, layer in enumerate(fam.decoder_layers(model)):
        for kind in fam.kinds_in(layer):
            out.append(_component(fam, model, layer, i, kind))
    return out


_ITEM = re.compile(r"^(\*|\d+|\d+-\d+)\.([A-Za-z_*][A-Za-z0-9_.*-]*)$")


def _valid_names(fam: Family, n: int) -> str:
    extra = ""
    if fam.slices:
        extra += f"; slices of fused weights: {', '.join(fam.slices)}"
    moe = [k.split(".", 1)[1] for k in fam.kinds if fam.kind(k).experts]
    if moe:
        extra += f"; one expert: eN.{moe[0]} (e.g. e0.{moe[0]}, e*.{moe[0]} for each expert)"
    return (f"valid layers are 0-{n - 1} (or *), valid kinds are {', '.join(fam.kinds)} (or *)"
            f"{extra}; form LAYERS.KIND, e.g. *.q,*.k,0-3.down")


def _span(text: str, n: int, what: str, fam: Family, n_layers: int) -> range:
    if text == "*":
        return range(n)
    a, _, b = text.partition("-")
    lo, hi = int(a), int(b or a)
    if lo > hi or hi >= n:
        raise DTMError(f"{what} '{text}' is out of range: " + _valid_names(fam, n_layers))
    return range(lo, hi + 1)


def _normal(item: str) -> str:
    """``*`` and ``all`` mean every component; ``all`` stands for ``*`` as layers or kind."""
    item = item.strip()
    if item.lower() in ("*", "all"):
        return "*.*"
    layers, dot, kind = item.partition(".")
    if dot:
        layers = "*" if layers.strip().lower() == "all" else layers.strip()
        kind = "*" if kind.strip().lower() == "all" else kind.strip()
        return f"{layers}.{kind}"
    return item


def _selected(selection: str, model) -> list[tuple[int, str, int | None]]:
    """(layer, kind, expert) of every component a selection names, in model order."""
    fam = family_of(model)
    layers = fam.decoder_layers(model)
    n = len(layers)
    if not isinstance(selection, str) or not selection.strip():
        raise DTMError("Empty component selection: " + _valid_names(fam, n))
    order = {k: j for j, k in enumerate(list(fam.kinds) + list(fam.slices))}
    wanted: dict[tuple, None] = {}
    for raw in selection.split(","):
        item = _normal(raw)
        m = _ITEM.match(item)
        if not m:
            raise DTMError(f"Component '{item}' is not of the form LAYERS.KIND: "
                           + _valid_names(fam, n))
        layers_s, kind = m.groups()
        span = _span(layers_s, n, "Layer range" if "-" in layers_s else "Layer", fam, n)
        em = _EXPERT.match(kind)
        if em and f"experts.{em.group(2)}" in fam.kinds and fam.kind(f"experts.{em.group(2)}").experts:
            base = f"experts.{em.group(2)}"
            for i in span:
                if not fam._present(layers[i], base):
                    continue
                count = getattr(get_path(layers[i], fam.kind(base).path), fam.kind(base).param
                                ).shape[0]
                for e in _span(em.group(1), count, "Expert", fam, n):
                    wanted[(i, order[base], e, em.group(2))] = None
            continue
        if kind != "*" and kind not in fam.kinds and kind not in fam.slices:
            raise DTMError(f"Unknown kind '{kind}' for {fam.name}-family models: "
                           + _valid_names(fam, n))
        for i in span:
            for k in (fam.kinds_in(layers[i]) if kind == "*" else [kind]):
                if fam._present(layers[i], k):
                    wanted[(i, order[k], None, k)] = None
    return [(i, k, e) for i, _, e, k in sorted(wanted, key=lambda t: (t[0], t[1], t[2] or 0))]


def parse_selection(selection: str, model) -> list[str]:
    """Expand a selection string into component names, in model order, without duplicates."""
    return [f"{i}.e{e}.{k}" if e is not None else f"{i}.{k}"
            for i, k, e in _selected(selection, model)]


def resolve(model, selection: str) -> list[Component]:
    """The Component objects a selection names, in model order."""
    fam = family_of(model)
    layers = fam.decoder_layers(model)
    return [_component(fam, model, layers[i], i, k, e) for i, k, e in _selected(selection, model)]


def component_table(model):
    """A DataFrame of every component with its module path, shape and parameter count."""
    import pandas as pd

    rows = [{"component": c.name, "layer": c.layer, "kind": c.kind, "module": c.path,
             "shape": tuple(c.weight.shape), "params": c.params}
            for c in all_components(model)]
    return pd.DataFrame(rows)
