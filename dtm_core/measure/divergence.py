"""Divergent-token metrics of a pair over a prompt set, from one teacher-forced pass per model.

1. The dense model greedily continues every prompt (batched, KV cache): the reference.
2. Prompt + reference go through each model once, teacher-forced, right-padded in batches.
3. Per prompt, :func:`dtm_core.measure.metrics.token_metrics` compares the two logit tensors.

The compressed model's argmax at position t, given the reference prefix, is exactly the token its own
greedy decoding would emit there while the two outputs still agree, so FDT needs no generation of the
compressed model at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd
import torch

from dtm_core.models.generation import (check_lengths, encode_prompts, greedy_generate, head_logits,
                                        hidden_states_only, pad_id_of, plan_batches,
                                        teacher_forced_hidden, think_ids, vocab_size)
from dtm_core.compression.intactkv import IntactKV, teacher_forced_pair
from dtm_core.measure.diagnostics import TOP_K
from dtm_core.measure.freerun import (COLUMNS as FREE_RUN_COLUMNS, THINK_COLUMNS, free_run_row,
                                     free_run_summary)
from dtm_core.measure.freerun import first_difference as first_difference_or_none
from dtm_core.measure.metrics import (ACCEPT_K, TokenMetrics, aggregate, concat, metric_columns,
                                      survival_curve, token_metrics)
from dtm_core.models.load import LoadedModel, eos_ids
from dtm_core.compression.pair import Pair

Progress = Callable[[float, str], None]

# the built-in metrics' columns in their documented order; a registered metric's columns come
# after them, before the texts
COLUMNS = (["prompt_index", "fdt", "sdt", "kl_mean", "kl_max", "top1_agree", "dp_ref_mean",
            "ppl_dense", "ppl_compressed", "ppl_prompt_dense", "ppl_prompt_compressed",
            "n_tokens", "ended_eos", "dense_self_agree"]
           + [f"accept_len_k{k}" for k in ACCEPT_K] + [f"accept_rate_k{k}" for k in ACCEPT_K]
           + [f"top{k}_hit" for k in TOP_K] + [f"top{k}_overlap" for k in TOP_K]
           + ["reverse_kl_mean", "js_mean"]
           + ["prompt", "dense_text", "compressed_text"])


def table_columns() -> list[str]:
    """The per-prompt columns of :func:`divergence`, registered metrics included."""
    extra = [c for c in metric_columns() if c not in COLUMNS]
    return COLUMNS[:-3] + extra + COLUMNS[-3:]


@dataclass
class DivergenceResult:
    table: pd.DataFrame
    summary: dict
    survival: pd.DataFrame
    new_tokens: int
    tokens: list[TokenMetrics] = field(default_factory=list, repr=False)
    references: list[list[int]] = field(default_factory=list, repr=False)
    prompt_ids: list[list[int]] = field(default_factory=list, repr=False)


def reference_continuations(dense: LoadedModel, seqs: Sequence[Sequence[int]], new_tokens: int,
                            batch_size: int = 16) -> list[list[int]]:
    """The dense model's greedy continuations (up to N tokens, ending at the first EOS)."""
    return greedy_generate(dense.model, seqs, new_tokens, pad_id_of(dense.tokenizer),
                           eos_ids(dense), batch_size)


def divergence(pair: Pair, prompts: Sequence[str] | None = None, new_tokens: int = 32, *,
               chat: bool = False, batch_size: int = 16,
               prompt_ids: Sequence[Sequence[int]] | None = None,
               references: Sequence[Sequence[int]] | None = None,
               generate_compressed: bool = False,
               free_run: bool = False,
               thinking: bool | None = None,
               intactkv=None,
               dense_side: "DenseSide | None" = None,
               progress: Progress | None = None) -> DivergenceResult:
    """FDT, SDT, KL, top-1 agreement, Δp and perplexities for each prompt, and their aggregates.

    ``prompt_ids`` / ``references`` may be given to reuse a tokenization or reference generation.
    With ``generate_compressed`` the compressed model's own greedy text is generated too (slower)
    and ``fdt_generated`` records where the two generations first differ. ``free_run`` implies
    it and adds the free-running comparison's columns and summaries
    (:mod:`dtm_core.measure.freerun`: lengths, loops, rejoin position, edit similarity).
    ``intactkv`` (an :class:`~dtm_core.compression.intactkv.IntactKV`) runs the compressed model with the dense
    model's KV for the pivot tokens; the table then has a ``pivots`` column (K per prompt).
    ``dense_side``: the dense pass already run (:func:`dense_pass`), e.g. for every chunk of a
    set before an in-place pair compresses its model once.

    The dense model runs first (references and hidden states of every batch), then the
    compressed one: so an in-place pair (:func:`dtm_core.compression.pair.in_place_pair`) is
    compressed once per run and restored at its end.
    """
    ikv = IntactKV.parse(intactkv)
    generate_compressed = generate_compressed or free_run
    tok = pair.tokenizer
    note = progress or (lambda f, m: None)
    if dense_side is not None:
        prompt_ids, references = dense_side.prompt_ids, dense_side.references
    if prompt_ids is None:
        prompt_ids = encode_prompts(tok, list(prompts or []), chat=chat, thinking=thinking)
    prompt_ids = [list(s) for s in prompt_ids]
    if ikv is not None:
        pair.require_two_models("IntactKV")
    with pair.session():
        if dense_side is None:
            dense_side = dense_pass(pair, prompt_ids, new_tokens, references=references,
                                    batch_size=batch_size, keep_hidden=ikv is None,
                                    progress=progress)
        return _compressed_pass(pair, dense_side, new_tokens, batch_size, generate_compressed,
                                free_run, ikv, note)


