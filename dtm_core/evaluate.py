"""Prompt-set evaluation: divergence metrics plus knowledge-task accuracy (LLM-KICK style).

Accuracy follows LLM-KICK (Jaiswal et al., ICLR 2024): an output is correct when a normalized
reference answer is contained in the normalized output. Multiple-choice items score the first choice
letter the output names. Accuracy needs the compressed model's own greedy output, so sets with
answers also generate it.
"""
from __future__ import annotations

import json
import re
import string
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from . import METRIC_VERSION, __version__
from .divergence import divergence
from .errors import DTMError
from .generation import encode_prompts
from .metrics import aggregate, survival_curve
from .models import max_positions
from .pair import Pair
from .prompts import LETTERS, PromptSet

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

    def to_json(self) -> str:
        return json.dumps({"config": self.config, "summary": self.summary,
                           "rejected": [{"line": n, "reason": r} for n, r in self.rejected],
                           "rows": json.loads(self.table.to_json(orient="records"))}, indent=2)

    def to_csv(self) -> str:
        """The table as CSV, preceded by ``# config: {json}`` (read back with comment='#')."""
        return f"# config: {json.dumps(self.config)}\n" + self.table.to_csv(index=False)


def run_config(pair: Pair, pset: PromptSet, new_tokens: int, chat: bool) -> dict:
    import torch
    import transformers

    return {
        "model": pair.dense.source, "model_description": pair.dense.description,
        "compressed": pair.label,
        "recipe": pair.recipe.to_json() if pair.recipe else None,
        "compressed_model": pair.compressed_source, "new_tokens": new_tokens, "chat": chat,
        "prompt_set": pset.name, "prompt_set_sha256": pset.sha256,
        "prompts": len(pset.records), "device": str(pair.dense.device),
        "dtype": str(pair.dense.dtype).replace("torch.", ""),
        "versions": {"dtm_core": __version__, "metric": METRIC_VERSION,
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


def evaluate(pair: Pair, pset: PromptSet, new_tokens: int = 32, *, chat: bool = False,
             batch_size: int = 16, chunk: int = 16,
             progress: Callable[[float, str], None] | None = None,
             stop: threading.Event | None = None) -> EvalResult:
    """Divergence metrics and (for sets with answers) accuracy of both models, chunk by chunk.

    Prompts too long for the model's context are rejected (listed with their line numbers), not
    dropped silently. ``stop`` ends the run after the current chunk with the rows done so far.
    """
    note = progress or (lambda f, m: None)
    tok = pair.tokenizer
    texts = pset.prompts
    ids = encode_prompts(tok, texts, chat=chat)
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
    want_text = pset.has_answers
    parts, stopped = [], False
    for start in range(0, len(keep), chunk):
        if stop is not None and stop.is_set():
            stopped = True
            break
        sel = keep[start:start + chunk]
        res = divergence(pair, prompt_ids=[ids[i] for i in sel], new_tokens=new_tokens,
                         batch_size=batch_size, generate_compressed=want_text)
        t = res.table.copy()
        t["prompt_index"] = sel
        parts.append(t)
        done = min(start + chunk, len(keep))
        note(done / len(keep), f"{done}/{len(keep)} prompts")
    if not parts:
        raise DTMError("Stopped before any prompt was evaluated.")
    table = pd.concat(parts, ignore_index=True)
    recs = [pset.records[i] for i in table.prompt_index]
    table["line"] = [r.line for r in recs]
    table["prompt"] = [r.text() for r in recs]
    table["ppl_change"] = table.ppl_compressed / table.ppl_dense - 1
    summary = aggregate(table)
    if want_text:
        for side, col in (("dense", "dense_text"), ("compressed", "compressed_text")):
            correct, letters = [], []
            for r, out in zip(recs, table[col]):
                if not r.answers:
                    correct.append(np.nan)
                    letters.append(None)
                elif r.choices:
                    letter = chosen_letter(out, len(r.choices))
                    letters.append(letter)
                    correct.append(float(letter in r.answers))
                else:
                    letters.append(None)
                    correct.append(float(answer_correct(out, r.answers)))
            table[f"correct_{side}"] = correct
            if any(r.choices for r in recs):
                table[f"choice_{side}"] = letters
        scored = table.dropna(subset=["correct_dense"])
        summary["accuracy_dense"] = float(scored.correct_dense.mean())
        summary["accuracy_compressed"] = float(scored.correct_compressed.mean())
        d, lo, hi = paired_bootstrap(scored.correct_dense.to_numpy(),
                                     scored.correct_compressed.to_numpy())
        summary.update(accuracy_delta=d, accuracy_delta_ci95_low=lo, accuracy_delta_ci95_high=hi)
    return EvalResult(table=table, summary=summary,
                      survival=survival_curve(table.fdt, new_tokens),
                      config=run_config(pair, pset, new_tokens, chat), rejected=rejected,
                      stopped=stopped)
