"""One spec per component under a budget: the choice table and the solvers.

A :class:`ChoiceTable` holds, for every component and every choice (``none`` = kept at the working
dtype, then each candidate spec), what the choice costs (storage bits, weights left non-zero) and
what the component alone under that spec did on the fit prompts (its sweep cell: mean FDT, mean
KL). A :class:`Budget` turns it into a cost per choice and a capacity:

- ``bits``: average bits per weight over the compressible components (:meth:`Method.storage_bits`:
  untouched weights cost the working dtype's bits, a grid's scales and zero points are counted per
  group, pruned weights a one-bit mask);
- ``sparsity``: the share of the components' weights set to zero, at least;
- ``bytes``: the whole model's size (the components as above, every other parameter at the
  working dtype's bits).

Solvers (all return one choice index per component):

- :func:`knapsack`: the exact multiple-choice knapsack by dynamic programming over the budget,
  discretized above the cheapest plan into ``steps`` units (costs rounded up, so a solution never
  exceeds the budget), then a greedy fill of what the rounding left. The signal is the component's
  FDT lost (``fdt``; its mean KL only breaks ties: all KL terms together weigh less than one
  prompt's FDT step) or its mean KL alone (``kl``, NVIDIA ModelOpt's kind of signal).
- :func:`dtm_allocation`: the DTM paper's procedure (Deiseroth et al. 2024): each component takes
  the strongest compression it tolerates before its FDT drops below a threshold; the threshold is
  lowered until the plan fits the budget.
- :func:`random_allocation`: a random plan that fits the same budget (a baseline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dtm_core.compression.recipe import Recipe, RecipeItem
from dtm_core.errors import DTMError
from dtm_core.compression.methods import parse_spec

KEEP = "none"
BUDGET_KINDS = ("bits", "sparsity", "bytes")
KV_CONTEXT = 1000                          # a KV plan's cache memory is shown per this context
KV_BYTES = "kv_cache_bytes_per_1k_tokens"  # its key in a plan's measure
KV_DENSE = "kv_cache_bytes_per_1k_tokens_dense"   # the same with every cache kept


@dataclass(frozen=True)
class Budget:
    kind: str       # "bits" | "sparsity" | "bytes"
    value: float
    per: str = "weight"     # what a bits budget averages over: "weight" or "cached value"

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise DTMError(f"Unknown budget '{self.kind}': use one of {', '.join(BUDGET_KINDS)}.")
        if not math.isfinite(self.value) or self.value <= 0:
            raise DTMError(f"The {self.kind} budget must be a positive number, not {self.value}.")
        if self.kind == "sparsity" and not self.value < 1:
            raise DTMError("The sparsity budget is a share of the weights in (0, 1), e.g. 0.5.")

    def __str__(self) -> str:
        return {"bits": f"{self.value:g} bits per {self.per}", "sparsity": f"{self.value:.0%} sparsity",
                "bytes": f"{self.value / 2 ** 30:.3g} GiB"}[self.kind]

    def costs(self, table: "ChoiceTable") -> tuple[np.ndarray, float]:
        """(cost of each choice, capacity) of this budget on ``table``."""
        if self.kind == "sparsity":
            return table.kept, (1.0 - self.value) * table.total_params
        if self.kind == "bits":
            return table.bits, self.value * table.total_params
        return table.bits, self.value * 8.0 - table.rest_bits

    def of(self, measure: dict) -> float:
        """This budget's quantity in a plan's :meth:`ChoiceTable.measure`."""
        return measure[{"bits": "avg_bits", "sparsity": "sparsity", "bytes": "bytes"}[self.kind]]

    def with_value(self, value: float) -> "Budget":
        return Budget(self.kind, value, self.per)


@dataclass
class ChoiceTable:
    components: list[str]
    params: np.ndarray           # (n,) weights of each component
    choices: list[str]           # "none" first, then the candidate specs
    bits: np.ndarray             # (n, m) storage bits of the component under each choice
    kept: np.ndarray             # (n, m) weights left non-zero
    fdt: np.ndarray              # (n, m) fit mean FDT of the component alone (N when kept)
    kl: np.ndarray               # (n, m) fit mean KL of the component alone (0 when kept)
    new_tokens: int
    prompts: int                 # fit prompts: a mean FDT moves in steps of 1 / prompts
    dtype_bits: int
    rest_bits: float             # every other parameter of the model at the working dtype
    family: str = "llama"
    # a KV plan's table (components LAYER.kcache / LAYER.vcache): ``params`` are the values each
    # cache stores per token, ``bits`` its bits per token, and ``stored`` the tokens it holds
    # with KV_CONTEXT tokens of context (fewer on a sliding-window layer); None for weights
    stored: np.ndarray | None = None

    @property
    def total_params(self) -> float:
        return float(self.params.sum())

    @property
    def unit(self) -> str:
        """What bits are averaged over: a weight, or a cached value in a KV plan."""
        return "weight" if self.stored is None else "cached value"

    def measure(self, assign) -> dict:
        """avg_bits (over the components), sparsity (share of their weights at zero) and bytes
        (the whole model) of a plan. A KV plan: avg_bits per cached value, bytes the model's
        (its weights are untouched) and ``kv_cache_bytes_per_1k_tokens``, the cache's bytes
        for KV_CONTEXT tokens of context (one sequence, scales included), and the same with every
        cache kept (``kv_cache_bytes_per_1k_tokens_dense``)."""
        rows = np.arange(len(self.components))
        bits = float(self.bits[rows, assign].sum())
        kept = float(self.kept[rows, assign].sum())
        if self.stored is not None:
            return {"avg_bits": bits / self.total_params, "sparsity": 0.0,
                    "bytes": int(math.ceil(self.rest_bits / 8.0)),
                    KV_BYTES: int(math.ceil(float((self.bits[rows, assign]
                                                   * self.stored).sum()) / 8.0)),
                    KV_DENSE: int(math.ceil(float((self.bits[:, 0] * self.stored).sum()) / 8))}
        return {"avg_bits": bits / self.total_params,
                "sparsity": 1.0 - kept / self.total_params,
                "bytes": int(math.ceil((bits + self.rest_bits) / 8.0))}

    def assignments(self, assign) -> dict[str, str]:
        return {c: self.choices[j] for c, j in zip(self.components, assign)}

    def recipe(self, assign) -> Recipe:
        """One recipe item per spec used (kept components are left out)."""
        return recipe_of(self.assignments(assign))

    def uniform(self, spec: str) -> np.ndarray:
        return np.full(len(self.components), self.choices.index(spec))

    def index(self, assignments: dict[str, str]) -> np.ndarray:
        """Choice indices of a component -> spec mapping."""
        return np.array([self.choices.index(assignments[c]) for c in self.components])

    def frame(self) -> pd.DataFrame:
        """Every (component, choice) cell: bits per weight, sparsity, fit mean FDT and KL (the
        level curves of each component are a view of it)."""
        rows = []
        for i, c in enumerate(self.components):
            for j, spec in enumerate(self.choices):
                rows.append({"component": c, "spec": spec,
                             "bits_per_weight": self.bits[i, j] / self.params[i],
                             "sparsity": 1 - self.kept[i, j] / self.params[i],
                             "fdt_mean": self.fdt[i, j], "kl_mean": self.kl[i, j]})
        return pd.DataFrame(rows)

    def predicted_fdt(self, assign) -> float:
        """N minus the FDT the components lose alone, summed (a lower bound in spirit, not
        a prediction to trust: losses compound; the plan is verified by real evaluations)."""
        rows = np.arange(len(self.components))
        return float(self.new_tokens - (self.new_tokens - self.fdt[rows, assign]).sum())


def recipe_of(assignments: dict[str, str]) -> Recipe:
    """The recipe of a component -> spec mapping: one item per spec, kept components left out."""
    groups: dict[str, list[str]] = {}
    for c, s in assignments.items():
        if s != KEEP:
            groups.setdefault(s, []).append(c)
    if not groups:
        return Recipe.single(KEEP)
    return Recipe(tuple(RecipeItem(",".join(cs), parse_spec(s)) for s, cs in groups.items()))


def choice_table(dense_model, tables: dict[str, pd.DataFrame], new_tokens: int, prompts: int
                 ) -> ChoiceTable:
    """The choice table of a model from one sweep table per candidate spec (cells of the same
    components, in any order)."""
    from dtm_core.models.components import all_components
    from dtm_core.models.families import family_of

    if not tables:
        raise DTMError("Give at least one candidate spec.")
    first = next(iter(tables.values()))
    names = list(first.component)
    caches = {parse_spec(s).targets_cache for s in tables if s != KEEP}
    if len(caches) > 1:
        raise DTMError("A plan is over weights or over KV caches: give weight specs "
                       "(int4:g128, ...) or kv: specs (kv:int8, kv:int4, ...), not both.")
    if caches == {True}:
        return _cache_table(dense_model, tables, names, new_tokens, prompts)
    comps = {c.name: c for c in all_components(dense_model)}
    missing = [n for n in names if n not in comps]
    if missing:
        raise DTMError(f"Budgets cover whole components; {', '.join(missing[:3])} is not one.")
    dtype_bits = next(dense_model.parameters()).element_size() * 8
    choices = [KEEP] + [s for s in tables if s != KEEP]
    n, m = len(names), len(choices)
    bits, kept = np.zeros((n, m)), np.zeros((n, m))
    fdt, kl = np.full((n, m), float(new_tokens)), np.zeros((n, m))
    params = np.array([comps[c].params for c in names], dtype=float)
    for j, spec in enumerate(choices):
        sp = parse_spec(spec)
        for i, name in enumerate(names):
            c = comps[name]
            mats = c.matrices(c.weight)
            rows = len(c.rows) if c.rows is not None else mats[0].shape[0]
            per = sp.bits_per_weight(*mats[0].shape, dtype_bits)
            if per is None:
                raise DTMError(f"'{spec}' has no known storage size, so no budget can count it; "
                               "give quantization or pruning specs such as int4:g128 or "
                               "magnitude:0.5.")
            bits[i, j] = per * rows * mats[0].shape[1] * len(mats)
            kept[i, j] = params[i] * (1.0 - sp.sparsity_share)
        if spec == KEEP:
            continue
        t = tables[spec].set_index("component")
        if set(t.index) != set(names):
            raise DTMError(f"The sweep of {spec} covers other components than the first one's.")
        fdt[:, j] = t.loc[names, "fdt_mean"].to_numpy(float)
        kl[:, j] = t.loc[names, "kl_mean"].to_numpy(float)
    counted = set(id(comps[c].weight) for c in names)
    rest = sum(p.numel() for p in dense_model.parameters() if id(p) not in counted)
    return ChoiceTable(names, params, choices, bits, kept, fdt, kl, new_tokens, prompts,
                       dtype_bits, float(rest * dtype_bits), family_of(dense_model).name)


def _cache_table(dense_model, tables, names, new_tokens, prompts) -> ChoiceTable:
    """The choice table of a KV plan: each cache component costs its bits per cached value
    (:meth:`KVQuant.cache_bits`, scales included; kept: the working dtype) times the values it
    stores per token."""
    from dtm_core.compression.kvcache import cache_layout, head_dim, resolve_cache
    from dtm_core.models.families import family_of

    comps = resolve_cache(dense_model, ",".join(names))
    slots = cache_layout(dense_model, comps)
    dtype_bits = next(dense_model.parameters()).element_size() * 8
    choices = [KEEP] + [s for s in tables if s != KEEP]
    n, m = len(comps), len(choices)
    params = np.array([slots[c.name].values for c in comps], dtype=float)
    bits = np.zeros((n, m))
    fdt, kl = np.full((n, m), float(new_tokens)), np.zeros((n, m))
    for j, spec in enumerate(choices):
        sp = parse_spec(spec)
        for i, c in enumerate(comps):
            per = dtype_bits if spec == KEEP else sp.cache_bits(head_dim(dense_model, c))
            bits[i, j] = per * params[i]
        if spec == KEEP:
            continue
        t = tables[spec].set_index("component")
        if set(t.index) != set(names):
            raise DTMError(f"The sweep of {spec} covers other components than the first one's.")
        fdt[:, j] = t.loc[[c.name for c in comps], "fdt_mean"].to_numpy(float)
        kl[:, j] = t.loc[[c.name for c in comps], "kl_mean"].to_numpy(float)
    rest = sum(p.numel() for p in dense_model.parameters())
    stored = np.array([slots[c.name].tokens(KV_CONTEXT) for c in comps], dtype=float)
    return ChoiceTable([c.name for c in comps], params, choices, bits,
                       np.repeat(params[:, None], m, axis=1), fdt, kl, new_tokens, prompts,
                       dtype_bits, float(rest * dtype_bits), family_of(dense_model).name,
                       stored=stored)


def losses(table: ChoiceTable, signal: str = "fdt") -> np.ndarray:
    """(n, m) what each choice costs the objective: FDT lost (KL breaks ties) or mean KL."""
    if signal == "kl":
        return table.kl.copy()
    if signal != "fdt":
        raise DTMError(f"Unknown signal '{signal}': use fdt or kl.")
    worst = float(np.nansum(table.kl.max(axis=1)))
    tie = 0.5 / (max(table.prompts, 1) * worst) if worst > 0 else 0.0
    return (table.new_tokens - table.fdt) + tie * table.kl


def _check_fits(cost: np.ndarray, cap: float, budget: Budget, table: ChoiceTable) -> None:
    least = float(cost.min(axis=1).sum())
    if least > cap * (1 + 1e-12):
        best = budget.of(table.measure(cost.argmin(axis=1)))
        what = {"bits": f"still needs {best:.4g} bits per weight",
                "bytes": f"still needs {best:.4g} bytes",
                "sparsity": f"reaches {best:.1%} sparsity at most"}[budget.kind]
        raise DTMError(f"No plan fits {budget}: the most compressed choice of every component "
                       f"{what}.")


def knapsack(table: ChoiceTable, budget: Budget, signal: str = "fdt", steps: int = 20000
             ) -> np.ndarray:
    """The choice per component that minimizes the summed loss within the budget (exact over
    the discretized budget), then a greedy fill of the rounding's leftover."""
    cost, cap = budget.costs(table)
    _check_fits(cost, cap, budget, table)
    loss = losses(table, signal)
    n, m = cost.shape
    base = cost.min(axis=1)
    extra = cost - base[:, None]
    room = cap - float(base.sum())
    unit = room / steps if room > 0 else 1.0
    w = np.ceil(extra / unit - 1e-9).astype(np.int64) if room > 0 else \
        np.where(extra > 0, steps + 1, 0)
    dp = np.zeros(steps + 1)
    pick = np.zeros((n, steps + 1), dtype=np.int16)
    for i in range(n):
        best = np.full(steps + 1, np.inf)
        for j in range(m):
            if w[i, j] > steps:
                continue
            cand = np.full(steps + 1, np.inf)
            cand[w[i, j]:] = dp[:steps + 1 - w[i, j]] + loss[i, j]
            better = cand < best
            best[better] = cand[better]
            pick[i, better] = j
        dp = best
    assign = np.zeros(n, dtype=np.int64)
    b = steps
    for i in range(n - 1, -1, -1):
        j = int(pick[i, b])
        assign[i] = j
        b -= int(w[i, j])
    return greedy_fill(assign, cost, cap, loss)


