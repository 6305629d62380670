"""Calibration statistics that compression methods need, gathered once and shared.

A method declares what it needs by name (``Method.needs``); each name is a :class:`Statistic` here:
an accumulator over the inputs a component's module sees while the *dense* model runs on the
calibration sequences. :class:`Calibration` holds the sequences and every statistic computed so
far, per module path; asking again for a (statistic, path) it has costs nothing, and one forward
pass fills every missing path at once. :func:`calibration_for` hands out one Calibration per
(model, sequences), so a pair, a sweep and a plan over the same prompts share their statistics.

Modules that read the very same input tensor (q/k/v of an attention block, gate/up of an MLP; any
family: it is observed, not declared) share it: each statistic is accumulated once per input and
the modules get the same tensor object (:meth:`Calibration.peers` lists them).

The calibration policy is the same in the app, the CLI, sweeps and plans: the prompts being
evaluated, or an explicit calibration file (see :class:`dtm_core.jobs.CalibrationSetting`).
Sequences are the prompts' tokens (chat template applied when on), padded on the right in batches
with the padding masked out of every statistic.
"""
from __future__ import annotations

import hashlib
import json
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dtm_core.models import hooks
from dtm_core.errors import DTMError


@dataclass(frozen=True)
class Statistic:
    """``add(state or None, x)`` -> state, with x the (real tokens, width) float32 inputs of one
    batch; ``finish(state, n_tokens)`` -> the tensor a method gets."""

    name: str
    description: str
    add: Callable
    finish: Callable


def _add_sq(state, x):
    s = (x * x).sum(0)
    return s if state is None else state + s


def _add_outer(state, x):
    s = x.t() @ x
    return s if state is None else state + s


STATISTICS: dict[str, Statistic] = {}


def register_statistic(stat: Statistic) -> Statistic:
    STATISTICS[stat.name] = stat
    return stat


register_statistic(Statistic(
    "input_norms", "L2 norm of each input feature over every calibration token (Wanda)",
    _add_sq, lambda s, n: s.sqrt()))
register_statistic(Statistic(
    "input_absmean", "mean |x| of each input feature over every calibration token (AWQ)",
    lambda s, x: (x.abs().sum(0) if s is None else s + x.abs().sum(0)),
    lambda s, n: s / max(n, 1)))
register_statistic(Statistic(
    "input_absmax", "max |x| of each input feature over every calibration token (static "
    "activation scales: NVFP4 activations)",
    lambda s, x: (x.abs().amax(0) if s is None else torch.maximum(s, x.abs().amax(0))),
    lambda s, n: s))
register_statistic(Statistic(
    "input_hessian", "H = 2/n sum x x^T of the module's inputs over n calibration tokens "
    "(GPTQ, SparseGPT)", _add_outer, lambda s, n: s * (2.0 / max(n, 1))))


def expert_key(path: str, param: str, expert: int) -> str:
    """The name statistics of one expert's matrix are kept under: ``PATH:PARAM:E``."""
    return f"{path}:{param}:{expert}"


def sequences_key(seqs: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, s)) for s in seqs]).encode()).hexdigest()[:16]


