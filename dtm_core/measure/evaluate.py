"""Prompt-set evaluation: divergence metrics plus knowledge-task accuracy (LLM-KICK style).

Accuracy follows LLM-KICK (Jaiswal et al., ICLR 2024): an output is correct when a normalized
reference answer is contained in the normalized output. Multiple-choice items score the first choice
letter the output names. Accuracy needs the compressed model's own greedy output, so sets with
answers also generate it.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from dtm_core import METRIC_VERSION, __version__
from dtm_core.errors import DTMError
from dtm_core.models.generation import encode_prompts
from dtm_core.compression.intactkv import IntactKV
from dtm_core.measure.diagnostics import confidence_arrays, kl_by_confidence
from dtm_core.measure.freerun import answer_columns, free_run_summary, numeric_correct
from dtm_core.measure.metrics import aggregate, metric_columns, survival_curve
from dtm_core.models.load import max_positions
from dtm_core.compression.pair import Pair
from dtm_core.progress import Meter
from dtm_core.measure.prompts import LETTERS, PromptSet
from dtm_core.measure.divergence import dense_pass
from dtm_core.measure.variants import compare_variants

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD / LLM-KICK normalization)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_correct(output: str, answers: Sequence[str]) -> bool:
    out = normalize(output)
    return any(normalize(a) and normalize(a) in out for a in answers)


def chosen_letter(output: str, n_choices: int) -> str | None:
    """The first choice letter the output names ("B", "B.", "(B)", "Answer: B")."""
    valid = LETTERS[:n_choices]
    m = re.search(rf"\b([{valid}])\b", output.strip())
    return m.group(1) if m else None


def flips(before, after) -> tuple[int, int]:
    """(correct -> wrong, wrong -> correct): prompts whose correctness changed between two paired
    runs ("flips", Dutta et al. 2024, "Accuracy is not all you need")."""
    before = np.asarray(before, dtype=bool)
    after = np.asarray(after, dtype=bool)
    return int((before & ~after).sum()), int((~before & after).sum())


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` vs ``c`` discordant pairs: twice the binomial
    (n = b + c, 1/2) tail at min(b, c), capped at 1 (computed with exact integers)."""
    from fractions import Fraction
    from math import comb

    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(comb(n, i) for i in range(min(b, c) + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0
                     ) -> tuple[float, float, float]:
    """Mean of b - a and the 95 % percentile interval of it over paired resamples of prompts."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = b - a
    if len(diff) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class EvalResult:
    table: pd.DataFrame
    summary: dict
    survival: pd.DataFrame
    config: dict
    rejected: list[tuple[int, str]] = field(default_factory=list)
    stopped: bool = False
    comparison: pd.DataFrame | None = None   # plain vs IntactKV, when IntactKV was on
    prompt_ids: list = field(default_factory=list, repr=False)   # per table row: its tokens
    references: list = field(default_factory=list, repr=False)   # and the dense continuation
    divergent: list = field(default_factory=list, repr=False)    # compressed token at FDT
    tokenizer: object = field(default=None, repr=False)
    # KL by the dense model's top-token probability over every scored position
    # (:func:`dtm_core.measure.diagnostics.kl_by_confidence`)
    confidence: pd.DataFrame | None = None

    def worst(self, k: int = 5, by: str = "fdt") -> pd.DataFrame:
        """The k prompts that diverge first (``by="fdt"``: lowest FDT, then highest KL) or most
        (``by="kl"``: highest mean KL), each with the text around its first divergent token:
        the reference up to it, then the dense token and the compressed model's token there
        (in ⟦ ⟧), then the dense continuation after it."""
        return worst_prompts(self, k, by)

    def to_json(self) -> str:
        extra = {} if self.comparison is None else {
            "intactkv_comparison": json.loads(self.comparison.to_json(orient="records"))}
        if self.confidence is not None:
            extra["kl_by_confidence"] = json.loads(self.confidence.to_json(orient="records"))
        if self.tokenizer is not None and len(self.table):
            extra.update({f"worst_{by}": json.loads(self.worst(WORST_K, by).to_json(
                orient="records")) for by in ("fdt", "kl")})
        return json.dumps({"config": self.config, "summary": self.summary, **extra,
                           "rejected": [{"line": n, "reason": r} for n, r in self.rejected],
                           "rows": json.loads(self.table.to_json(orient="records"))}, indent=2)

    def to_csv(self) -> str:
        """The table as a plain CSV (header first; the configuration is in :meth:`to_json` and
        in the sidecar :meth:`write` puts beside a file)."""
        return self.table.to_csv(index=False)

    def write(self, path) -> list:
        """The table as CSV or Parquet (by suffix) and the configuration in ``NAME.json``."""
        from dtm_core.measure.exports import write_table
        return write_table(self.table, path, self.config)


WORST_K = 10     # worst prompts in the JSON export
WORST_COLUMNS = ["prompt_index", "line", "fdt", "kl_mean", "prompt", "before", "dense_token",
                 "compressed_token", "dense_after"]


def worst_prompts(res: "EvalResult", k: int = 5, by: str = "fdt", context: int = 12
                  ) -> pd.DataFrame:
    """See :meth:`EvalResult.worst`; ``context``: tokens shown before and after."""
    if by not in ("fdt", "kl"):
        raise DTMError(f"Worst prompts are ranked by 'fdt' or 'kl', not '{by}'.")
    t = res.table.reset_index(drop=True)
    order = (t.sort_values(["fdt", "kl_mean"], ascending=[True, False], kind="stable")
             if by == "fdt" else t.sort_values("kl_mean", ascending=False, kind="stable"))
    dec = res.tokenizer.decode
    rows = []
    for i in order.index[:k]:
        ref, f = res.references[i], int(t.fdt[i])
        comp = res.divergent[i] if i < len(res.divergent) else None
        rows.append({
            "prompt_index": int(t.prompt_index[i]), "line": int(t.line[i]), "fdt": f,
            "kl_mean": float(t.kl_mean[i]), "prompt": t.prompt[i],
            "before": dec(ref[max(0, f - context):f], skip_special_tokens=True),
            "dense_token": dec(ref[f:f + 1]) if f < len(ref) else "",
            "compressed_token": dec([comp]) if comp is not None else "",
            "dense_after": dec(ref[f + 1:f + 1 + context], skip_special_tokens=True)})
    return pd.DataFrame(rows, columns=WORST_COLUMNS)


def intact_columns() -> list[str]:
    """Per-prompt columns of the compressed side that the IntactKV run adds as ``*_intactkv``:
    every registered metric's (but the dense perplexity and self-agreement, which IntactKV does
    not change), and the compressed text."""
    same = {"ppl_dense", "dense_self_agree"}
    return [c for c in metric_columns() if c not in same] + ["compressed_text"]


COMPARED = {"fdt_mean": "mean FDT", "fdt_median": "median FDT", "sdt_mean": "SDT",
            "kl_mean": "mean KL", "top1_agree_mean": "top-1 agreement",
            "ppl_change": "perplexity change", "accuracy_compressed": "accuracy (compressed)",
            "flips_correct_to_wrong": "flips correct → wrong (vs dense)",
            "flips_wrong_to_correct": "flips wrong → correct (vs dense)",
            "accuracy_mcnemar_p": "McNemar p (vs dense)"}


def intactkv_comparison(plain: dict, intact: dict) -> pd.DataFrame:
    """metric | plain | IntactKV | delta, for the aggregates both runs have."""
    rows = [{"metric": label, "key": key, "plain": plain[key], "intactkv": intact[key],
             "delta": intact[key] - plain[key]}
            for key, label in COMPARED.items() if key in plain and key in intact]
    return pd.DataFrame(rows, columns=["metric", "key", "plain", "intactkv", "delta"])


def _score(recs, outputs) -> tuple[list, list]:
    """Per-record correctness (NaN without answers) and chosen letters of a list of outputs."""
    correct, letters = [], []
    for r, out in zip(recs, outputs):
        if not r.answers:
            correct.append(np.nan)
            letters.append(None)
        elif r.answer_type == "number":
            letters.append(None)
            correct.append(float(numeric_correct(out, r.answers)))
        elif r.choices:
            letter = chosen_letter(out, len(r.choices))
            letters.append(letter)
            correct.append(float(letter in r.answers))
        else:
            letters.append(None)
            correct.append(float(answer_correct(out, r.answers)))
    return correct, letters


def run_config(pair: Pair, pset: PromptSet, new_tokens: int, chat: bool) -> dict:
    import torch
    import transformers

    return {
        "model": pair.dense.source, "model_description": pair.dense.description,
        "compressed": pair.label,
        "recipe": pair.recipe.to_json() if pair.recipe else None,
        "compressed_model": pair.compressed_source, "new_tokens": new_tokens, "chat": chat,
        "in_place": pair.in_place is not None,
        "prompt_set": pset.name, "prompt_set_sha256": pset.sha256,
        "prompts": len(pset.records), "device": str(pair.dense.device),
        "dtype": str(pair.dense.dtype).replace("torch.", ""),
        "versions": {"dtm_core": __version__, "metric": METRIC_VERSION,
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


def evaluate(pair: Pair, pset: PromptSet, new_tokens: int = 32, *, chat: bool = False,
             batch_size: int = 16, chunk: int = 16,
             progress: Callable[[float, str], None] | None = None,
             stop: threading.Event | None = None, intactkv=None, store=None,
             free_run: bool = False, thinking: bool | None = None) -> EvalResult:
    """Divergence metrics and (for sets with answers) accuracy of both models, chunk by chunk.

    Prompts too long for the model's context are rejected (listed with their line numbers), not
    dropped silently. ``stop`` ends the run after the current chunk with the rows done so far.
    With ``intactkv`` every prompt is also run with the dense pivot KV (same dense references):
    columns ``*_intactkv``, summary keys ``*_intactkv`` and a plain-vs-IntactKV ``comparison``.
    With ``store`` (torchrun's c10d store, :mod:`dtm_core.distributed`) the chunks are shared
    out over the ranks; rank 0 returns the result, exactly the one-process one, the others None.
    """
    ikv = IntactKV.parse(intactkv)
    if ikv is not None:
        pair.require_two_models("IntactKV")
    note = progress or (lambda f, m: None)
    tok = pair.tokenizer
    texts = pset.prompts
    ids = encode_prompts(tok, texts, chat=chat, thinking=thinking)
    limit = max_positions(pair.dense.model)
    rejected = list(pset.rejected)
    keep = []
    for i, s in enumerate(ids):
        if limit is not None and len(s) + new_tokens > limit:
            rejected.append((pset.records[i].line,
                             f"prompt has {len(s)} tokens; with {new_tokens} new tokens it "
                             f"exceeds the model's context of {limit}"))
        else:
            keep.append(i)
    if not keep:
        raise DTMError("Every prompt is too long for the model's context: "
                       + "; ".join(f"line {n}: {r}" for n, r in rejected[:5]))
    want_text = pset.has_answers or pset.numeric
    parts, stopped, done_ids, done_refs, done_div = [], False, [], [], []
    meter = Meter(len(keep), "prompt")
    starts = list(range(0, len(keep), chunk))

    def one(k, dense_side=None):
        """Chunk k: its table, prompt ids, references and first divergent tokens."""
        sel = keep[starts[k]:starts[k] + chunk]
        variants = {"plain": None} if ikv is None else {"plain": None, "intactkv": ikv}
        cmp = compare_variants(pair, [ids[i] for i in sel], new_tokens, variants,
                               batch_size=batch_size, generate_compressed=want_text,
                               free_run=free_run, dense_side=dense_side)
        res = cmp.runs["plain"]
        t = cmp.wide("plain", intact_columns())
        if ikv is not None:
            t["pivots"] = cmp.runs["intactkv"].table["pivots"].to_numpy()
        t["prompt_index"] = sel
        # the compressed model's token where it first leaves the reference (None: it never does)
        div = [int(tm.comp_argmax[f]) if f < len(r) else None
               for tm, f, r in zip(res.tokens, res.table.fdt, res.references)]
        return t, res.prompt_ids, res.references, div, confidence_arrays(res.tokens)

    if store is not None:     # torchrun: chunks over the ranks, merged on rank 0 in order
        from dtm_core.distributed import shared_map

        key = hashlib.sha256(json.dumps([pair.label, pset.sha256 or pset.prompts, new_tokens,
                                         chat, None if ikv is None else ikv.label, free_run,
                                         pset.numeric]
                                        ).encode()).hexdigest()[:16]
        got = shared_map(len(starts), one, f"evaluate-{key}", store,
                         each=lambda k, n: note(n / len(starts), f"{n} chunks done here"))
        if got is None:
            return None
    elif pair.in_place is not None:
        # one model's memory: the dense pass of every chunk, then one in-place compression for
        # the compressed passes (restored when the run ends)
        got = []
        with pair.session():
            sides = []
            for k in range(len(starts)):
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                sel = keep[starts[k]:starts[k] + chunk]
                sides.append(dense_pass(pair, [ids[i] for i in sel], new_tokens,
                                        batch_size=batch_size))
                done = min(starts[k] + chunk, len(keep))
                note(done / len(keep) / 2, f"dense model: {done}/{len(keep)} prompts")
            for k, side in enumerate(sides):
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                got.append(one(k, side))
                done = min(starts[k] + chunk, len(keep))
                note(0.5 + done / len(keep) / 2, "compressed model: " + meter.line(done))
    else:
        got = []
        for k in range(len(starts)):
            if stop is not None and stop.is_set():
                stopped = True
                break
            got.append(one(k))
            done = min(starts[k] + chunk, len(keep))
            note(done / len(keep), meter.line(done))
    conf = []
    for t, p_ids, refs, div, c in got:
        parts.append(t)
        done_ids += p_ids
        done_refs += refs
        done_div += div
        conf.append(c)
    if not parts:
        raise DTMError("Stopped before any prompt was evaluated.")
    table = pd.concat(parts, ignore_index=True)
    recs = [pset.records[i] for i in table.prompt_index]
    table["line"] = [r.line for r in recs]
    table["prompt"] = [r.text() for r in recs]
    table["ppl_change"] = table.ppl_compressed / table.ppl_dense - 1
    if pset.numeric:
        ans = answer_columns(table.dense_text, table.compressed_text)
        for c in ans.columns:
            table[c] = ans[c].to_numpy()
    summary = {**aggregate(table), **free_run_summary(table)}
    if pset.numeric:
        summary["answer_agreement"] = float(table.answer_match.mean())
    sides = (("dense", "dense_text"), ("compressed", "compressed_text"))
    if ikv is not None:
        sides += (("compressed_intactkv", "compressed_text_intactkv"),)
    if want_text:
        for side, col in sides:
            correct, letters = _score(recs, table[col])
            table[f"correct_{side}"] = correct
            if any(r.choices for r in recs):
                table[f"choice_{side}"] = letters
        scored = table.dropna(subset=["correct_dense"])
        summary["accuracy_dense"] = float(scored.correct_dense.mean())
        summary["accuracy_compressed"] = float(scored.correct_compressed.mean())
        d, lo, hi = paired_bootstrap(scored.correct_dense.to_numpy(),
                                     scored.correct_compressed.to_numpy())
        summary.update(accuracy_delta=d, accuracy_delta_ci95_low=lo, accuracy_delta_ci95_high=hi)
        lost, won = flips(scored.correct_dense, scored.correct_compressed)
        summary.update(flips_correct_to_wrong=lost, flips_wrong_to_correct=won,
                       accuracy_mcnemar_p=mcnemar_exact(lost, won))
    comparison = None
    if ikv is not None:
        alt = table.copy()
        for col in intact_columns():
            alt[col] = table[f"{col}_intactkv"]
        intact = aggregate(alt)
        if want_text:
            scored = table.dropna(subset=["correct_dense"])
            intact["accuracy_compressed"] = float(scored.correct_compressed_intactkv.mean())
            d, lo, hi = paired_bootstrap(scored.correct_compressed.to_numpy(),
                                         scored.correct_compressed_intactkv.to_numpy())
            summary.update(accuracy_gain_intactkv=d, accuracy_gain_intactkv_ci95_low=lo,
                           accuracy_gain_intactkv_ci95_high=hi)
            lost, won = flips(scored.correct_dense, scored.correct_compressed_intactkv)
            intact.update(flips_correct_to_wrong=lost, flips_wrong_to_correct=won,
                          accuracy_mcnemar_p=mcnemar_exact(lost, won))
            # IntactKV against the plain compressed model, prompt by prompt
            summary["accuracy_gain_intactkv_mcnemar_p"] = mcnemar_exact(*flips(
                scored.correct_compressed, scored.correct_compressed_intactkv))
        comparison = intactkv_comparison(summary, intact)
        summary.update({f"{k}_intactkv": v for k, v in intact.items() if k in COMPARED})
        summary["ppl_ratio_mean_intactkv"] = intact.get("ppl_ratio_mean")   # the older name
    config = run_config(pair, pset, new_tokens, chat)
    config["intactkv"] = None if ikv is None else ikv.label
    config["free_run"] = free_run
    config["thinking"] = thinking
    return EvalResult(table=table, summary=summary,
                      survival=survival_curve(table.fdt, new_tokens),
                      config=config, rejected=rejected, stopped=stopped, comparison=comparison,
                      prompt_ids=done_ids, references=done_refs, divergent=done_div,
                      tokenizer=tok, confidence=kl_by_confidence(
                          *(np.concatenate([c[j] for c in conf]) for j in range(3))))
