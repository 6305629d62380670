"""Draft plans: the mixed planner with a self-speculative draft's acceptance as its objective.

A compressed copy of a model drafts for it (QuantSpec, QSpec): under greedy verification the mean
number of draft tokens the dense model accepts per step at draft length K (``accept_len_k{K}``,
:mod:`dtm_core.measure.metrics`) is exact from the teacher-forced agreement, so every sweep cell
already holds it. With ``objective="accept_len_k{K}"`` the planner of
:mod:`dtm_core.planning.budget_plan` runs unchanged on it: each choice's loss is the acceptance it
costs against the dense model drafting for itself (the ceiling: every proposal accepted), plans are
verified on the fit prompts by the same exact pass, a target is a mean accepted length (the
cheapest plan that reaches it) and the held-out table adds each row's acceptance and the expected
speed-up.

Expected speed-up of greedy speculative decoding with draft length K: each verification step
emits the accepted tokens plus the verifier's own, and costs K draft forwards plus one forward of
the dense model, so speed-up = (accept_len + 1) / (K c + 1), where c is the cost of one draft
forward relative to the dense one: given, or the draft's bits over the dense model's (decoding is
memory-bound: a forward costs about what its weights weigh). This is the ideal of the algorithm,
before any kernel's overheads.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from dtm_core.errors import DTMError
from dtm_core.measure.metrics import ACCEPT_K, acceptance

OBJECTIVES = ("fdt",) + tuple(f"accept_len_k{k}" for k in ACCEPT_K)


def draft_length(objective: str) -> int | None:
    """K of an ``accept_len_k{K}`` objective (None for ``fdt``); refuses anything else."""
    if objective == "fdt":
        return None
    m = re.fullmatch(r"accept_len_k(\d+)", objective or "")
    if not m or int(m.group(1)) not in ACCEPT_K:
        raise DTMError(f"Unknown objective '{objective}': use {', '.join(OBJECTIVES)}.")
    return int(m.group(1))


def ceiling(references, k: int) -> float:
    """The mean accepted length when the dense model drafts for itself (every proposal
    accepted): the objective's value of keeping every component."""
    vals = []
    for r in references:
        if len(r):
            a, _, steps = acceptance([True] * len(r), k)
            vals.append(a / steps)
        else:
            vals.append(0.0)
    return float(np.mean(vals)) if vals else 0.0


def objective_table(table, tables: dict, objective: str, references):
    """The choice table with the objective in place of FDT: each (component, choice) cell's mean
    accepted length at K (column ``accept_len_k{K}_mean`` of its sweep), the kept choice at the
    ceiling, and the ceiling where the FDT table has N."""
    k = draft_length(objective)
    if k is None:
        return table
    top = ceiling(references, k)
    vals = np.full(table.fdt.shape, top)
    col = f"{objective}_mean"
    for j, spec in enumerate(table.choices):
        if spec not in tables:
            continue
        t = tables[spec].set_index("component")
        if col not in t:
            raise DTMError(f"The sweep of {spec} has no {col} column (cells from before the "
                           "metric existed); run the plan again with a fresh cache folder.")
        vals[:, j] = t.loc[table.components, col].to_numpy(float)
    return dataclasses.replace(table, fdt=vals, new_tokens=top)


def speedup(accept_len: float, k: int, cost: float) -> float:
    """Ideal speed-up of greedy speculative decoding: (accept_len + 1) / (K cost + 1)."""
    return (accept_len + 1.0) / (k * cost + 1.0)


def draft_columns(row: dict, summary: dict, objective: str, draft_cost: float | None,
                  dtype_bits: int) -> dict:
    """The held-out row's acceptance and expected speed-up (``draft_cost``: one draft forward
    relative to the dense one; default the row's bits per weight over the dense model's)."""
    k = draft_length(objective)
    if k is None:
        return {}
    acc = summary.get(f"{objective}_mean")
    cost = draft_cost if draft_cost is not None else row["avg_bits"] / dtype_bits
    return {"accept_len": acc, "draft_cost": cost,
            "speedup": None if acc is None else speedup(acc, k, cost)}
