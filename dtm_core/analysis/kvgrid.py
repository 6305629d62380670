"""The K-bits x V-bits grid of KV-cache quantization: every (K bits, V bits) pair on every layer's
keys (``kv:intK`` on ``*.kcache``) and values (``kv:intV`` on ``*.vcache``) at once, measured on
the same prompts against one set of dense references: mean FDT and KL as two heatmaps
(exllamav3's table, with the divergence metrics)."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import pandas as pd

from dtm_core.errors import DTMError

COLUMNS = ["k_bits", "v_bits", "recipe", "cache_bits", "fdt_mean", "sdt_mean", "kl_mean",
           "top1_agree_mean"]


def parse_bits(text: str | Sequence[int] | None) -> list[int]:
    """``2-8``, ``2,4,8`` or a list: the bit widths of one axis (each 2..8)."""
    if text is None or text == "":
        return list(range(2, 9))
    if not isinstance(text, str):
        vals = [int(b) for b in text]
    else:
        vals = []
        try:
            for part in (p.strip() for p in text.split(",") if p.strip()):
                a, _, b = part.partition("-")
                vals += list(range(int(a), int(b or a) + 1))
        except ValueError:
            raise DTMError(f"Bits '{text}' must be a range or list of numbers, e.g. 2-8 or "
                           "2,4,8.") from None
    if not vals or any(not 2 <= b <= 8 for b in vals):
        raise DTMError(f"Bits '{text}' must lie in 2-8.")
    return sorted(set(vals))


def grid_recipe(k_bits: int, v_bits: int, group: int | None = None, layers: str = "*") -> str:
    g = f":g{group}" if group else ""
    return f"kv:int{k_bits}{g}@{layers}.kcache;kv:int{v_bits}{g}@{layers}.vcache"


def grid_rows(dense, prompt_ids, new_tokens: int, *, k_bits="2-8", v_bits="2-8",
              group: int | None = None, layers: str = "*", references=None,
              batch_size: int = 16) -> Iterator[dict]:
    """The grid's rows one at a time, K bits outer, V bits inner: the divergence summary of the
    pair whose every selected layer's keys are ``kv:intK`` and values ``kv:intV`` (groups of
    ``group`` along the head dimension when given), against one set of dense references.
    Whoever iterates decides when to stop (the app's Stop, between cells)."""
    from dtm_core.compression.kvcache import head_dim, resolve_cache
    from dtm_core.compression.methods import parse_spec
    from dtm_core.compression.pair import make_pair
    from dtm_core.compression.recipe import Recipe
    from dtm_core.measure.divergence import divergence, reference_continuations

    ks, vs = parse_bits(k_bits), parse_bits(v_bits)
    prompt_ids = [list(p) for p in prompt_ids]
    hd = head_dim(dense.model, resolve_cache(dense.model, f"{layers.split(',')[0]}.kcache")[0])
    if references is None:
        references = reference_continuations(dense, prompt_ids, new_tokens, batch_size)
    g = f":g{group}" if group else ""
    for k in ks:
        for v in vs:
            text = grid_recipe(k, v, group, layers)
            s = divergence(make_pair(dense, Recipe.parse(text)), prompt_ids=prompt_ids,
                           references=references, new_tokens=new_tokens,
                           batch_size=batch_size).summary
            bits = (parse_spec(f"kv:int{k}{g}").cache_bits(hd)
                    + parse_spec(f"kv:int{v}{g}").cache_bits(hd)) / 2    # per cached value
            yield {"k_bits": k, "v_bits": v, "recipe": text, "cache_bits": bits,
                   **{c: s[c] for c in COLUMNS[4:]}}


def kv_grid(dense, prompt_ids, new_tokens: int, *, k_bits="2-8", v_bits="2-8",
            group: int | None = None, layers: str = "*", references=None, batch_size: int = 16,
            progress: Callable[[float, str], None] | None = None) -> pd.DataFrame:
    """Every row of :func:`grid_rows` as a table (``progress`` after each cell)."""
    note = progress or (lambda f, m: None)
    cells = len(parse_bits(k_bits)) * len(parse_bits(v_bits))
    rows = []
    for row in grid_rows(dense, prompt_ids, new_tokens, k_bits=k_bits, v_bits=v_bits,
                         group=group, layers=layers, references=references,
                         batch_size=batch_size):
        rows.append(row)
        note(len(rows) / cells, f"K {row['k_bits']} bits, V {row['v_bits']} bits: mean FDT "
                                f"{row['fdt_mean']:.1f}")
    return pd.DataFrame(rows, columns=COLUMNS)


def grid_matrix(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``metric`` as a matrix: rows K bits, columns V bits."""
    return table.pivot(index="k_bits", columns="v_bits", values=metric)


__all__ = ["COLUMNS", "grid_matrix", "grid_recipe", "grid_rows", "kv_grid", "parse_bits"]
