"""Level curves: a metric against sparsity or bit width, one line per kind (all layers of it)."""
from __future__ import annotations

import pandas as pd

from .compress import Recipe
from .divergence import divergence, reference_continuations
from .errors import DTMError
from .generation import encode_prompts
from .models import LoadedModel
from .pair import make_pair


def level_specs(method: str, levels: str) -> list[tuple[float, str]]:
    """``magnitude``/``wanda`` take sparsities, ``int``/``int:gG`` take bit widths."""
    try:
        values = [float(x) for x in str(levels).replace(" ", "").split(",") if x]
    except ValueError:
        raise DTMError(f"Levels '{levels}' must be comma-separated numbers.") from None
    if not values:
        raise DTMError("Give at least one level.")
    head, _, opts = method.partition(":")
    if head in ("magnitude", "wanda"):
        return [(v, f"{head}:{v:g}") for v in values]
    if head == "int":
        return [(v, f"int{int(v)}" + (f":{opts}" if opts else "")) for v in values]
    raise DTMError(f"Unknown level-curve method '{method}': use magnitude, wanda, int or int:gG.")


def level_curves(dense: LoadedModel, method: str, levels: str, kinds: str, prompts, new_tokens: int,
                 *, chat: bool = False, progress=None) -> pd.DataFrame:
    specs = level_specs(method, levels)
    kinds_l = [k.strip() for k in str(kinds).split(",") if k.strip()]
    if not kinds_l:
        raise DTMError("Give at least one kind, e.g. q,down.")
    ids = encode_prompts(dense.tokenizer, list(prompts), chat=chat)
    refs = reference_continuations(dense, ids, new_tokens)
    rows, total = [], len(specs) * len(kinds_l)
    for kind in kinds_l:
        for level, spec in specs:
            pair = make_pair(dense, Recipe.single(spec, f"*.{kind}"), calibration=list(prompts),
                             chat=chat)
            res = divergence(pair, prompt_ids=ids, references=refs, new_tokens=new_tokens)
            rows.append({"kind": kind, "level": level, "spec": spec, **{
                k: res.summary[k] for k in ("fdt_mean", "fdt_median", "sdt_mean", "kl_mean")}})
            if progress:
                progress(len(rows) / total, f"{spec} on *.{kind}")
    return pd.DataFrame(rows)
