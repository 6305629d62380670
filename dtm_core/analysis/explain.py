"""Why a token diverged: the logit lens across the pair and component patching at one position.

At a chosen position t of a prompt's dense continuation (default: its first divergent token),
both models read the same tokens (the prompt and the dense continuation up to t) and:

- **logit lens**: every decoder layer's residual stream at the position, through the family's
  tail (final norm) and LM head with its logit post-processing, in both models: rank and
  log-probability of the dense token and of the compressed model's token, and KL(dense lens ||
  compressed lens) per layer; the last layer's lens is each model's own logits;
- **component patching** (activation patching, as TransformerLens does it, for a pair): the
  compressed model runs with one component's output replaced by the dense model's output of that
  component, at every position up to t (``scope="all"``) or at t only (``scope="position"``,
  the direct effect), and the restored log-probability of the dense token, whether the argmax
  returns to it and the KL to the dense distribution at t are recorded. The reverse puts one
  compressed component's output into the dense model. A fused weight's slice patches its output
  rows; experts of a 3-D parameter, which have no output of their own, are patched by their
  weights (the dense expert matrices in the compressed model, or the reverse).

Patching reuses the sweep's idea: each model's decoder-layer inputs are recorded once, and a
patched run starts at the patched layer (the layers before it are untouched), so a full map costs
about what a one-prompt sweep costs.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd
import torch

from dtm_core.models import hooks
from dtm_core.models.components import all_components, resolve
from dtm_core.measure.divergence import reference_continuations
from dtm_core.errors import DTMError
from dtm_core.models.families import family_of
from dtm_core.models.generation import check_lengths, model_device
from dtm_core.compression.kvcache import CacheComponent, cache_hooks, recorder, resolve_cache
from dtm_core.compression.pair import Pair

PATCH_COLUMNS = ["component", "layer", "kind", "restored_logp", "restores_argmax",
                 "kl_after_patch", "restored_share", "params", "order", "patched_by"]
REVERSE_COLUMNS = ["reverse_logp_compressed_token", "reverse_flips_argmax", "reverse_kl"]
LENS_COLUMNS = ["layer", "dense_logp_dense_token", "dense_logp_compressed_token",
                "compressed_logp_dense_token", "compressed_logp_compressed_token",
                "dense_rank_dense_token", "dense_rank_compressed_token",
                "compressed_rank_dense_token", "compressed_rank_compressed_token", "kl"]


@dataclass
class Explanation:
    """The lens and the patching map at one position of one prompt."""

    prompt_ids: list[int]
    reference: list[int]          # the dense model's greedy continuation
    position: int                 # index into the continuation
    dense_token: int
    compressed_token: int
    logp_dense: float             # the dense model's log p(dense token) at the position
    logp_compressed: float        # the compressed model's log p(dense token)
    kl: float                     # KL(dense || compressed) at the position
    lens: pd.DataFrame
    patching: pd.DataFrame
    scope: str = "all"
    granularity: str = "component"
    tokens: dict = field(default_factory=dict)   # decoded texts around the position

    @property
    def lens_flip_layer(self) -> int | None:
        """The first layer where the compressed model's lens prefers its own token while the
        dense model's lens prefers the dense token (the last layer at the latest; None when the
        tokens agree). Before the first compressed component the two lenses are the same, so
        they cannot part there."""
        if self.dense_token == self.compressed_token:
            return None
        lens = self.lens
        hit = lens[(lens.compressed_logp_compressed_token > lens.compressed_logp_dense_token)
                   & (lens.dense_logp_dense_token > lens.dense_logp_compressed_token)]
        return None if hit.empty else int(hit.layer.iloc[0])

    def ranked(self) -> pd.DataFrame:
        """The patching map, the components whose patch brings the distribution at the position
        closest to the dense one (KL after the patch) first."""
        # exact ties go to the earlier module (a patch right after the cause restores as fully
        # as the cause), then to the smaller unit (a slice before its fused weight, one expert
        # before all)
        order = self.patching.assign(_k=self.patching.kl_after_patch.round(12))
        return order.sort_values(["_k", "restored_share", "order", "params"],
                                 ascending=[True, False, True, True]
                                 ).drop(columns="_k").reset_index(drop=True)

    def ranking(self, k: int = 5) -> str:
        """"the divergence at position t is carried by: 12.down (restores 87 % ...), ..." """
        top = self.ranked().head(k)
        if top.empty:
            return "Nothing was patched."
        parts = []
        for i, r in enumerate(top.itertuples()):
            share = f"{r.restored_share:.0%}" if r.restored_share == r.restored_share else "n/a"
            back = ", argmax back" if r.restores_argmax else ""
            parts.append(f"{r.component} (restores {share} of the dense token's "
                         f"log-probability{back})" if i == 0 else f"{r.component} ({share}{back})")
        what = "token" if self.dense_token != self.compressed_token else "position"
        return (f"The divergence at {what} {self.position} ({self.tokens.get('dense', '')!r} -> "
                f"{self.tokens.get('compressed', '')!r}) is carried by: " + ", ".join(parts) + ".")

    def to_json(self) -> dict:
        return {"position": self.position, "dense_token": self.dense_token,
                "compressed_token": self.compressed_token, "tokens": self.tokens,
                "logp_dense": self.logp_dense, "logp_compressed": self.logp_compressed,
                "kl": self.kl, "scope": self.scope, "granularity": self.granularity,
                "lens_flip_layer": self.lens_flip_layer, "ranking": self.ranking(),
                "prompt_ids": self.prompt_ids, "reference": self.reference,
                "lens": self.lens.to_dict("records"),
                "patching": self.ranked().to_dict("records")}


# ---------------------------------------------------------------------------------------------
# One recorded pass


@dataclass
class _Pass:
    layer_inputs: list            # per layer: (args, kwargs) of its call
    layer_outputs: list           # per layer: (T, H) hidden states after it
    module_outputs: dict          # module path -> its full output (1, T, out)
    logits: torch.Tensor          # (V,) at the position, float64 log-softmax
    call_order: dict = field(default_factory=dict)   # module path -> when it first ran
    cache_entries: dict = field(default_factory=dict)   # cache name -> what it stored


@torch.no_grad()
def _record(model, seq: list[int], paths: list[str], caches: Sequence = ()) -> _Pass:
    layers = family_of(model).decoder_layers(model)
    rec: list = [None] * len(layers)
    mods = {p: model.get_submodule(p) for p in paths}
    outs: dict = {}

    order: dict = {}

    def keep(i, module, args, out, _names=list(mods)):
        # the whole output: a router returns (logits, weights, chosen experts)
        outs[_names[i]] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out) \
            if isinstance(out, tuple) else out.detach()
        order.setdefault(_names[i], len(order))
    x = torch.tensor([seq], device=model_device(model))
    entries: dict = {}
    with hooks.recording(layers, rec), hooks.outputs(layers, lambda h: h[0].detach()) as lo, \
            hooks.attached(list(mods.values()), keep), cache_hooks(list(caches),
                                                                   recorder(entries)):
        model.base_model(input_ids=x, use_cache=False)     # the head is applied at the position
    return _Pass(rec, list(lo), outs, None, order, entries)


def _lens_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of hidden states (..., H) through the tail and the LM head."""
    fam = family_of(model)
    h = hidden[None, None, :] if hidden.dim() == 1 else hidden
    for mod in fam.tail_modules(model):
        h = mod(h)
    return torch.log_softmax(fam.logits(model, h).double(), -1).reshape(-1)