def greedy_fill(assign: np.ndarray, cost: np.ndarray, cap: float, loss: np.ndarray
                ) -> np.ndarray:
    """Upgrade, while the budget allows, the component whose upgrade lowers the loss most per
    unit of cost."""
    assign = assign.copy()
    rows = np.arange(len(assign))
    left = cap - float(cost[rows, assign].sum())
    while True:
        gain = loss[rows, assign][:, None] - loss
        more = cost - cost[rows, assign][:, None]
        ok = (gain > 0) & (more <= left + 1e-9)
        if not ok.any():
            return assign
        rate = np.where(ok, gain / np.maximum(more, 1e-12), -np.inf)
        i, j = np.unravel_index(int(np.argmax(rate)), rate.shape)
        left -= float(more[i, j])
        assign[i] = j


def dtm_allocation(table: ChoiceTable, budget: Budget) -> tuple[np.ndarray, float]:
    """The DTM paper's FDT-guided allocation and the threshold (mean FDT) it stopped at."""
    cost, cap = budget.costs(table)
    _check_fits(cost, cap, budget, table)
    order = np.argsort(-cost, axis=1, kind="stable")    # least compression first
    fdt_sorted = np.take_along_axis(table.fdt, order, axis=1)
    rows = np.arange(len(table.components))
    for t in sorted(set(table.fdt.ravel().tolist()), reverse=True):
        ok = fdt_sorted >= t - 1e-12
        # the last choice before the first one whose FDT drops below t
        first_bad = np.where(ok.all(axis=1), ok.shape[1], np.argmin(ok, axis=1))
        assign = order[rows, np.maximum(first_bad - 1, 0)]
        if float(cost[rows, assign].sum()) <= cap * (1 + 1e-12):
            return assign, float(t)
    # every threshold tried: the cheapest choice of each component fits (checked above)
    return cost.argmin(axis=1), float(table.fdt.min())


def random_allocation(table: ChoiceTable, budget: Budget, seed: int = 0) -> np.ndarray:
    """A random plan within the budget: every component starts at its cheapest choice, then in
    random order takes a random choice among those the budget still allows."""
    cost, cap = budget.costs(table)
    _check_fits(cost, cap, budget, table)
    rng = np.random.default_rng(seed)
    assign = cost.argmin(axis=1)
    rows = np.arange(len(assign))
    left = cap - float(cost[rows, assign].sum())
    for i in rng.permutation(len(assign)):
        more = cost[i] - cost[i, assign[i]]
        options = np.flatnonzero((more >= 0) & (more <= left + 1e-9))
        j = int(rng.choice(options))
        left -= float(more[j])
        assign[i] = j
    return assign


def closest_uniform(table: ChoiceTable, budget: Budget) -> str:
    """The candidate spec whose uniform plan is closest to the budget."""
    specs = [s for s in table.choices if s != KEEP]
    return min(specs, key=lambda s: abs(budget.of(table.measure(table.uniform(s)))
                                        - budget.value))
