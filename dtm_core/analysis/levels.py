"""Level curves: a metric against sparsity or bit width, one line per kind (all layers of it)."""
from __future__ import annotations

import pandas as pd

from dtm_core.compression.calibration import calibration_from
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence, reference_continuations
from dtm_core.errors import DTMError
from dtm_core.models.generation import encode_prompts
from dtm_core.compression.methods import level_spec, parse_spec
from dtm_core.models.load import LoadedModel
from dtm_core.compression.pair import make_pair


FORMATS = "formats"    # a level curve across formats: the levels are specs, placed at their bits
DEFAULT_FORMATS = "fp8,mxfp8,nvfp4,mxfp4,int4:g128,int3:g64"


def level_specs(method: str, levels: str) -> list[tuple[float, str]]:
    """(level, spec) of each point: the method (e.g. ``magnitude``, ``int:g128``) at each level;
    which methods have a level axis, and what it means, the methods registry says. With
    ``formats`` the levels are specs (any registered quantization, e.g. the default
    ``fp8,mxfp8,nvfp4,mxfp4,int4:g128,int3:g64``), each placed at its bits per weight on a large
    matrix (scales and global scales included)."""
    if str(method).strip().lower() == FORMATS:
        from dtm_core.compression.methods import parse_spec
        from dtm_core.compression.methods.formats import nominal_bits

        specs = [x.strip() for x in str(levels or DEFAULT_FORMATS).split(",") if x.strip()]
        if not specs:
            raise DTMError("Give at least one spec, e.g. " + DEFAULT_FORMATS + ".")
        out = []
        for sp in map(parse_spec, specs):
            bits = nominal_bits(sp)
            if bits != bits:
                raise DTMError(f"'{sp}' has no size in bits; level curves across formats take "
                               "quantization specs.")
            out.append((bits, str(sp)))
        return out
    try:
        values = [float(x) for x in str(levels).replace(" ", "").split(",") if x]
    except ValueError:
        raise DTMError(f"Levels '{levels}' must be comma-separated numbers.") from None
    if not values:
        raise DTMError("Give at least one level.")
    return [(v, str(level_spec(method, v))) for v in values]


def level_curves(dense: LoadedModel, method: str, levels: str, kinds: str, prompts, new_tokens: int,
                 *, chat: bool = False, progress=None, calibration=None,
                 store=None) -> pd.DataFrame | None:
    """One row per (kind, level): the aggregates of compressing every layer's ``kind`` at
    ``level``. ``calibration`` as for a pair (default: the prompts). With ``store`` (torchrun's
    c10d store) the points are shared out over the ranks; rank 0 gets the table, the others
    None."""
    specs = level_specs(method, levels)
    kinds_l = [k.strip() for k in str(kinds).split(",") if k.strip()]
    if not kinds_l:
        raise DTMError("Give at least one kind, e.g. q,down.")
    ids = encode_prompts(dense.tokenizer, list(prompts), chat=chat)
    refs = reference_continuations(dense, ids, new_tokens)
    calib = None
    if any(parse_spec(sp).needs_calibration for _, sp in specs):
        calib = calibration_from(dense, calibration if calibration is not None else ids)
    points = [(kind, level, spec) for kind in kinds_l for level, spec in specs]

    def one(i):
        kind, level, spec = points[i]
        pair = make_pair(dense, Recipe.single(spec, f"*.{kind}"), calibration=calib)
        res = divergence(pair, prompt_ids=ids, references=refs, new_tokens=new_tokens)
        return {"kind": kind, "level": level, "spec": spec,
                **{k: v for k, v in res.summary.items() if k != "prompts"}}

    from dtm_core.distributed import shared_map

    rows = shared_map(len(points), one, f"levels-{method}-{levels}-{kinds}", store,
                      each=None if progress is None else
                      (lambda i, n: progress(n / len(points),
                                             f"{points[i][2]} on *.{points[i][0]}")))
    return None if rows is None else pd.DataFrame(rows)