def _kl(d: torch.Tensor, c: torch.Tensor) -> float:
    p = d.exp()
    return float(torch.where(p > 0, p * (d - c), torch.zeros_like(d)).sum().clamp(min=0))


def _rank(lp: torch.Tensor, tok: int) -> int:
    return int((lp > lp[tok]).sum()) + 1


# ---------------------------------------------------------------------------------------------
# Patching


@dataclass
class _Target:
    """What one row of the patching map patches: components of one layer (all of a layer's for
    the whole-layer granularity)."""

    name: str
    layer: int
    kind: str
    comps: list                   # (component in the patched model, component in the source)


def _patch_tensor(h: torch.Tensor, src: torch.Tensor, position: int, scope: str, cols,
                  tokens: int) -> torch.Tensor:
    """``h`` with the source's values at every position (``scope="all"``) or at ``position``
    only, in the output columns ``cols`` (a fused weight's slice) or all of them. Positions are
    the second dimension of (1, T, ...) outputs or the first of flattened (T, ...) ones."""
    src = src.to(h.dtype)
    cols = cols if cols is not None else slice(None)
    if scope == "all":
        new = h.clone()
        new[..., cols] = src[..., cols]
        return new
    new = h.clone()
    if h.dim() >= 2 and h.shape[0] == 1 and h.shape[1] == tokens:
        new[:, position, cols] = src[:, position, cols]
    elif h.shape[0] == tokens:
        new[position, cols] = src[position, cols]
    else:
        new[..., cols] = src[..., cols]
    return new


