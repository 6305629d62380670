"""Turn a sensitivity map into a deployable plan (the paper's use of the map).

Components are ordered from least to most sensitive (highest single-component mean FDT first). The
plan is the longest prefix of that order whose *combined* compression keeps the mean FDT at or above
the budget, found by bisection over the prefix length with a real evaluation at each probe (so about
log2(components) evaluations, not one per component).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dtm_core.compression.recipe import Recipe, RecipeItem, parse_spec
from dtm_core.models.components import all_components
from dtm_core.measure.divergence import divergence
from dtm_core.errors import DTMError
from dtm_core.models.families import Family, family_named, family_of
from dtm_core.models.load import LoadedModel
from dtm_core.compression.pair import in_place_pair


@dataclass
class Plan:
    spec: str
    components: list[str]
    budget_fdt: float
    fdt_mean: float
    share_params: float
    curve: pd.DataFrame = field(repr=False)   # every probe: k, share_params, fdt_mean
    family: str = "llama"                     # the model's family (its GGUF tensor names)

    @property
    def recipe(self) -> Recipe:
        if not self.components:
            return Recipe((RecipeItem("*.*", parse_spec("none")),))
        return Recipe((RecipeItem(",".join(self.components), parse_spec(self.spec)),))

    def llama_cpp_overrides(self) -> list[str]:
        """``--tensor-type`` arguments for llama-quantize (quantization plans only)."""
        return llama_cpp_overrides(self.spec, self.components, self.family)

    def to_json(self) -> dict:
        sp = parse_spec(self.spec)
        return {"recipe": self.recipe.to_json(), "spec": self.spec, "components": self.components,
                "budget_fdt_mean": self.budget_fdt, "fdt_mean": self.fdt_mean,
                "share_params": self.share_params,
                "curve": json.loads(self.curve.to_json(orient="records")),
                "llama_cpp_tensor_types": self.llama_cpp_overrides()
                if sp.llama_cpp_type() is not None else []}

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2), encoding="utf-8")


def llama_cpp_type(spec: str) -> str:
    """The llama.cpp tensor type of a quantization spec (the method knows it)."""
    qtype = parse_spec(spec).llama_cpp_type()
    if qtype is None:
        raise DTMError(f"'{spec}' has no llama.cpp tensor type; llama.cpp overrides need a "
                       "quantization spec such as intB.")
    return qtype


def llama_cpp_overrides(spec: str, components: list[str], family: str | Family = "llama"
                        ) -> list[str]:
    """``--tensor-type`` arguments for llama-quantize, with the family's GGUF tensor names."""
    fam = family_named(family)
    qtype = llama_cpp_type(spec)
    out = []
    for name in components:
        layer, kind = name.split(".")
        # anchored: llama.cpp applies each pattern with regex_search (blk\.3\. alone also
        # matches blk.13.)
        tensor = "^" + fam.gguf_tensor(int(layer), kind).replace(".", "\\.") + "$"
        out.append(f"--tensor-type {tensor}={qtype}")
    return out


def make_plan(dense: LoadedModel, sweep_table: pd.DataFrame, spec: str, prompt_ids, references,
              new_tokens: int, budget: float = 0.9, progress=None, calibration=None) -> Plan:
    """The largest least-sensitive-first set of components whose combined compression keeps
    mean FDT >= budget * N, verified by real evaluations (bisection).

    ``calibration``: for methods that need it, the sweep's :class:`~dtm_core.compression.calibration.Calibration`
    (default: the plan's prompts, as the sweep used), so every probe is the pair the cells measured.
    """
    if sweep_table.empty:
        raise DTMError("The sweep has no cells to plan from.")
    if not 0 < budget <= 1:
        raise DTMError("The budget is a share of N in (0, 1], e.g. 0.9.")
    if parse_spec(spec).needs_calibration and calibration is None:
        from dtm_core.compression.calibration import calibration_for
        calibration = calibration_for(dense.model, prompt_ids)
    order = sweep_table.sort_values(["fdt_mean", "kl_mean"], ascending=[False, True])
    names = list(order.component)
    # shares of all compressible parameters; a table of slices or experts brings its own counts
    params = dict(zip(sweep_table.component, sweep_table.params))
    total = sum(c.params for c in all_components(dense.model))
    target = budget * new_tokens
    probes: dict[int, float] = {0: float(new_tokens)}

    def fdt_of(k: int) -> float:
        if k not in probes:
            pair = in_place_pair(dense, Recipe.single(spec, ",".join(names[:k])),
                                 calibration=calibration)
            res = divergence(pair, prompt_ids=prompt_ids, references=references,
                             new_tokens=new_tokens)
            probes[k] = float(res.table.fdt.mean())
            if progress:
                progress(len(probes), f"{k} components: mean FDT {probes[k]:.2f}")
        return probes[k]

    lo, hi = 0, len(names)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fdt_of(mid) >= target:
            lo = mid
        else:
            hi = mid - 1
    chosen = names[:lo]
    curve = pd.DataFrame([{"k": k, "share_params": sum(params[n] for n in names[:k]) / total,
                           "fdt_mean": v} for k, v in sorted(probes.items())])
    return Plan(spec=str(parse_spec(spec)), components=chosen, budget_fdt=target,
                fdt_mean=probes[lo], share_params=sum(params[n] for n in chosen) / total,
                curve=curve, family=family_of(dense.model).name)


def save_compressed(dense: LoadedModel, recipe: Recipe, folder: str, calibration=None) -> None:
    """Write the compressed model (safetensors) and tokenizer with save_pretrained."""
    if recipe.has_cache_specs and not any(i.spec.changes_weights for i in recipe.items):
        raise DTMError("A KV-cache spec is applied as the model runs, not stored in its "
                       "weights: there is nothing to save; serve it with the engine's cache "
                       "setting (vLLM --kv-cache-dtype fp8, llama.cpp --cache-type-k/-v).")
    pair = in_place_pair(dense, recipe, calibration=calibration)   # restored once written
    with pair.session():
        pair.compressed_model().save_pretrained(folder)
    dense.tokenizer.save_pretrained(folder)