class Calibration:
    """Statistics of the dense model's module inputs over fixed calibration sequences.

    ``label`` says where the sequences came from (shown to the user, e.g. "the 12 evaluated
    prompts" or "calibration file c.txt").
    """

    def __init__(self, model: torch.nn.Module, seqs: Sequence[Sequence[int]], label: str = "",
                 batch_size: int = 8, pad_id: int = 0):
        if not seqs or not all(len(s) for s in seqs):
            raise DTMError("Calibration needs at least one non-empty prompt.")
        self._model = weakref.ref(model)
        self.seqs = [list(s) for s in seqs]
        self.label = label or f"{len(self.seqs)} calibration prompts"
        self.key = sequences_key(self.seqs)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.passes = 0            # forward passes over the set (tests check reuse)
        self._stats: dict[tuple[str, str], torch.Tensor] = {}
        self._groups: dict[str, tuple[str, ...]] = {}   # path -> the paths reading its input
        self._memo: dict = {}
        self._lock = threading.Lock()

    def peers(self, path: str) -> list[str]:
        """The modules observed reading the same input as ``path`` (itself included), in model
        order; only modules gathered in the same pass are known to each other."""
        return list(self._groups.get(path, (path,)))

    def _join(self, a: str, b: str) -> None:
        merged = tuple(dict.fromkeys(self._groups.get(a, (a,)) + self._groups.get(b, (b,))))
        for p in merged:
            self._groups[p] = merged

    def memo(self, key, compute: Callable):
        """A value derived from these statistics, computed once (e.g. AWQ's scales of a group
        of modules, shared by every component of the group)."""
        with self._lock:
            if key not in self._memo:
                self._memo[key] = compute()
            return self._memo[key]

    def get(self, stat: str, paths: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{path: tensor}`` of one statistic for the modules at ``paths``."""
        return {p: v[stat] for p, v in self.many([stat], paths).items()}

    def many(self, stats: Sequence[str], paths: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """``{path: {statistic: tensor}}``; what is missing is gathered in one pass."""
        for s in stats:
            if s not in STATISTICS:
                raise DTMError(f"Unknown calibration statistic '{s}': known are "
                               f"{', '.join(STATISTICS)}.")
        with self._lock:
            missing = [(s, p) for p in paths for s in stats if (s, p) not in self._stats]
            if missing:
                self._gather(missing)
            return {p: {s: self._stats[(s, p)] for s in stats} for p in paths}

    def _batches(self, model):
        """(mask of real tokens, run the batch) for each batch of the calibration sequences."""
        from dtm_core.models.generation import model_device, right_padded

        dev = model_device(model)
        for start in range(0, len(self.seqs), self.batch_size):
            chunk = self.seqs[start:start + self.batch_size]
            ids = right_padded(chunk, self.pad_id)
            mask = torch.arange(ids.shape[1])[None, :] < torch.tensor(
                [len(s) for s in chunk])[:, None]
            yield mask, (lambda ids=ids: model(input_ids=ids.to(dev), use_cache=False))

    @torch.no_grad()
    def _gather(self, wanted: list[tuple[str, str]], share: bool = True) -> None:
        model = self._model()
        if model is None:
            raise DTMError("The model these calibration statistics belong to was released.")
        experts = [(s, p) for s, p in wanted if ":" in p]
        wanted = [(s, p) for s, p in wanted if ":" not in p]
        paths = list(dict.fromkeys(p for _, p in wanted))
        by_path = {p: [s for s, q in wanted if q == p] for p in paths}
        counts: dict[tuple[str, str], int] = {}
        # (s, p) -> the (s, root) whose accumulator it shares: decided in the first batch, when
        # p's input is the very tensor an earlier module of the same parent read
        owner: dict[tuple[str, str], tuple[str, str]] = {}
        joined: list[tuple[str, str]] = []
        state: dict[tuple[str, str], torch.Tensor | None] = {}
        live: list[torch.Tensor] = []
        first = [True]
        seen: list = [None, []]    # the current parent module, [(input tensor, path)] under it

        def observe(i, module, args):
            p = paths[i]
            raw = args[0]
            parent = p.rpartition(".")[0]
            if seen[0] != parent:          # inputs are held only while their parent runs, so
                seen[0], seen[1] = parent, []   # a freed tensor's address is never mistaken
            same = next((q for t, q in seen[1] if t is raw), None) if share else None
            seen[1].append((raw, p))
            if first[0] and same is not None:
                joined.append((same, p))
            x = None
            for s in by_path[p]:
                key = (s, p)
                if first[0] and same is not None:
                    src = owner.get((s, same), (s, same))
                    if src in state:
                        owner[key] = src
                if key in owner:
                    if not any(t is raw and q == owner[key][1] for t, q in seen[1]):
                        raise _Unshared()
                    continue
                if x is None:
                    m = live[0].to(raw.device)
                    if raw.dim() == 2 and m.dim() == 2:   # OPT's MLP reads (B*T, width)
                        m = m.reshape(-1)
                    x = raw[m].float()                                # (real tokens, width)
                state[key] = STATISTICS[s].add(state.get(key), x)
                counts[key] = counts.get(key, 0) + len(x)

        # experts: each expert's matrices see only the tokens the router sends to it
        from dtm_core.models.families import family_of
        ex_mods = list(dict.fromkeys(p.split(":")[0] for _, p in experts))
        ex_wanted = {m: [(s, p) for s, p in experts if p.split(":")[0] == m] for m in ex_mods}
        expert_input = family_of(model).expert_input if experts else None
        if experts and expert_input is None:
            raise DTMError("This model family has no rule for the inputs of single experts.")

        def observe_experts(i, module, args):
            x, index = args[0], args[1]
            real = live[0].to(x.device).reshape(-1)
            for s, key in ex_wanted[ex_mods[i]]:
                _, param, e = key.split(":")
                routed = (index == int(e)).any(-1) & real
                if not bool(routed.any()):
                    continue
                xe = expert_input(module, x[routed], int(e), param).float()
                state[(s, key)] = STATISTICS[s].add(state.get((s, key)), xe)
                counts[(s, key)] = counts.get((s, key), 0) + len(xe)

        mods = [model.get_submodule(p) for p in paths]
        try:
            with hooks.attached(mods, observe, pre=True), \
                    hooks.attached([model.get_submodule(m) for m in ex_mods], observe_experts,
                                   pre=True):
                for mask, run in self._batches(model):
                    live[:] = [mask]
                    run()
                    first[0] = False
                    seen[:] = [None, []]
        except _Unshared:     # inputs shared in one batch but not another: gather apart
            return self._gather(wanted + experts, share=False)
        self.passes += 1
        finished = {k: STATISTICS[k[0]].finish(v, counts[k]) for k, v in state.items()}
        for key in wanted:
            self._stats[key] = finished[owner.get(key, key)]
        for key in experts:     # an expert no calibration token reached has no statistics
            self._stats[key] = finished.get(key)
        for a, b in joined:
            self._join(a, b)


class _Unshared(Exception):
    pass


class LayerCalibration(Calibration):
    """The statistics of one decoder layer's modules on given inputs of that layer (the outputs
    of the layers before it, as compressed so far): what :func:`sequential` hands out."""

    def __init__(self, parent: Calibration, model, layer, inputs: list):
        super().__init__(model, parent.seqs, f"{parent.label}, layer by layer",
                         parent.batch_size, parent.pad_id)
        self.key = f"{parent.key}|sequential"
        self._layer = layer
        self._inputs = inputs        # per batch: (hidden, args, kwargs, mask)

    def _batches(self, model):
        for hidden, args, kwargs, mask in self._inputs:
            yield mask, (lambda h=hidden, a=args, k=kwargs: hooks.run_layer(self._layer, h, a, k))


@torch.no_grad()
def sequential(calib: Calibration, model, layers: Sequence[int], compress_layer: Callable
               ) -> None:
    """GPTQ's order of work over the whole model: for each decoder layer in ``layers`` (in
    order), ``compress_layer(index, LayerCalibration)`` compresses it with statistics gathered on
    the outputs of the layers before it as already compressed; then that layer's compressed
    output becomes the next layer's input. Costs about two passes of the model over the
    calibration set, whatever the number of layers."""
    from dtm_core.models.components import decoder_layers

    if not layers:
        return
    blocks = decoder_layers(model)
    batches = []     # per batch: (hidden into the next layer, [(args, kwargs) per layer], mask)
    for mask, run in calib._batches(model):
        rec: list = [None] * len(blocks)
        with hooks.recording(blocks, rec):
            run()
        args0, kw0 = rec[0]
        hidden = args0[0] if args0 else kw0["hidden_states"]
        # only layer 0's hidden input is kept; the others' come from the compressed layers
        calls = [(((None,) + tuple(a[1:])) if a else a,
                  {k: v for k, v in kw.items() if k != "hidden_states"}) for a, kw in rec]
        batches.append([hidden, calls, mask])
    for n in range(max(layers) + 1):
        if n in layers:
            lc = LayerCalibration(calib, model, blocks[n],
                                  [(h, calls[n][0], calls[n][1], m) for h, calls, m in batches])
            compress_layer(n, lc)
        if n < max(layers):
            for b in batches:
                b[0] = hooks.run_layer(blocks[n], b[0], *b[1][n])


_SHARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Calibration]]" = \
    weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()
KEEP_PER_MODEL = 4


def calibration_for(model: torch.nn.Module, seqs: Sequence[Sequence[int]], label: str = "",
                    pad_id: int = 0) -> Calibration:
    """The shared :class:`Calibration` of ``model`` over ``seqs`` (the few most recent kept per
    model, released with the model)."""
    key = sequences_key(seqs)
    with _SHARED_LOCK:
        per = _SHARED.setdefault(model, {})
        cal = per.pop(key, None) or Calibration(model, seqs, label, pad_id=pad_id)
        per[key] = cal                     # most recent last
        while len(per) > KEEP_PER_MODEL:
            per.pop(next(iter(per)))
        return cal


def calibration_from(dense, source, chat: bool = False, who: str = "this method") -> Calibration:
    """The shared Calibration of a LoadedModel for ``source``: a Calibration (as is), prompt
    texts (tokenized with ``chat``) or token sequences."""
    from dtm_core.models.generation import encode_prompts, pad_id_of

    if isinstance(source, Calibration):
        return source
    items = list(source or [])
    if not items:
        raise DTMError(f"{who} needs calibration prompts: give a prompt set or --calibration.")
    if all(isinstance(x, str) for x in items):
        seqs = encode_prompts(dense.tokenizer, items, chat=chat)
        label = f"{len(items)} calibration prompt{'s' * (len(items) != 1)}"
    else:
        seqs = [list(x) for x in items]
        label = f"{len(seqs)} calibration sequence{'s' * (len(seqs) != 1)}"
    return calibration_for(dense.model, seqs, label, pad_id_of(dense.tokenizer))
