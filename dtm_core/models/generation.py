"""Tokenizing prompts, greedy decoding with a KV cache, and teacher-forced forward passes.

Greedy decoding pads on the left and passes explicit position ids (transformers' forward does not
derive them from the attention mask), so a padded row computes what it would alone. Teacher forcing
pads on the right, where causal attention keeps the padding out of every real position.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from dtm_core.errors import DTMError
from dtm_core.models.load import max_positions


def takes_thinking(tokenizer) -> bool:
    """The tokenizer's chat template reads ``enable_thinking`` (Qwen3 and its kin)."""
    return "enable_thinking" in str(getattr(tokenizer, "chat_template", None) or "")


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = False,
                   thinking: bool | None = None) -> list[list[int]]:
    """Token ids of each prompt; with ``chat`` through the tokenizer's chat template, which gets
    ``enable_thinking=thinking`` when it takes it (:func:`takes_thinking`; None: its default)."""
    out = []
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DTMError("This tokenizer has no chat template; turn the chat switch off.")
    extra = {"enable_thinking": bool(thinking)} \
        if chat and thinking is not None and takes_thinking(tokenizer) else {}
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DTMError(f"Prompt {i} is empty.")
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                 add_generation_prompt=True, tokenize=False,
                                                 **extra)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(p).input_ids
        if not ids:
            raise DTMError(f"Prompt {i} tokenizes to nothing.")
        out.append(list(ids))
    return out


def pad_id_of(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS, else 0."""
    pid = tokenizer.pad_token_id
    return int(pid if pid is not None else (tokenizer.eos_token_id or 0))


def check_lengths(model, seqs: Sequence[Sequence[int]], new_tokens: int) -> None:
    limit = max_positions(model)
    if limit is None:
        return
    for i, s in enumerate(seqs):
        if len(s) + new_tokens > limit:
            raise DTMError(f"Prompt {i} has {len(s)} tokens; with {new_tokens} new tokens it exceeds "
                           f"the model's context of {limit} tokens.")


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


class GreedyDecoder:
    """Step-by-step greedy decoding of a batch with a KV cache (left padding, explicit positions)."""

    def __init__(self, model, seqs: Sequence[Sequence[int]], pad_id: int, eos: set[int],
                 intact: tuple | None = None):
        self.model = model
        # (dense model, K per row, setting): the setting's ``prefill(decoder, dense, ks)`` runs the
        # prefill instead (IntactKV: the dense model's KV for the pivot tokens)
        self.intact = intact
        self.eos = set(eos)
        dev = model_device(model)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        self.ids, self.mask = ids.to(dev), mask.to(dev)
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = None
        self.done = torch.zeros(len(seqs), dtype=torch.bool)
        self.prompt_logits: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self, ids, pos) -> torch.Tensor:
        """Run ``ids`` at positions ``pos`` on the current cache; the last position's logits."""
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def prefill(self) -> torch.Tensor:
        """Logits of the next token after each prompt, shape (B, V)."""
        if self.intact is not None:
            dense_model, ks, setting = self.intact
            return setting.prefill(self, dense_model, ks)
        return self.forward(self.ids, self.pos)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row and return the next logits."""
        tokens = tokens.to(self.ids.device).view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.pos = self.pos[:, -1:] + 1
        return self.forward(tokens, self.pos)

    def finish(self, tokens: torch.Tensor) -> None:
        for i, t in enumerate(tokens.tolist()):
            if t in self.eos:
                self.done[i] = True


def greedy_generate(model, seqs: Sequence[Sequence[int]], new_tokens: int, pad_id: int,
                    eos: set[int], batch_size: int = 16, intact: tuple | None = None
                    ) -> list[list[int]]:
    """Greedy continuations of up to ``new_tokens`` tokens, each ending at its first EOS (kept).

    ``intact`` = (dense model, K per sequence, IntactKV) decodes with the dense pivot KV (any
    setting object with ``prefill(decoder, dense_model, ks)``).
    """
    results: list[list[int]] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        part = None
        if intact is not None:
            part = (intact[0], list(intact[1][start:start + batch_size]), intact[2])
        dec = GreedyDecoder(model, chunk, pad_id, eos, part)
        outs: list[list[int]] = [[] for _ in chunk]
        logits = dec.prefill()
        for step in range(new_tokens):
            tok = logits.argmax(-1).cpu()
            for i, t in enumerate(tok.tolist()):
                if not dec.done[i]:
                    outs[i].append(t)
            dec.finish(tok)
            if bool(dec.done.all()) or step == new_tokens - 1:
                break
            logits = dec.step(torch.where(dec.done, torch.tensor(pad_id), tok))
        results.extend(outs)
    return results


def plan_batches(lengths: Sequence[int], vocab: int, max_batch: int,
                 budget: int = 250_000_000) -> list[list[int]]:
    """Indices grouped by length so a batch's logits (B x T x V floats) stay under ``budget``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        cand = batch + [i]
        if batch and (len(cand) > max_batch or len(cand) * lengths[i] * vocab > budget):
            batches.append(batch)
            cand = [i]
        batch = cand
    if batch:
        batches.append(batch)
    return batches


def vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def right_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """(B, max length) token ids, each row padded on the right with ``pad_id``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s)
    return ids


@torch.no_grad()
def teacher_forced(model, seqs: Sequence[Sequence[int]], pad_id: int, **kwargs):
    """The model's output on right-padded sequences (``use_cache`` off unless given); row i is
    valid for its first len(seqs[i]) positions."""
    # No attention mask: causal attention already keeps right padding out of real positions.
    kwargs.setdefault("use_cache", False)
    return model(input_ids=right_padded(seqs, pad_id).to(model_device(model)), **kwargs)


def teacher_forced_logits(model, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits (B, T, V) of right-padded sequences; row i is valid for its first len(seqs[i])."""
    return teacher_forced(model, seqs, pad_id).logits


@contextmanager
def hidden_states_only(models, calls: list):
    """While in the block the models' LM heads are skipped: each call's final hidden states
    (B, T, H; after the tail, before the head) are appended to ``calls`` in call order and
    the logits come out with no positions. Long teacher-forced passes then apply the head a
    chunk of positions at a time (:func:`head_logits`) instead of holding T x V logits."""
    heads = {id(m.get_output_embeddings()): m.get_output_embeddings() for m in models}

    def pre(mod, args):
        calls.append(args[0])
        return (args[0][..., :0, :], *args[1:])
    hooks = [h.register_forward_pre_hook(pre) for h in heads.values()]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def teacher_forced_hidden(model, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Final hidden states (B, T, H) of right-padded sequences (no logits formed)."""
    calls: list = []
    with hidden_states_only([model], calls):
        teacher_forced(model, seqs, pad_id)
    return calls[-1]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from final hidden states: its head, then the family's
    post-processing (Gemma's soft-capping), as its own forward computes them."""
    from dtm_core.models.families import family_of

    return family_of(model).logits(model, hidden)


THINK_MARKS = ("<think>", "</think>")


def think_ids(tokenizer) -> tuple[int, int] | None:
    """The ids of ``<think>`` and ``</think>`` when the vocabulary has each as one token (a
    template that marks thinking spans), else None."""
    try:
        ids = tokenizer.convert_tokens_to_ids(list(THINK_MARKS))
    except Exception:       # tokenizers without the method
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or any(t is None or t == unk for t in ids):
        return None
    return int(ids[0]), int(ids[1])
