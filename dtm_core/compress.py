"""Compression specs (``int4:g128``, ``magnitude:0.9``, ...) and their reversible application.

A spec is data (:class:`Spec`); :func:`apply_recipe` applies a list of (selection, spec) to a model by
swapping in new weight tensors for the selected components only. :meth:`Applied.restore` puts the
very same original Parameter objects back, so restoring is bit-exact and costs nothing.

Every transform works on the weight as a float32 (out, in) matrix; GPT-2's Conv1D weights, stored
(in, out), are transposed on the way in and out.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .components import Component, resolve
from .errors import DTMError

ACCEPTED_FORMS = ("none | magnitude:S | nm:N:M | wanda:S | intB | intB:gG | intB:asym | "
                  "intB:gG:asym | w8a8   (S a sparsity in [0, 1], B bits 2-8, G a group size)")


@dataclass(frozen=True)
class Spec:
    """One compression method with its parameters."""

    method: str                    # none, magnitude, nm, wanda, int, w8a8
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    bits: int | None = None
    group: int | None = None
    asym: bool = False

    def __str__(self) -> str:
        if self.method in ("magnitude", "wanda"):
            return f"{self.method}:{self.sparsity:g}"
        if self.method == "nm":
            return f"nm:{self.n}:{self.m}"
        if self.method == "int":
            return f"int{self.bits}" + (f":g{self.group}" if self.group else "") + (
                ":asym" if self.asym else "")
        return self.method

    @property
    def needs_calibration(self) -> bool:
        return self.method == "wanda"

    @property
    def is_quantization(self) -> bool:
        return self.method in ("int", "w8a8")

    @property
    def level(self) -> float | None:
        """The spec's strength on one axis: sparsity for pruning, bit width for quantization."""
        if self.method in ("magnitude", "wanda"):
            return self.sparsity
        if self.method == "nm":
            return 1 - self.n / self.m
        if self.method == "int":
            return float(self.bits)
        if self.method == "w8a8":
            return 8.0
        return None


def _bad(spec: str, why: str = "") -> DTMError:
    return DTMError(f"Bad compression spec '{spec}'{': ' + why if why else ''}. "
                    f"Accepted forms: {ACCEPTED_FORMS}.")