@dataclass
class DenseSide:
    """What the compressed pass needs of the dense model: the prompts, the dense greedy
    references, the batches and each batch's final hidden states (B, T, H), on the CPU when the
    model is on a GPU (None when the compressed pass runs both models, IntactKV)."""

    prompt_ids: list[list[int]]
    references: list[list[int]]
    batches: list[list[int]]
    hidden: list


def dense_pass(pair: Pair, prompt_ids: Sequence[Sequence[int]], new_tokens: int, *,
               references: Sequence[Sequence[int]] | None = None, batch_size: int = 16,
               keep_hidden: bool = True, progress: Progress | None = None) -> DenseSide:
    """The dense half of :func:`divergence`: references (unless given) and the teacher-forced
    hidden states, with the pair's model dense (an in-place pair is restored first)."""
    note = progress or (lambda f, m: None)
    model = pair.dense_model()
    prompt_ids = [list(s) for s in prompt_ids]
    check_lengths(model, prompt_ids, new_tokens)
    pad = pad_id_of(pair.tokenizer)
    if references is None:
        note(0.0, "dense model: greedy reference continuations")
        references = reference_continuations(pair.dense, prompt_ids, new_tokens, batch_size)
    references = [list(r) for r in references]
    full = [p + r for p, r in zip(prompt_ids, references)]
    batches = plan_batches([len(s) for s in full], vocab_size(model), batch_size)
    hidden = []
    for idx in batches:
        h = teacher_forced_hidden(model, [full[i] for i in idx], pad) if keep_hidden else None
        hidden.append(h if h is None or h.device.type == "cpu" else h.to("cpu"))
    return DenseSide(prompt_ids=prompt_ids, references=references, batches=batches,
                     hidden=hidden)


def _compressed_pass(pair: Pair, side: DenseSide, new_tokens: int, batch_size: int,
                     generate_compressed: bool, free_run: bool, ikv, note) -> DivergenceResult:
    """The compressed half of :func:`divergence`, with the pair's model compressed."""
    tok = pair.tokenizer
    prompt_ids, references = side.prompt_ids, side.references
    comp = pair.compressed_model()
    pad = pad_id_of(tok)
    eos = eos_ids(pair.dense)
    ks = ikv.pivot_lengths(tok, prompt_ids) if ikv is not None else None
    full = [p + r for p, r in zip(prompt_ids, references)]
    rows: list[dict | None] = [None] * len(full)
    tms: list[TokenMetrics | None] = [None] * len(full)
    done = 0
    rows_at_once = metric_rows(vocab_size(pair.dense.model))
    for idx, d_h in zip(side.batches, side.hidden):
        seqs = [full[i] for i in idx]
        if d_h is None or ks is not None:
            d_h, c_h = pair_hidden(pair, seqs, pad, None if ks is None else [ks[i] for i in idx],
                                   ikv)
        else:
            c_h = teacher_forced_hidden(comp, seqs, pad)
            d_h = d_h.to(c_h.device)
        for j, i in enumerate(idx):
            P, L = len(prompt_ids[i]), len(references[i])
            chunks = _PairChunks(pair, d_h[j], c_h[j], None if ks is None else ks[i])
            ref = torch.tensor(references[i], dtype=torch.long)
            parts = []
            for a in range(0, L, POSITION_CHUNK):
                d, c = chunks(P - 1 + a, P - 1 + min(a + POSITION_CHUNK, L))
                # the metrics' float64 work a few rows at a time (each row is on its own, so
                # the numbers are those of the whole chunk)
                parts += [token_metrics(d[r:r + rows_at_once], c[r:r + rows_at_once],
                                        ref[a + r:a + min(r + rows_at_once, len(d))],
                                        new_tokens)
                          for r in range(0, len(d), rows_at_once)]
                del d, c
            tm = parts[0] if len(parts) == 1 else concat(parts, new_tokens)
            tms[i] = tm
            tgt = prompt_ids[i][1:]
            row = {"prompt_index": i, **tm.summary(),
                   **dict(zip(("ppl_prompt_dense", "ppl_prompt_compressed"),
                              chunks.perplexities(tgt))),
                   "ended_eos": bool(L and references[i][-1] in eos)}
            if ks is not None:
                row["pivots"] = ks[i]
            rows[i] = row
        del d_h, c_h
        done += len(idx)
        note(done / len(full), f"teacher-forced {done}/{len(full)} prompts")
    comp_gen = None
    if generate_compressed:
        note(1.0, "compressed model: greedy generation")
        comp_gen = greedy_generate(comp, prompt_ids, new_tokens, pad, eos, batch_size,
                                   intact=None if ikv is None else (pair.dense.model, ks, ikv))
    marks = think_ids(tok) if free_run else None
    for i, row in enumerate(rows):
        ref = references[i]
        row["prompt"] = tok.decode(prompt_ids[i], skip_special_tokens=True)
        row["dense_text"] = tok.decode(ref, skip_special_tokens=True)
        if comp_gen is not None:
            gen = comp_gen[i]
            row["compressed_text"] = tok.decode(gen, skip_special_tokens=True)
            row["fdt_generated"] = first_difference(ref, gen, new_tokens)
            if free_run:
                row.update(free_run_row(ref, gen, eos, None if marks is None
                                        else (prompt_ids[i], marks)))
        else:
            # Up to and including the first divergent token, the compressed model's greedy output
            # is known exactly from teacher forcing; after it, it would need generating.
            f = row["fdt"]
            own = ref if f >= len(ref) else ref[:f] + [int(tms[i].comp_argmax[f])]
            row["compressed_text"] = tok.decode(own, skip_special_tokens=True)
    table = pd.DataFrame(rows)
    cols = table_columns() + (["fdt_generated"] if comp_gen is not None else []) \
        + (FREE_RUN_COLUMNS if free_run else []) \
        + (THINK_COLUMNS if marks is not None else []) + (["pivots"] if ks is not None else [])
    table = table[[c for c in cols if c in table.columns]]   # a built-in metric unregistered
    return DivergenceResult(table=table, summary={**aggregate(table), **free_run_summary(table)},
                            survival=survival_curve(table["fdt"], new_tokens),
                            new_tokens=new_tokens, tokens=tms, references=references,
                            prompt_ids=prompt_ids)