def _patched_logits(model, run: _Pass, source: _Pass, target: _Target, position: int,
                    scope: str) -> torch.Tensor:
    """``model`` from the target's layer on, with its components' outputs replaced by those of
    the source run (or their weights, for experts); log-probabilities at the position."""
    layers = family_of(model).decoder_layers(model)
    swaps, out_mods, caches = [], [], {}
    for mine, theirs in target.comps:
        if isinstance(mine, CacheComponent):     # the source's stored entries instead
            caches[mine.name] = (mine, source.cache_entries[theirs.name])
        elif mine.experts is not None:    # the source's matrices of these experts, the rest kept
            cur = getattr(mine.module, mine.param)
            new = cur.full() if hasattr(cur, "full") else cur.detach().clone()
            src = getattr(theirs.module, theirs.param)
            for e in mine.experts:
                new[e] = src[e]
            swaps.append((mine.module, mine.param, torch.nn.Parameter(new, requires_grad=False)))
        else:
            out_mods.append((mine, theirs))

    def patch(i, module, args, out):
        mine, theirs = out_mods[i]
        src = source.module_outputs[theirs.path]
        if isinstance(out, tuple):     # e.g. a router: every tensor of its output
            return tuple(_patch_tensor(o, so, position, scope, None, len(seq_t))
                         if isinstance(o, torch.Tensor) else o for o, so in zip(out, src))
        return _patch_tensor(out, src, position, scope, mine.rows, len(seq_t))
    def entries(comp, own):
        src = caches[comp.name][1]

        def fn(x):      # every position's entry, or the chosen position's (dim -2)
            if scope == "all":
                return src.to(x.dtype)
            new = (own(x) if own is not None else x).clone()
            new[..., position, :] = src[..., position, :].to(x.dtype)
            return new
        return fn
    seq_t = range(run.layer_outputs[0].shape[0])     # the sequence's positions
    saved = [(m, p, getattr(m, p)) for m, p, _ in swaps]
    try:
        for m, p, w in swaps:
            setattr(m, p, w)
        with hooks.attached([c.module for c, _ in out_mods], patch), \
                cache_hooks([c for c, _ in caches.values()], entries):
            args, kwargs = run.layer_inputs[target.layer]
            hidden = args[0] if args else kwargs["hidden_states"]
            for i in range(target.layer, len(layers)):
                args, kwargs = run.layer_inputs[i]
                hidden = hooks.run_layer(layers[i], hidden, args, kwargs)
    finally:
        for m, p, w in saved:
            setattr(m, p, w)
    return _lens_logits(model, hidden[0, position])


def _is_cache(name: str) -> bool:
    return name.strip().rpartition(".")[2].lower() in ("kcache", "vcache", "kv")


def _components(model, selection: str, extra: Sequence[str]) -> list:
    """The components a selection names (``*``: every primary weight component), then the
    ``extra`` names (a recipe's own slices, experts and KV caches) not among them. KV caches
    (``LAYER.kcache``, ``LAYER.vcache``, ``LAYERS.kv``) are named, or come from the recipe."""
    parts = [p.strip() for p in selection.split(",") if p.strip()]
    weights = ",".join(p for p in parts if not _is_cache(p))
    caches = ",".join([p for p in parts if _is_cache(p)] + [n for n in extra if _is_cache(n)])
    comps = all_components(model) if selection.strip() == "*" else \
        resolve(model, weights) if weights else []
    have = {c.name for c in comps}
    more = [c for name in extra if name not in have and not _is_cache(name)
            for c in resolve(model, name)]
    kv = resolve_cache(model, caches) if caches else []
    return comps + list({c.name: c for c in more + kv}.values())


def _targets(patched_model, source_model, selection: str, granularity: str,
             extra: Sequence[str] = ()) -> list[_Target]:
    mine = _components(patched_model, selection, extra)
    theirs = {c.name: c for c in _components(source_model, selection, extra)}
    pairs = [(c, theirs[c.name]) for c in mine if c.name in theirs]
    if granularity == "layer":
        by_layer: dict[int, list] = {}
        for c, t in pairs:
            by_layer.setdefault(c.layer, []).append((c, t))
        return [_Target(f"{n}.*", n, "layer", cs) for n, cs in sorted(by_layer.items())]
    if granularity == "model" and pairs:
        return [_Target("*", min(c.layer for c, _ in pairs), "model", pairs)]
    if granularity != "component":
        raise DTMError(f"Unknown granularity '{granularity}': use component, layer or model.")
    return [_Target(c.name, c.layer, c.kind, [(c, t)]) for c, t in pairs]


