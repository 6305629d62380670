"""Free-running comparison of a pair (issue 27): both models generate greedily to their EOS or N,
and the two texts are compared after their first divergence, where teacher forcing says nothing.

Per prompt (:data:`COLUMNS`): generated lengths (tokens before the EOS), their ratio, whether
each text ends in a loop, where the compressed text rejoins the dense one, and the normalized
token edit similarity of the two texts. Final answers (:func:`final_answer`) for sets whose items
say ``answer_type: number``: the content of the last ``\\boxed{...}``, else the last number.

Edit similarity uses rapidfuzz's Levenshtein (a C++ bit-parallel implementation: 4096 x 4096
tokens in well under a millisecond), over token ids, so it is exact at the token level.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Sequence

import numpy as np
import pandas as pd

COLUMNS = ["len_dense", "len_compressed", "len_ratio", "loop_dense", "loop_compressed",
           "rejoin_pos", "edit_sim"]
ANSWER_COLUMNS = ["answer_dense", "answer_compressed", "answer_match"]
LOOP_SPAN = 32        # a repeated span has at most this many tokens
LOOP_REPEATS = 3      # ... and is repeated at least this many times back to back at the end
REJOIN_K = 16         # the compressed text rejoins once it holds the next 16 dense tokens in order


def generated(tokens: Sequence[int], eos: set | frozenset | Sequence[int]) -> list[int]:
    """The tokens before the first EOS (a text's content; its length is the text's length)."""
    eos = set(eos)
    out = []
    for t in tokens:
        if t in eos:
            break
        out.append(int(t))
    return out


def ends_in_loop(tokens: Sequence[int], max_span: int = LOOP_SPAN,
                 repeats: int = LOOP_REPEATS) -> bool:
    """True when the sequence ends in a span of at most ``max_span`` tokens repeated at least
    ``repeats`` times back to back (``... a b c a b c a b c``)."""
    t = list(tokens)
    for s in range(1, max_span + 1):
        if s * repeats > len(t):
            break
        tail = t[-s:]
        if all(t[len(t) - (r + 1) * s:len(t) - r * s] == tail for r in range(1, repeats)):
            return True
    return False


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two token sequences differ (a length difference counts); None
    when they are identical."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return t
    return None if len(a) == len(b) else min(len(a), len(b))


def rejoin_position(dense: Sequence[int], comp: Sequence[int], k: int = REJOIN_K) -> int | None:
    """The first position j after the first divergence such that the compressed tokens from j
    on begin with ``k`` consecutive dense tokens that also come after the divergence (the
    compressed text is back on the dense track, shifted or not); None when it never is or the
    texts never diverge."""
    f = first_difference(dense, comp)
    if f is None:
        return None
    grams = {tuple(dense[i:i + k]) for i in range(f, len(dense) - k + 1)}
    for j in range(f + 1, len(comp) - k + 1):
        if tuple(comp[j:j + k]) in grams:
            return j
    return None


def edit_similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """1 - Levenshtein distance / the longer length, over tokens (1.0 for two empty texts)."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_similarity(list(a), list(b)))


THINK_COLUMNS = ["len_thinking_dense", "len_answer_dense", "len_thinking_compressed",
                 "len_answer_compressed"]


def thinking_length(prompt: Sequence[int], tokens: Sequence[int], marks: tuple[int, int]) -> int:
    """Tokens of a text's thinking span (``marks`` = the ids of ``<think>``, ``</think>``): up to
    and including the first ``</think>`` when the span is open at the start (the prompt's last
    mark is ``<think>``) or the text opens it; to the end when it never closes; 0 when the
    prompt closed it (a template with thinking off) and the text opens none."""
    start, end = marks
    t = list(tokens)
    last = next((x for x in reversed(list(prompt)) if x in marks), None)
    first = 0 if last == start else (t.index(start) if start in t else None)
    if first is None:
        return 0
    rest = t[first:]
    return rest.index(end) + 1 if end in rest else len(rest)


