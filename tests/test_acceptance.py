"""Speculative acceptance (the compressed model drafting for the dense one under greedy
verification) from the teacher-forced agreement, against a real draft-and-verify loop run with the
two models, on every family, with the dense model's EOS inside a draft block."""
import pytest
import torch

from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.measure.metrics import ACCEPT_K, acceptance
from test_families import FAMILIES, make, prompts


def draft_and_verify(dense, comp, prompt, n, k, eos):
    """A real loop: the compressed model drafts min(k, N - done) tokens greedily (stopping after
    an EOS), the dense model scores prompt + output + draft in one pass, the leading draft tokens
    equal to its greedy tokens are accepted (an accepted EOS ends the output) and it adds its own
    next token. Returns the output, accepted tokens, steps and proposed tokens (min(k, tokens
    left of the final output) per step, the rule's count)."""
    out, starts, accepted = [], [], 0
    with torch.no_grad():
        while len(out) < n and not (out and out[-1] in eos):
            starts.append(len(out))
            draft = []
            for _ in range(min(k, n - len(out))):
                tok = int(comp(torch.tensor([prompt + out + draft])).logits[0, -1].argmax())
                draft.append(tok)
                if tok in eos:
                    break
            logits = dense(torch.tensor([prompt + out + draft])).logits[0]
            greedy = logits[len(prompt) + len(out) - 1:].argmax(-1).tolist()
            a = 0
            while a < len(draft) and draft[a] == greedy[a]:
                a += 1
                if draft[a - 1] in eos:
                    break
            out += greedy[:a]
            accepted += a
            if len(out) < n and not (out and out[-1] in eos):
                out.append(greedy[a])
    proposed = sum(min(k, len(out) - s) for s in starts)
    return out, accepted, len(starts), proposed


def test_the_rule_on_hand_made_agreements():
    # K=4 over agree = 1 1 0 1 1 1: accept 2 (+ the verifier's token), then 3 of 3 left
    assert acceptance([True, True, False, True, True, True], 4) == (5, 7, 2)
    assert acceptance([False] * 5, 2) == (0, 9, 5)       # every step: 0 accepted, 1 token
    assert acceptance([True] * 8, 16) == (8, 8, 1)      # one step drafts everything
    assert acceptance([], 4) == (0, 0, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_acceptance_equals_a_real_draft_and_verify_loop(family):
    lm = make(family)
    pair = make_pair(lm, Recipe.single("int4", "*"))
    ps = prompts(3, seed=7, lo=3, hi=9)
    n = 12
    eos = {2}
    # the dense continuation of the second prompt ends at an EOS inside a draft block
    first, *_ = draft_and_verify(lm.model, lm.model, ps[1], n, 1, eos)
    lm.tokenizer.eos_token_id = first[5]
    eos = {2, first[5]}
    res = divergence(pair, prompt_ids=ps, new_tokens=n)
    rates = []
    for i, p in enumerate(ps):
        row = res.table.iloc[i]
        for k in ACCEPT_K:
            out, acc, steps, prop = draft_and_verify(lm.model, pair.compressed, p, n, k, eos)
            assert row[f"accept_len_k{k}"] == pytest.approx(acc / steps), (i, k)
            assert row[f"accept_rate_k{k}"] == pytest.approx(acc / prop), (i, k)
            rates.append(acc / prop)
        assert len(out) == row.n_tokens                     # the dense continuation itself
        if i == 1:
            assert len(out) <= 6 and out[-1] in eos
    assert max(rates) > 0             # the draft is right some of the time
    assert res.summary["accept_len_k4_mean"] == pytest.approx(
        res.table.accept_len_k4.mean())