def _sparsity(spec: str, text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise _bad(spec, f"'{text}' is not a number") from None
    if not 0.0 <= s <= 1.0:
        raise _bad(spec, "sparsity must lie in [0, 1]")
    return s


def parse_spec(spec: str) -> Spec:
    """Parse a spec string; a bad one raises DTMError naming the accepted forms."""
    if not isinstance(spec, str):
        raise _bad(str(spec))
    text = spec.strip().lower()
    parts = text.split(":")
    head = parts[0]
    if text == "none":
        return Spec("none")
    if text == "w8a8":
        return Spec("w8a8", bits=8)
    if head in ("magnitude", "wanda"):
        if len(parts) != 2:
            raise _bad(spec, f"{head} takes one sparsity")
        return Spec(head, sparsity=_sparsity(spec, parts[1]))
    if head == "nm":
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise _bad(spec, "nm takes two integers N:M")
        n, m = int(parts[1]), int(parts[2])
        if not 0 < n < m or m > 256:
            raise _bad(spec, "nm needs 0 < N < M <= 256")
        return Spec("nm", n=n, m=m)
    mb = re.fullmatch(r"int(\d+)", head)
    if mb:
        bits = int(mb.group(1))
        if not 2 <= bits <= 8:
            raise _bad(spec, "bit width must be 2-8")
        group, asym = None, False
        for opt in parts[1:]:
            mg = re.fullmatch(r"g(\d+)", opt)
            if mg and group is None and not asym and int(mg.group(1)) > 0:
                group = int(mg.group(1))
            elif opt == "asym" and not asym:
                asym = True
            else:
                raise _bad(spec, f"unknown option '{opt}'")
        return Spec("int", bits=bits, group=group, asym=asym)
    raise _bad(spec)


# ---------------------------------------------------------------------------------------------
# Weight transforms on a float32 (out, in) matrix


def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly round(sparsity * numel) weights of smallest magnitude."""
    k = int(round(sparsity * w.numel()))
    out = w.clone(memory_format=torch.contiguous_format)
    if k > 0:
        idx = torch.topk(w.abs().flatten(), k, largest=False, sorted=False).indices
        out.view(-1)[idx] = 0
    return out


def nm_prune(w: torch.Tensor, n: int, m: int, name: str = "") -> torch.Tensor:
    """In every M consecutive weights along the input dimension keep the N largest."""
    rows, cols = w.shape
    if cols % m:
        raise DTMError(f"nm:{n}:{m} needs the input dimension to be a multiple of {m}, but "
                       f"{name or 'this weight'} has {cols} inputs.")
    g = w.reshape(rows, cols // m, m)
    keep = torch.topk(g.abs(), n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return (g * mask).reshape(rows, cols)


def wanda_prune(w: torch.Tensor, sparsity: float, in_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: score |W| * ||X_j||_2, prune the lowest scores of each output row."""
    rows, cols = w.shape
    k = int(round(sparsity * cols))
    out = w.clone()
    if k > 0:
        score = w.abs() * in_norm.to(w)[None, :]
        idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        out.scatter_(1, idx, 0.0)
    return out


def _quant_rows(x: torch.Tensor, bits: int, asym: bool) -> torch.Tensor:
    """Round-to-nearest fake quantization of each row of x (rows are channels or groups)."""
    if asym:
        qmax = 2 ** bits - 1
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
        return (q - zero) * scale
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def quantize_weight(w: torch.Tensor, bits: int, group: int | None = None,
                    asym: bool = False) -> torch.Tensor:
    """Per output channel, or per group of G consecutive input weights (a shorter last group)."""
    rows, cols = w.shape
    if not group or group >= cols:
        return _quant_rows(w, bits, asym)
    full = cols // group * group
    parts = [_quant_rows(w[:, :full].reshape(rows, full // group, group), bits, asym)
             .reshape(rows, full)]
    if full < cols:
        parts.append(_quant_rows(w[:, full:], bits, asym))
    return torch.cat(parts, dim=1)


def quantize_activation_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization (w8a8's activation side)."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)


def transform_weight(w: torch.Tensor, spec: Spec, in_norm: torch.Tensor | None = None,
                     name: str = "") -> torch.Tensor:
    """Apply a spec to a float32 (out, in) matrix and return the new matrix."""
    if spec.method == "none":
        return w
    if spec.method == "magnitude":
        return magnitude_prune(w, spec.sparsity)
    if spec.method == "nm":
        return nm_prune(w, spec.n, spec.m, name)
    if spec.method == "wanda":
        if in_norm is None:
            raise DTMError("wanda needs input activation norms: give a prompt set or calibration set.")
        return wanda_prune(w, spec.sparsity, in_norm)
    if spec.method == "int":
        return quantize_weight(w, spec.bits, spec.group, spec.asym)
    if spec.method == "w8a8":
        return quantize_weight(w, 8)
    raise DTMError(f"Unknown compression method '{spec.method}'.")


# ---------------------------------------------------------------------------------------------
# Recipes and reversible application


@dataclass(frozen=True)
class RecipeItem:
    selection: str
    spec: Spec

    def __str__(self) -> str:
        return f"{self.spec}@{self.selection}"


@dataclass(frozen=True)
class Recipe:
    """An ordered list of (component selection, spec)."""

    items: tuple[RecipeItem, ...] = field(default_factory=tuple)

    @classmethod
    def single(cls, spec: str | Spec, selection: str = "*.*") -> "Recipe":
        sp = spec if isinstance(spec, Spec) else parse_spec(spec)
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

    def components(self, model) -> list[tuple[Component, Spec]]:
        """(component, spec) in application order; validates every selection first."""
        return [(c, item.spec) for item in self.items for c in resolve(model, item.selection)]


class Applied:
    """Handle of an applied recipe: :meth:`restore` puts the original tensors back."""

    def __init__(self):
        self._saved: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
        self._hooks: list = []
        self.changed_bytes = 0
        self.changed_params = 0

    def restore(self) -> None:
        for h in self._hooks:
            h.remove()
        for module, param in reversed(self._saved):
            module.weight = param
        self._saved.clear()
        self._hooks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _act_quant_hook(module, args):
    return (quantize_activation_per_token(args[0]),) + tuple(args[1:])


NormProvider = Callable[[list[Component]], dict[str, torch.Tensor]]


def apply_recipe(model, recipe: Recipe, norms: NormProvider | dict | None = None) -> Applied:
    """Compress the recipe's components in place, swapping in new tensors only for those."""
    pairs = recipe.components(model)  # validate before touching anything
    if any(spec.needs_calibration for _, spec in pairs):
        if norms is None:
            raise DTMError("wanda needs calibration prompts to measure input activations.")
        if callable(norms):
            norms = norms([c for c, s in pairs if s.needs_calibration])
    applied = Applied()
    try:
        for comp, spec in pairs:
            module = comp.module
            orig = module.weight
            w = orig.detach().float()
            if comp.transposed:
                w = w.t().contiguous()
            new = transform_weight(w, spec, (norms or {}).get(comp.path), comp.name)
            if comp.transposed:
                new = new.t()
            if spec.method != "none":
                module.weight = torch.nn.Parameter(new.to(orig.dtype).contiguous(),
                                                   requires_grad=False)
                applied._saved.append((module, orig))
                applied.changed_bytes += orig.numel() * orig.element_size()
                applied.changed_params += orig.numel()
            if spec.method == "w8a8":
                applied._hooks.append(module.register_forward_pre_hook(_act_quant_hook))
    except BaseException:
        applied.restore()
        raise
    return applied