# ---------------------------------------------------------------------------------------------
# The explanation


def _patched_by(t: _Target) -> str:
    """How a target is patched: a cache's stored entries, expert weights, or module outputs."""
    caches = [isinstance(m, CacheComponent) for m, _ in t.comps]
    if any(not c and m.experts is not None for c, (m, _) in zip(caches, t.comps)):
        return "weights"
    return "cache" if all(caches) else "output and cache" if any(caches) else "output"


def first_divergence(pair: Pair, prompt_ids: Sequence[int], reference: Sequence[int]) -> int | None:
    """The first position of the dense continuation where the compressed model's argmax (on the
    dense prefix) differs: FDT's position, or None when there is none."""
    seq = list(prompt_ids) + list(reference)
    x = torch.tensor([seq], device=model_device(pair.compressed))
    with torch.no_grad():
        logits = pair.compressed(input_ids=x, use_cache=False).logits[0]
    n0 = len(prompt_ids) - 1
    arg = logits[n0:n0 + len(reference)].argmax(-1).tolist()
    return next((t for t, (a, r) in enumerate(zip(arg, reference)) if a != r), None)


def explain(pair: Pair, prompt_ids: Sequence[int], new_tokens: int, *,
            position: int | None = None, scope: str = "all", granularity: str = "component",
            components: str = "*", reverse: bool = True, reference: Sequence[int] | None = None,
            progress: Callable[[float, str], None] | None = None) -> Explanation:
    """The lens and the patching map of ``pair`` at position ``position`` of the prompt's dense
    continuation (default: its first divergent token)."""
    if scope not in ("all", "position"):
        raise DTMError(f"Unknown scope '{scope}': use all (every position up to the chosen one) "
                       "or position (the chosen one only).")
    ids = list(prompt_ids)
    if not ids:
        raise DTMError("The prompt is empty.")
    check_lengths(pair.dense.model, [ids], new_tokens)
    ref = list(reference) if reference is not None else \
        reference_continuations(pair.dense, [ids], new_tokens)[0]
    if position is None:
        position = first_divergence(pair, ids, ref)
        if position is None:
            raise DTMError(f"The compressed model follows the dense one for all {len(ref)} "
                           "tokens: nothing diverges to explain; give a position to look at one.")
    if not 0 <= position < len(ref):
        raise DTMError(f"Position {position} is outside the dense continuation (0-{len(ref) - 1}).")
    seq = ids + ref[:position]
    at = len(seq) - 1
    dense_m, comp_m = pair.dense.model, pair.compressed
    # a recipe's own units (a slice of a fused weight, one expert) are targets too
    extra = [c.name for c, _ in pair.recipe.components(dense_m)] if pair.recipe else []
    if components.strip() == "*" and pair.recipe is not None and pair.recipe.has_cache_specs \
            and not any(i.spec.changes_weights for i in pair.recipe.items):
        components = ""         # a KV-only recipe: its caches (the weights are the dense ones)
    targets = _targets(comp_m, dense_m, components, granularity, extra)
    paths = sorted({c.path for t in targets for pair_c in t.comps for c in pair_c})
    kv = {k: [p[k] for t in targets for p in t.comps if isinstance(p[k], CacheComponent)]
          for k in (0, 1)}
    # the same module path names the same component in both models (a shared copy or a
    # checkpoint of the same base)
    d = _record(dense_m, seq, paths, kv[1])
    c = _record(comp_m, seq, paths, kv[0])
    # every distribution at the position through the same path (last hidden state -> tail ->
    # head on one vector), so that an unchanged run compares exactly equal
    d.logits = _lens_logits(dense_m, d.layer_outputs[-1][at])
    c.logits = _lens_logits(comp_m, c.layer_outputs[-1][at])
    dense_tok = ref[position]
    comp_tok = int(c.logits.argmax())
    tok = pair.tokenizer
    tokens = {"dense": tok.decode([dense_tok]), "compressed": tok.decode([comp_tok]),
              "before": tok.decode(seq[-12:]), "position": position}
    lens = []
    for n, (hd, hc) in enumerate(zip(d.layer_outputs, c.layer_outputs)):
        ld, lc = _lens_logits(dense_m, hd[at]), _lens_logits(comp_m, hc[at])
        lens.append({"layer": n, "dense_logp_dense_token": float(ld[dense_tok]),
                     "dense_logp_compressed_token": float(ld[comp_tok]),
                     "compressed_logp_dense_token": float(lc[dense_tok]),
                     "compressed_logp_compressed_token": float(lc[comp_tok]),
                     "dense_rank_dense_token": _rank(ld, dense_tok),
                     "dense_rank_compressed_token": _rank(ld, comp_tok),
                     "compressed_rank_dense_token": _rank(lc, dense_tok),
                     "compressed_rank_compressed_token": _rank(lc, comp_tok),
                     "kl": _kl(ld, lc)})
    gap = float(d.logits[dense_tok] - c.logits[dense_tok])
    module_order = d.call_order    # computation order (Phi-3 registers o before qkv)
    rows = []
    for k, t in enumerate(targets):
        x = _patched_logits(comp_m, c, d, t, at, scope)
        row = {"component": t.name, "layer": t.layer, "kind": t.kind,
               "params": sum(m.params for m, _ in t.comps),
               "order": min(module_order.get(m.path, 0) for m, _ in t.comps),
               "restored_logp": float(x[dense_tok]),
               "restores_argmax": bool(int(x.argmax()) == dense_tok),
               "kl_after_patch": _kl(d.logits, x),
               "restored_share": (float(x[dense_tok] - c.logits[dense_tok]) / gap
                                  if abs(gap) > 1e-12 else float("nan")),
               "patched_by": _patched_by(t)}
        if reverse:
            back = [(theirs, mine) for mine, theirs in t.comps]
            y = _patched_logits(dense_m, d, c, _Target(t.name, t.layer, t.kind, back), at, scope)
            row.update(reverse_logp_compressed_token=float(y[comp_tok]),
                       reverse_flips_argmax=bool(int(y.argmax()) == comp_tok != dense_tok),
                       reverse_kl=_kl(d.logits, y))
        rows.append(row)
        if progress:
            progress((k + 1) / len(targets), f"{k + 1}/{len(targets)} patched: {t.name}")
    cols = PATCH_COLUMNS + (REVERSE_COLUMNS if reverse else [])
    return Explanation(prompt_ids=ids, reference=ref, position=position, dense_token=dense_tok,
                       compressed_token=comp_tok, logp_dense=float(d.logits[dense_tok]),
                       logp_compressed=float(c.logits[dense_tok]), kl=_kl(d.logits, c.logits),
                       lens=pd.DataFrame(lens, columns=LENS_COLUMNS),
                       patching=pd.DataFrame(rows, columns=cols), scope=scope,
                       granularity=granularity, tokens=tokens)