def free_run_row(dense_tokens: Sequence[int], comp_tokens: Sequence[int], eos,
                 think: tuple | None = None) -> dict:
    """The :data:`COLUMNS` of one prompt from the two generations (EOS included or not); with
    ``think`` = (prompt ids, (``<think>`` id, ``</think>`` id)) for a tokenizer whose template
    marks thinking, also :data:`THINK_COLUMNS`: each length split into thinking and answer
    tokens."""
    d, c = generated(dense_tokens, eos), generated(comp_tokens, eos)
    j = rejoin_position(d, c)
    split = {}
    if think is not None:
        for side, toks in (("dense", d), ("compressed", c)):
            k = thinking_length(think[0], toks, think[1])
            split.update({f"len_thinking_{side}": k, f"len_answer_{side}": len(toks) - k})
    return {**split, "len_dense": len(d), "len_compressed": len(c),
            "len_ratio": len(c) / len(d) if d else (1.0 if not c else math.nan),
            "loop_dense": ends_in_loop(d), "loop_compressed": ends_in_loop(c),
            "rejoin_pos": math.nan if j is None else j, "edit_sim": edit_similarity(d, c)}


def free_run_summary(table: pd.DataFrame) -> dict:
    """Loop rates of both models, mean and median length ratio, and the share of the prompts
    whose texts diverge that rejoin (of all prompts, when none diverge: 0)."""
    if "len_ratio" not in table or table.empty:
        return {}
    ratio = table.len_ratio.astype(float)
    diverged = table.len_dense.astype(int).ne(table.len_compressed.astype(int)) | \
        table.edit_sim.astype(float).lt(1.0)
    return {"loop_rate_dense": float(table.loop_dense.astype(bool).mean()),
            "loop_rate_compressed": float(table.loop_compressed.astype(bool).mean()),
            "len_ratio_mean": float(ratio.mean()), "len_ratio_median": float(ratio.median()),
            "rejoin_share": float(table.rejoin_pos[diverged].notna().mean())
            if diverged.any() else 0.0}


# ---- final answers --------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"^\\d?frac\{([^{}]+)\}\{([^{}]+)\}$")


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        i, depth = start + len("\\boxed{"), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{"):i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)      # unclosed: the one before it
    return None


def final_answer(text: str) -> str:
    """A text's final answer: the content of its last ``\\boxed{...}``, else its last number
    (commas removed); empty when it has neither."""
    boxed = _last_boxed(text or "")
    if boxed is not None:
        return boxed
    nums = _NUMBER.findall(text or "")
    return nums[-1].replace(",", "") if nums else ""


def answer_value(answer: str) -> Fraction | None:
    """The number an answer names (``1,234``, ``-3.5``, ``$12``, ``3/4``, ``\\frac{3}{4}``,
    ``12 apples``), exactly, or None."""
    a = (answer or "").strip().replace(",", "").replace("$", "").replace("\\$", "")
    a = a.replace("\\%", "").rstrip("%").strip()
    m = _FRAC.match(a)
    if m:
        a = f"{m.group(1)}/{m.group(2)}"
    try:
        if "/" in a:
            num, den = a.split("/", 1)
            return Fraction(num.strip()) / Fraction(den.strip())
        return Fraction(a)
    except (ValueError, ZeroDivisionError):
        nums = _NUMBER.findall(a)
        if len(nums) == 1:
            return Fraction(nums[0].replace(",", ""))
        return None


def answers_equal(a: str, b: str) -> bool:
    """Two final answers are equal: numerically when both name a number, else as text (both
    non-empty)."""
    va, vb = answer_value(a), answer_value(b)
    if va is not None and vb is not None:
        return va == vb
    return bool(a.strip()) and a.strip() == b.strip()


def answer_columns(dense_texts: Sequence[str], comp_texts: Sequence[str]) -> pd.DataFrame:
    """:data:`ANSWER_COLUMNS` of paired texts."""
    d = [final_answer(t) for t in dense_texts]
    c = [final_answer(t) for t in comp_texts]
    return pd.DataFrame({"answer_dense": d, "answer_compressed": c,
                         "answer_match": [answers_equal(x, y) for x, y in zip(d, c)]})


def numeric_correct(output: str, answers: Sequence[str]) -> bool:
    """The output's final answer equals one of the reference answers numerically."""
    got = final_answer(output)
    return any(answers_equal(got, a) for a in answers)


def lengths_histogram(ratios, bins: int = 20) -> pd.DataFrame:
    """Counts of length ratios (compressed / dense) in log2 bins from 1/8 to 8."""
    r = np.asarray([x for x in ratios if x == x and x > 0], float)
    edges = np.logspace(-3, 3, bins + 1, base=2.0)
    counts, _ = np.histogram(np.clip(r, edges[0], edges[-1]), edges)
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "prompts": counts})
