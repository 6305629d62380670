"""Runs of one pair on the same prompts and dense references under several IntactKV settings
("plain" = none), as one result type with one rule for wide tables: the primary run's columns keep
their names, every other run's get ``_<its name>``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd

from dtm_core.measure.divergence import DivergenceResult, divergence
from dtm_core.compression.intactkv import IntactKV
from dtm_core.compression.pair import Pair

Progress = Callable[[float, str], None]

VARIANT_COLUMNS = ["variant", "fdt_mean", "fdt_median", "sdt_mean", "kl_mean", "top1_agree_mean",
                   "ppl_change", "ppl_ratio_mean"]   # (ppl_ratio_mean: the older name, = 1 + change)


def with_variant(primary: pd.DataFrame, other: pd.DataFrame, name: str, columns: Sequence[str],
                 on: str | None = None) -> pd.DataFrame:
    """``primary`` with ``other``'s ``columns`` beside it as ``COLUMN_<name>`` (rows matched by
    position, or by the column ``on``): the one suffix rule of every comparison table."""
    cols = [c for c in columns if c in other.columns]
    if on is None:
        out = primary.copy()
        for c in cols:
            out[f"{c}_{name}"] = other[c].to_numpy()
        return out
    return primary.join(other.set_index(on)[cols].add_suffix(f"_{name}"), on=on)


@dataclass
class VariantComparison:
    """Divergence runs of one pair on the same prompts and dense references, by variant name."""

    runs: dict[str, DivergenceResult]
    settings: dict[str, IntactKV | None]

    def summary_table(self) -> pd.DataFrame:
        """One row of aggregates per variant."""
        rows = [{"variant": name, **{k: r.summary.get(k) for k in VARIANT_COLUMNS[1:]}}
                for name, r in self.runs.items()]
        return pd.DataFrame(rows, columns=VARIANT_COLUMNS)

    def wide(self, primary: str, columns: Sequence[str]) -> pd.DataFrame:
        """The primary run's table with every other run's ``columns`` suffixed by its name."""
        out = self.runs[primary].table
        for name, r in self.runs.items():
            if name != primary:
                out = with_variant(out, r.table, name, columns)
        return out

    @property
    def references(self):
        return next(iter(self.runs.values())).references

    @property
    def prompt_ids(self):
        return next(iter(self.runs.values())).prompt_ids


def compare_variants(pair: Pair, prompt_ids: Sequence[Sequence[int]], new_tokens: int,
                     variants: dict[str, IntactKV | None], *, references=None,
                     batch_size: int = 16, generate_compressed: bool = False,
                     free_run: bool = False, dense_side=None,
                     progress: Progress | None = None) -> VariantComparison:
    """Every variant ({name: IntactKV or None}) on the same prompts and dense references (the
    first run's, unless given), e.g. {"plain": None, "intactkv": IntactKV(k=1)}."""
    runs, refs = {}, references
    for n, (name, ikv) in enumerate(variants.items()):
        r = divergence(pair, prompt_ids=prompt_ids, new_tokens=new_tokens, references=refs,
                       batch_size=batch_size, generate_compressed=generate_compressed,
                       free_run=free_run, intactkv=ikv,
                       dense_side=dense_side if n == 0 else None)
        refs = r.references
        runs[name] = r
        if progress:
            progress((n + 1) / len(variants), f"{name}: mean FDT {r.summary['fdt_mean']:.2f}")
    return VariantComparison(runs=runs, settings=dict(variants))