POSITION_CHUNK = 256     # positions whose logits a teacher-forced pass holds at once, per model
METRIC_BYTES = 4 << 20   # one float64 (positions x vocabulary) temporary of the metrics, at most


def metric_rows(vocab: int) -> int:
    """Positions the metrics work on at once: their float64 temporaries stay near METRIC_BYTES
    each (a handful of them live together), whatever the vocabulary."""
    return max(8, min(POSITION_CHUNK, METRIC_BYTES // (8 * max(1, vocab))))


def pair_hidden(pair: Pair, seqs, pad: int, ks=None, ikv=None):
    """Both models' final hidden states (B, T, H) of right-padded sequences, with IntactKV's
    dense pivot K/V on the compressed side when ``ks`` are given (no logits formed)."""
    if ks is None:
        return (teacher_forced_hidden(pair.dense.model, seqs, pad),
                teacher_forced_hidden(pair.compressed, seqs, pad))
    calls: list = []
    with hidden_states_only([pair.dense.model, pair.compressed], calls):
        teacher_forced_pair(pair.dense.model, pair.compressed, seqs, pad, ks, ikv)
    return calls[0], calls[1].to(calls[0].device)


class _PairChunks:
    """One sequence's logits of both models a chunk of positions at a time, from their hidden
    states; at IntactKV's pivot positions (< k) the compressed side's are the dense model's."""

    def __init__(self, pair: Pair, d_h, c_h, k: int | None):
        self.pair, self.d_h, self.c_h, self.k = pair, d_h, c_h, k

    def __call__(self, a: int, b: int):
        with self.pair.dense_head():
            d = head_logits(self.pair.dense.model, self.d_h[a:b])
        c = head_logits(self.pair.compressed, self.c_h[a:b]).to(d.device)
        if self.k is not None and a < self.k:
            c[:self.k - a] = d[:self.k - a]
        return d, c

    def perplexities(self, targets: Sequence[int]) -> tuple[float, float]:
        """Both models' perplexities of the prompt (positions 0..P-2 predict its tokens 1..)."""
        if not targets:
            return float("nan"), float("nan")
        nll = [0.0, 0.0]
        tgt = torch.tensor(list(targets), dtype=torch.long)
        step = metric_rows(vocab_size(self.pair.dense.model))
        for a in range(0, len(tgt), POSITION_CHUNK):
            t = tgt[a:a + POSITION_CHUNK]
            for side, logits in enumerate(self(a, a + len(t))):
                # float64 log-softmax a few rows at a time; the chunk's values summed at once
                got = [torch.log_softmax(logits[r:r + step].double(), -1).gather(
                    -1, t[r:r + step].to(logits.device)[:, None]) for r in range(0, len(t), step)]
                nll[side] -= float(torch.cat(got).sum())
        return tuple(float(torch.exp(torch.tensor(x / len(tgt), dtype=torch.float64)))
                     for x in nll)


def first_difference(a: Sequence[int], b: Sequence[int], n: int) -> int:
    """Index of the first differing token of two generations; n when they are identical."""
    f = first_difference_or_none(a, b)
    return n if f is None else f