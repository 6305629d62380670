"""Component names ``LAYER.KIND`` <-> modules, stable across architecture families.

The kinds of each family and their module paths live in the family adapters
(:mod:`dtm_core.families`), e.g. Llama ``q k v o gate up down``, GPT-2 (Conv1D, weights stored as
(in, out)) ``qkv o up down``, OPT ``q k v o up down``.

A selection is a comma-separated list of ``LAYERS.KIND`` where LAYERS is ``*``, ``N`` or ``N-M``
and KIND is ``*`` or a kind: ``*.q,*.k,0-3.down``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import DTMError
from .families import Family, family_of, get_path  # noqa: F401 (family_of re-exported)


@dataclass(frozen=True)
class Component:
    """One compressible weight matrix, named ``LAYER.KIND``."""

    layer: int
    kind: str
    path: str                      # fully qualified module name
    module: torch.nn.Module
    transposed: bool

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.kind}"

    @property
    def params(self) -> int:
        return self.module.weight.numel()


def decoder_layers(model) -> list:
    return family_of(model).decoder_layers(model)


def tail_modules(model) -> list:
    """The modules applied after the last decoder layer and before the LM head."""
    return family_of(model).tail_modules(model)


def num_layers(model) -> int:
    return len(decoder_layers(model))


def all_components(model) -> list[Component]:
    fam = family_of(model)
    out = []
    for i, layer in enumerate(fam.decoder_layers(model)):
        for kind, p in fam.kinds.items():
            out.append(Component(i, kind, f"{fam.layers}.{i}.{p}", get_path(layer, p),
                                 fam.transposed))
    return out


_ITEM = re.compile(r"^(\*|\d+|\d+-\d+)\.([A-Za-z*]+)$")


def _valid_names(fam: Family, n: int) -> str:
    return (f"valid layers are 0-{n - 1} (or *), valid kinds are {', '.join(fam.kinds)} (or *); "
            "form LAYERS.KIND, e.g. *.q,*.k,0-3.down")


def parse_selection(selection: str, model) -> list[str]:
    """Expand a selection string into component names, in model order, without duplicates."""
    fam = family_of(model)
    n = num_layers(model)
    if not isinstance(selection, str) or not selection.strip():
        raise DTMError("Empty component selection: " + _valid_names(fam, n))
    wanted: set[tuple[int, str]] = set()
    for raw in selection.split(","):
        item = raw.strip()
        m = _ITEM.match(item)
        if not m:
            raise DTMError(f"Component '{item}' is not of the form LAYERS.KIND: "
                           + _valid_names(fam, n))
        layers_s, kind = m.groups()
        if layers_s == "*":
            layers = range(n)
        elif "-" in layers_s:
            a, b = (int(x) for x in layers_s.split("-"))
            if a > b or b >= n:
                raise DTMError(f"Layer range '{layers_s}' is out of range: " + _valid_names(fam, n))
            layers = range(a, b + 1)
        else:
            if int(layers_s) >= n:
                raise DTMError(f"Layer {layers_s} is out of range: " + _valid_names(fam, n))
            layers = [int(layers_s)]
        if kind != "*" and kind not in fam.kinds:
            raise DTMError(f"Unknown kind '{kind}' for {fam.name}-family models: "
                           + _valid_names(fam, n))
        kinds = list(fam.kinds) if kind == "*" else [kind]
        wanted.update((layer, k) for layer in layers for k in kinds)
    order = list(fam.kinds)
    return [f"{l}.{k}" for l, k in sorted(wanted, key=lambda lk: (lk[0], order.index(lk[1])))]


def resolve(model, selection: str) -> list[Component]:
    """The Component objects a selection names."""
    names = set(parse_selection(selection, model))
    return [c for c in all_components(model) if c.name in names]


def component_table(model):
    """A DataFrame of every component with its module path, shape and parameter count."""
    import pandas as pd

    rows = [{"component": c.name, "layer": c.layer, "kind": c.kind, "module": c.path,
             "shape": tuple(c.module.weight.shape), "params": c.params}
            for c in all_components(model)]
    return pd.DataFrame(rows)
