"""Side-by-side streaming: both models decode greedily in lockstep, one token per step, KV cached.

The compressed model runs a batch of two rows sharing its weights: row 0 generates freely (what the
user sees on the right), row 1 is fed the dense model's tokens (teacher forcing, live). Row 1 gives the
share of divergent tokens, KL and the probability of the dense token at every position, the same
quantities the batch engine computes, without a second pass.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from dtm_core.models.generation import GreedyDecoder, check_lengths, encode_prompts, pad_id_of
from dtm_core.compression.intactkv import IntactKV
from dtm_core.measure.metrics import METRICS, primitives, run_metrics
from dtm_core.models.load import eos_ids
from dtm_core.compression.pair import Pair

TOP_K = 5


@dataclass
class Step:
    """What both models did at one continuation position."""

    pos: int
    dense_token: int | None          # None once the dense output has ended
    comp_token: int | None           # the compressed model's free-running token
    forced_token: int | None         # compressed argmax given the dense prefix
    dense_top: list[tuple[int, float]]
    comp_top: list[tuple[int, float]]      # compressed, on its own prefix
    forced_top: list[tuple[int, float]]    # compressed, on the dense prefix
    kl: float | None                 # KL(dense || compressed) on the dense prefix
    p_dense: float | None            # probability each model gives the dense token
    p_comp: float | None
    # every registered metric's per-token value on the dense prefix (a float, or a list for a
    # metric with several values per token); empty once the dense output has ended
    metrics: dict = field(default_factory=dict)


@dataclass
class StreamState:
    prompt_ids: list[int]
    new_tokens: int
    steps: list[Step] = field(default_factory=list)
    dense_done: bool = False
    comp_done: bool = False
    stopped: bool = False
    pivots: int = 0                  # IntactKV: tokens whose KV came from the dense model

    @property
    def dense_tokens(self) -> list[int]:
        return [s.dense_token for s in self.steps if s.dense_token is not None]

    @property
    def comp_tokens(self) -> list[int]:
        return [s.comp_token for s in self.steps if s.comp_token is not None]

    @property
    def fdt(self) -> int | None:
        """First position where the forced argmax leaves the dense token; N if none by the end,
        None while it is not known yet."""
        for s in self.steps:
            if s.dense_token is not None and s.forced_token != s.dense_token:
                return s.pos
        return self.new_tokens if self.dense_done else None

    @property
    def sdt(self) -> float:
        scored = [s for s in self.steps if s.dense_token is not None]
        if not scored:
            return 0.0
        return sum(s.forced_token != s.dense_token for s in scored) / len(scored)


def _top(logp: torch.Tensor) -> list[tuple[int, float]]:
    v, i = torch.topk(logp, TOP_K)
    return [(int(a), float(b)) for a, b in zip(i.tolist(), v.exp().tolist())]


@torch.no_grad()
def stream_pair(pair: Pair, prompt: str | None = None, new_tokens: int = 48, *, chat: bool = False,
                prompt_ids: list[int] | None = None,
                stop: threading.Event | None = None, intactkv=None,
                thinking: bool | None = None) -> Iterator[StreamState]:
    """Yield the growing state after every lockstep step (and once at the end).

    ``thinking`` goes to chat templates that take ``enable_thinking`` (None: their default).

    With ``intactkv`` both compressed rows start from the dense model's KV for the pivot tokens.
    """
    ikv = IntactKV.parse(intactkv)
    tok = pair.tokenizer
    ids = list(prompt_ids) if prompt_ids is not None else encode_prompts(tok, [prompt], chat, thinking)[0]
    check_lengths(pair.dense.model, [ids], new_tokens)
    pad, eos = pad_id_of(tok), eos_ids(pair.dense)
    state = StreamState(prompt_ids=ids, new_tokens=new_tokens)
    intact = None
    if ikv is not None:
        k = ikv.pivot_lengths(tok, [ids])[0]
        state.pivots = k
        intact = (pair.dense.model, [k, k], ikv)
    dense = GreedyDecoder(pair.dense.model, [ids], pad, eos)
    comp = GreedyDecoder(pair.compressed, [ids, ids], pad, eos, intact)
    ld, lc = dense.prefill(), comp.prefill()
    for t in range(new_tokens):
        if stop is not None and stop.is_set():
            state.stopped = True
            break
        d_logp = torch.log_softmax(ld[0].double(), -1)   # float64 as in token_metrics
        c_logp = torch.log_softmax(lc[0].double(), -1)
        f_logp = torch.log_softmax(lc[1].double(), -1)
        d_tok = None if state.dense_done else int(ld[0].argmax())
        c_tok = None if state.comp_done else int(lc[0].argmax())
        f_tok = None if state.dense_done else int(lc[1].argmax())
        step = Step(pos=t, dense_token=d_tok, comp_token=c_tok, forced_token=f_tok,
                    dense_top=_top(d_logp) if d_tok is not None else [],
                    comp_top=_top(c_logp) if c_tok is not None else [],
                    forced_top=_top(f_logp) if f_tok is not None else [],
                    kl=None, p_dense=None, p_comp=None)
        if d_tok is not None:
            # the same primitives and metric definitions as divergence, for one position
            tm = primitives(d_logp[None], f_logp[None], torch.tensor([d_tok]), new_tokens,
                            ld[0:1].argmax(-1), lc[1:2].argmax(-1))
            run_metrics(tm, distributions=True)
            run_metrics(tm, distributions=False)
            step.kl = float(tm.kl[0])
            step.p_dense, step.p_comp = float(tm.p_dense_ref[0]), float(tm.p_comp_ref[0])
            step.metrics = {name: tm.values[name][0].tolist() for name in METRICS}
        state.steps.append(step)
        state.dense_done = state.dense_done or d_tok in eos
        state.comp_done = state.comp_done or c_tok in eos
        if t == new_tokens - 1:
            state.dense_done = state.comp_done = True
        yield state
        if state.dense_done and state.comp_done:
            break
        nd = pad if d_tok is None or state.dense_done else d_tok
        if not state.dense_done:
            ld = dense.step(torch.tensor([nd]))
        lc = comp.step(torch.tensor([pad if c_tok is None else c_tok, nd]))
    if state.stopped or not state.steps:
        yield state
