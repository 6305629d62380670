"""A mixed plan as it is kept: one spec per component, what it costs, how it was verified and
proven on held-out prompts (:class:`BudgetPlan`, made by
:func:`~dtm_core.planning.budget_plan.make_budget_plan`; its JSON is plan.json)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dtm_core.errors import DTMError
from dtm_core.planning.allocation import KEEP, KV_BYTES, KV_DENSE, Budget, recipe_of
from dtm_core.planning.draft_plan import draft_length
from dtm_core.compression.recipe import Recipe


@dataclass
class BudgetPlan:
    assignments: dict[str, str]          # component -> spec ("none": kept)
    specs: list[str]
    budget: Budget | None
    target_fdt: float | None             # a share of N
    planner: str
    measure: dict                        # avg_bits, sparsity, bytes
    fdt_mean: float                      # verified on the fit prompts
    new_tokens: int
    family: str
    dtype_bits: int
    fit_prompts: list[int]
    holdout_prompts: list[int]
    evaluations: list[dict] = field(default_factory=list)   # each real evaluation of a plan
    holdout: pd.DataFrame | None = None
    note: str = ""
    threshold: float | None = None       # the DTM planner's FDT threshold
    cells: pd.DataFrame | None = None    # every (component, choice) on the fit prompts
    # what the plan optimizes: "fdt", or "accept_len_k{K}" (a draft plan: ``fdt_mean`` then
    # holds the verified mean accepted length, ``target_fdt`` the target accepted length)
    objective: str = "fdt"
    draft_cost: float | None = None      # one draft forward over a dense one, when given

    @property
    def recipe(self) -> Recipe:
        """One item per spec used; kept components are left out."""
        return recipe_of(self.assignments)

    @property
    def components(self) -> list[str]:
        return [c for c, s in self.assignments.items() if s != KEEP]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in [KEEP] + self.specs}
        for s in self.assignments.values():
            out[s] = out.get(s, 0) + 1
        return out

    def to_json(self) -> dict:
        from dtm_core.planning.plan_exports import llama_cpp_arguments
        try:
            llama = llama_cpp_arguments(self.assignments, self.family, self.dtype_bits)
        except DTMError:
            llama = None
        return {"recipe": self.recipe.to_json(), "assignments": self.assignments,
                "specs": self.specs, "planner": self.planner,
                "budget": None if self.budget is None else {"kind": self.budget.kind,
                                                            "value": self.budget.value,
                                                            "per": self.budget.per},
                "target_fdt": self.target_fdt if self.objective == "fdt" else None,
                **self.measure, "objective": self.objective,
                **({"fdt_mean": self.fdt_mean} if self.objective == "fdt" else
                   {f"{self.objective}_mean": self.fdt_mean, "target": self.target_fdt,
                    "draft_cost": self.draft_cost}),
                "new_tokens": self.new_tokens,
                "family": self.family, "dtype_bits": self.dtype_bits,
                "fit_prompts": self.fit_prompts, "holdout_prompts": self.holdout_prompts,
                "evaluations": self.evaluations, "threshold": self.threshold, "note": self.note,
                "holdout": None if self.holdout is None else
                json.loads(self.holdout.to_json(orient="records")),
                "cells": None if self.cells is None else
                json.loads(self.cells.to_json(orient="records")),
                "llama_cpp_tensor_types": None if llama is None else llama["tensor_types"]}

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2), encoding="utf-8")

    @classmethod
    def from_json(cls, data: dict) -> "BudgetPlan":
        """The plan a :meth:`to_json` (a plan.json) holds."""
        try:
            b = data.get("budget")
            held = data.get("holdout")
            return cls(assignments=dict(data["assignments"]), specs=list(data["specs"]),
                       budget=Budget(b["kind"], float(b["value"]), b.get("per", "weight"))
                       if b else None,
                       target_fdt=data.get("target_fdt") if data.get("objective", "fdt") == "fdt"
                       else data.get("target"),
                       planner=data["planner"],
                       measure={k: data[k] for k in ("avg_bits", "sparsity", "bytes", KV_BYTES,
                                                     KV_DENSE)
                                if k in data or k not in (KV_BYTES, KV_DENSE)},
                       fdt_mean=float(data["fdt_mean"] if "fdt_mean" in data else
                                      data[f"{data['objective']}_mean"]),
                       new_tokens=int(data["new_tokens"]),
                       objective=data.get("objective", "fdt"), draft_cost=data.get("draft_cost"),
                       family=data["family"], dtype_bits=int(data["dtype_bits"]),
                       fit_prompts=list(data["fit_prompts"]),
                       holdout_prompts=list(data["holdout_prompts"]),
                       evaluations=list(data.get("evaluations") or []),
                       holdout=None if held is None else pd.DataFrame(held),
                       note=data.get("note") or "", threshold=data.get("threshold"),
                       cells=None if data.get("cells") is None else pd.DataFrame(data["cells"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DTMError(f"This is not a mixed plan's JSON (from plan --specs): missing or bad "
                           f"{exc}.") from None

    def summary_line(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        bud = f" within {self.budget}" if self.budget is not None else ""
        draft = self.objective != "fdt"
        tgt = "" if self.target_fdt is None else (
            f", target {self.target_fdt:g} accepted per step" if draft
            else f", target {self.target_fdt:g} x N")
        value = (f"mean accepted per step drafting {draft_length(self.objective)} "
                 f"{self.fdt_mean:.3f}" if draft else
                 f"mean FDT {self.fdt_mean:.2f} of {self.new_tokens}")
        if KV_BYTES in self.measure:
            size = (f"{self.measure['avg_bits']:.3f} bits per cached value, KV cache "
                    f"{self.measure[KV_BYTES] / 2 ** 20:.3g} MiB per 1000 tokens of context "
                    f"(dense {self.measure[KV_DENSE] / 2 ** 20:.3g} MiB)")
        else:
            size = (f"{self.measure['avg_bits']:.3f} bits per weight, "
                    f"{self.measure['sparsity']:.1%} sparsity, "
                    f"{self.measure['bytes'] / 2 ** 20:.1f} MiB")
        return (f"{'draft ' if draft else ''}plan ({self.planner}{bud}{tgt}): {counts}; "
                f"{size}; {value} on the "
                f"{len(self.fit_prompts)} fit prompts"
                + (f" ({self.note})" if self.note else ""))