def explain_set(pair: Pair, prompt_ids: Sequence[Sequence[int]], new_tokens: int, *,
                scope: str = "all", granularity: str = "component",
                references: Sequence[Sequence[int]] | None = None,
                progress: Callable[[float, str], None] | None = None
                ) -> tuple[pd.DataFrame, list[Explanation]]:
    """Over a prompt set: each prompt's first divergent token explained (forward patching), and
    per component how often it ranks first and its mean restored share. Prompts that never
    diverge are skipped."""
    refs = references or reference_continuations(pair.dense, [list(p) for p in prompt_ids],
                                                 new_tokens)
    found: list[Explanation] = []
    for i, (ids, ref) in enumerate(zip(prompt_ids, refs)):
        t = first_divergence(pair, ids, ref)
        if t is not None:
            found.append(explain(pair, ids, new_tokens, position=t, scope=scope,
                                 granularity=granularity, reverse=False, reference=ref))
        if progress:
            progress((i + 1) / len(prompt_ids), f"{i + 1}/{len(prompt_ids)} prompts explained")
    first = Counter(e.ranked().component.iloc[0] for e in found if not e.patching.empty)
    shares: dict[str, list[float]] = {}
    for e in found:
        for r in e.patching.itertuples():
            shares.setdefault(r.component, []).append(r.restored_share)
    table = pd.DataFrame([{"component": name, "first": first.get(name, 0),
                           "mean_restored_share": float(pd.Series(v).mean())}
                          for name, v in shares.items()],
                         columns=["component", "first", "mean_restored_share"])
    table = table.sort_values(["first", "mean_restored_share"], ascending=[False, False])
    # (ranked first: the smallest KL to the dense distribution after the patch)
    return table.reset_index(drop=True), found
