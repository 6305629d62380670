"""What the app and the CLI both do, in one place: typed requests in, engine results out.

* :class:`PairRequest` + :class:`CalibrationSetting` -> a :class:`~dtm_core.compression.pair.Pair`
  (:meth:`PairCache.open`): a spec over components, a recipe or a second checkpoint, with one
  calibration policy everywhere: the prompts being evaluated, or an explicit calibration file /
  built-in set. The pair's ``calibration.label`` says which, and the app and the CLI show it.
* :class:`IntactKVSetting` -> an :class:`~dtm_core.compression.intactkv.IntactKV` (:func:`resolve_intactkv`),
  parsed once and calibrated when asked (same calibration policy).
* :func:`compare_variants` -> :class:`VariantComparison`: the same prompts and dense references
  under several IntactKV settings ("plain" = none), one result type. Wide tables follow one rule:
  the primary run's columns keep their names and every other run's get ``_<its name>``
  (``evaluate``: primary plain, others ``*_intactkv``; ``divergence --intactkv`` and IntactKV
  sweeps: primary IntactKV, the plain run's ``*_plain``).
* :func:`sweep_variants` -> :class:`SweepComparison`: a plain sweep and, when asked, the IntactKV
  sweep on the same cells.
* :func:`estimated_sweep` -> :class:`~dtm_core.analysis.sweep.refine.Refined`: every cell
  estimated at once, then exact cells most sensitive first (all, some, or until settled).
* :func:`plan_from_sweep`: dense references, then a plan from a sweep's table.
* :func:`kv_grid`: every (K bits, V bits) of KV-cache quantization, one row each.

Nothing here draws or prints; the app and the CLI format what these return.
"""
from __future__ import annotations

import gc
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import pandas as pd

from dtm_core.compression.calibration import Calibration, calibration_from
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import reference_continuations
from dtm_core.errors import DTMError
from dtm_core.models.generation import encode_prompts
from dtm_core.compression.intactkv import IntactKV, calibrate
from dtm_core.compression.methods import parse_spec
from dtm_core.models.load import LoadedModel, load_model
from dtm_core.compression.pair import (Pair, check_copy_fits, checkpoint_in_place_pair,
                                       checkpoint_pair, in_place_pair, make_pair)
from dtm_core.planning.plan import Plan, make_plan
from dtm_core.measure.prompts import load_prompts
from dtm_core.analysis.kvgrid import grid_rows, kv_grid  # noqa: F401 (the app's and the CLI's K x V grid)
from dtm_core.analysis.sweep import SweepResult, heatmap_metrics, sweep
from dtm_core.measure.variants import (VARIANT_COLUMNS, VariantComparison, compare_variants,  # noqa: F401
                                       with_variant)

Progress = Callable[[float, str], None]


# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class CalibrationSetting:
    """Where a method's calibration statistics (and a calibrated IntactKV's training prompts)
    come from: ``source`` None means the prompts being evaluated; else a prompt file (any
    ``.txt``, ``.jsonl``, ``.csv`` prompt file or plain text) or the name of a built-in set.
    ``ctx``: cut the calibration text into chunks of that many tokens (GPTQ's usual calibration
    on running text) instead of one sequence per prompt; ``samples``: use at most that many
    sequences (prompts or chunks), the first ones."""

    source: str | None = None
    ctx: int | None = None
    samples: int | None = None

    def __post_init__(self):
        if self.ctx is not None and not 2 <= int(self.ctx) <= 1_000_000:
            raise DTMError(f"The calibration chunk size must be at least 2 tokens, not "
                           f"{self.ctx}.")
        if self.samples is not None and int(self.samples) < 1:
            raise DTMError(f"The number of calibration samples must be at least 1, not "
                           f"{self.samples}.")

    @classmethod
    def of(cls, value, ctx: int | None = None, samples: int | None = None
           ) -> "CalibrationSetting":
        if isinstance(value, CalibrationSetting):
            return value
        text = str(value).strip() if value is not None else ""
        ctx = int(ctx) if ctx not in (None, "", 0) else None
        samples = int(samples) if samples not in (None, "", 0) else None
        if text.lower() in ("", "evaluated", "prompts in use", "none", "default"):
            return cls(None, ctx, samples)
        return cls(text, ctx, samples)

    def texts(self, evaluated: Sequence[str], what: str = "the evaluated prompts"
              ) -> tuple[list[str], str]:
        """(prompt texts, a label saying where they came from)."""
        if self.source is None:
            items = [t for t in evaluated if isinstance(t, str) and t.strip()]
            if not items:
                raise DTMError("This compression needs calibration prompts: give prompts to "
                               "evaluate or a calibration file.")
            return items, f"{what} ({len(items)} prompt{'s' * (len(items) != 1)})"
        pset = load_prompts(self.source)
        return pset.prompts, f"'{pset.name}' ({len(pset.prompts)} prompts)"

    def sequences(self, tokenizer, evaluated, chat: bool = False) -> tuple[list[list[int]], str]:
        """(token sequences, label): the prompts tokenized as the job's are (``evaluated`` may
        be token ids already), or with ``ctx`` the whole text cut into chunks; at most
        ``samples`` of them."""
        evaluated = list(evaluated)
        if self.source is None and evaluated and not isinstance(evaluated[0], str):
            seqs = [list(map(int, e)) for e in evaluated]
            label = f"the evaluated prompts ({len(seqs)} prompts)"
            if self.ctx:
                seqs = _chunks([t for q in seqs for t in q], self.ctx)
        else:
            texts, label = self.texts(evaluated)
            if self.ctx:
                ids = tokenizer("\n".join(texts), add_special_tokens=False).input_ids
                bos = _bos(tokenizer)
                seqs = _chunks(list(ids), self.ctx - int(bos is not None))
                if bos is not None:
                    seqs = [[bos] + c for c in seqs]
            else:
                seqs = encode_prompts(tokenizer, texts, chat=chat)
        if self.ctx:
            label += f" cut into {len(seqs)} chunk{'s' * (len(seqs) != 1)} of {self.ctx} tokens"
        if self.samples and len(seqs) > self.samples:
            seqs = seqs[:self.samples]
            label += f", the first {self.samples}"
        return seqs, label

    @property
    def key(self) -> tuple:
        return (self.source, self.ctx, self.samples)


def _bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before a text, or None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("").input_ids
    return bos if list(ids) == [bos] else None


def _chunks(tokens: list[int], ctx: int) -> list[list[int]]:
    """Consecutive chunks of ``ctx`` tokens (a text shorter than one chunk is one chunk)."""
    if not tokens:
        raise DTMError("The calibration text tokenizes to nothing.")
    ctx = max(1, ctx)
    n = len(tokens) // ctx
    return [tokens[i * ctx:(i + 1) * ctx] for i in range(n)] if n else [tokens]


@dataclass(frozen=True)
class PairRequest:
    """The compressed side of a pair as a user describes it (exactly one of ``compress``,
    ``recipe``, ``compressed_model``)."""

    model: str = "default"
    compress: str | None = None
    components: str = "*.*"
    recipe: Recipe | None = None
    compressed_model: str | None = None
    calibration: CalibrationSetting = field(default_factory=CalibrationSetting)
    chat: bool = False
    # statistics of each layer on the compressed layers' outputs; None: as the recipe's methods
    # default (layer by layer for GPTQ, SparseGPT, Wanda and AWQ, as llm-compressor runs them)
    sequential: bool | None = None

    def validate(self) -> None:
        """Every check that needs no model: one compressed side, a spec that parses."""
        given = [x for x in (self.compress, self.recipe, self.compressed_model) if x]
        if len(given) != 1:
            raise DTMError("Give exactly one compressed side: a compression spec (with a "
                           "component selection), a recipe file, or a compressed checkpoint.")
        if self.compress:
            parse_spec(self.compress)

    @property
    def recipe_to_apply(self) -> Recipe | None:
        if self.compressed_model:
            return None
        return self.recipe or Recipe.single(self.compress, self.components or "*.*")

    @property
    def needs_calibration(self) -> bool:
        r = self.recipe_to_apply
        return bool(r and r.needs_calibration)


@dataclass(frozen=True)
class IntactKVSetting:
    """IntactKV as asked for: ``pivots`` off / K / prefix, optionally calibrated."""

    pivots: str | None = None
    calibrated: bool = False
    steps: int = 50
    lr: float = 1e-2

    def parse(self) -> IntactKV | None:
        """The IntactKV this setting names (parsed once; a bad setting raises DTMError)."""
        return self.intactkv

    @cached_property
    def intactkv(self) -> IntactKV | None:
        ikv = IntactKV.parse(self.pivots)
        if self.calibrated:
            if ikv is None:
                raise DTMError("Calibrated IntactKV needs pivot tokens: K or 'prefix'.")
            if not 1 <= int(self.steps) <= 10000:
                raise DTMError("Calibration steps must be between 1 and 10000.")
        return ikv


# --------------------------------------------------------------------------------------------
# Pairs


def build_pair(dense: LoadedModel, request: PairRequest, evaluated: Sequence[str] = (),
               load: Callable[[str], LoadedModel] | None = None,
               in_place: str | None = None, limit: int | None = None,
               cache_dir: str | None = None) -> Pair:
    """The pair a request describes on an already loaded dense model. ``in_place`` (a keep mode
    of :mod:`dtm_core.compression.inplace`): a recipe pair that compresses the dense model
    itself when a view runs (one model's memory) instead of a compressed copy, and a checkpoint
    pair whose format allows it reads the checkpoint into the dense model instead of loading
    it beside (:func:`checkpoint_in_place_pair`); a copy is
    refused in one sentence when it does not fit in the free memory (or in ``limit`` bytes of
    model tensors, :class:`PairCache`'s ``memory_limit``). ``cache_dir``: where GGUF caches
    live."""
    request.validate()
    if request.compressed_model:
        from dtm_core.models.checkpoints import inspect

        info = inspect(request.compressed_model, base=dense.source)
        if in_place is not None:
            pair = checkpoint_in_place_pair(dense, request.compressed_model, info, keep=in_place,
                                            cache_dir=cache_dir)
            if pair is not None:
                return pair
        other = (load or load_model)(request.compressed_model)
        info.loader = other.extra.get("loader", info.loader)
        return checkpoint_pair(dense, other, info)
    recipe = request.recipe_to_apply
    recipe.components(dense.model)     # selections fail before any calibration work
    calib = None
    if recipe.needs_calibration:
        calib = resolve_calibration(dense, request.calibration, evaluated, request.chat)
    if in_place is not None:
        return in_place_pair(dense, recipe, calibration=calib, sequential=request.sequential,
                             keep=in_place)
    check_copy_fits(dense, recipe, limit)
    return make_pair(dense, recipe, calibration=calib, sequential=request.sequential)


def resolve_calibration(dense: LoadedModel, setting: CalibrationSetting, evaluated,
                        chat: bool = False) -> Calibration:
    """The shared :class:`~dtm_core.compression.calibration.Calibration` of a setting: its prompts (or the
    evaluated ones: texts, or token ids already encoded) tokenized as the job's prompts are."""
    from dtm_core.models.load import max_positions

    setting = CalibrationSetting.of(setting)
    seqs, label = setting.sequences(dense.tokenizer, evaluated, chat)
    limit = max_positions(dense.model)
    if limit and max(len(q) for q in seqs) > limit:
        raise DTMError(f"Calibration sequences of {max(len(q) for q in seqs)} tokens exceed the "
                       f"model's {limit} positions: give a smaller --calib-ctx.")
    calib = calibration_from(dense, seqs)
    calib.label = label
    return calib


class PairCache:
    """Loaded models and pairs, kept across requests so a pair is built once and reused.

    Process-wide in the app (models are big and shared by every browser session); a lock
    serializes loading. Only the most recent dense model and a few pairs built on it stay.
    """

    def __init__(self, max_pairs: int = 3, in_place: bool = True,
                 memory_limit: int | None = None, **load_kwargs):
        self.load_kwargs = load_kwargs
        self.max_pairs = max_pairs
        # bytes of model tensors the pairs may hold (the app's --memory-limit; None: the free
        # memory is the limit)
        self.memory_limit = memory_limit
        # views that run one model after the other may compress the dense model in place (off
        # where jobs run concurrently on one model: the app with --concurrency above 1)
        self.in_place = in_place
        self._lock = threading.RLock()
        self._dense: tuple[str, LoadedModel] | None = None
        self._pairs: OrderedDict[tuple, Pair] = OrderedDict()
        self.loads = 0  # how many models were actually loaded (tests check reuse)

    def dense(self, source: str) -> LoadedModel:
        source = (source or "default").strip()
        with self._lock:
            if self._dense and self._dense[0] == source:
                return self._dense[1]
            self._pairs.clear()
            self._dense = None
            gc.collect()
            model = load_model(source, **self.load_kwargs)
            self.loads += 1
            self._dense = (source, model)
            return model

    def _load_other(self, source: str) -> LoadedModel:
        self.loads += 1
        return load_model(source, **self.load_kwargs)

    def open(self, request: PairRequest, evaluated: Sequence[str] = (),
             in_place: str | None = None) -> Pair:
        """The pair of a request (``evaluated``: the prompts the job runs on, the default
        calibration set). ``in_place`` (a keep mode, e.g. ``auto``): a view that runs the two
        models one after the other gets a pair that compresses the dense model itself (unless a
        copy pair of the request is cached already: it costs nothing more); None: a pair of two
        models (the stream, IntactKV, explain)."""
        request.validate()
        if not self.in_place:
            in_place = None
        calib_key = None
        if request.needs_calibration:
            texts, _ = request.calibration.texts(evaluated)
            calib_key = (request.calibration.key, request.chat,
                         hashlib.sha256(json.dumps(texts).encode()).hexdigest())
        model = (request.model or "default").strip()
        key = (model, request.compress, request.components,
               str(request.recipe) if request.recipe else None, request.compressed_model,
               calib_key, request.sequential)
        with self._lock:
            for k in (key, key + (in_place,)) if in_place is not None else (key,):
                if k in self._pairs:
                    self._pairs.move_to_end(k)
                    return self._pairs[k]
            if in_place is None:     # a copy replaces the in-place pair of the same request
                self._pairs = OrderedDict((k, p) for k, p in self._pairs.items()
                                          if k[:len(key)] != key)
            else:
                key = key + (in_place,)
            if in_place is None and self.memory_limit is not None:
                self._pairs.clear()          # cached copies give their memory to this one
                gc.collect()
            pair = build_pair(self.dense(model), request, evaluated, load=self._load_other,
                              in_place=in_place, limit=self.memory_limit,
                              cache_dir=self.load_kwargs.get("cache_dir"))
            self._pairs[key] = pair
            while len(self._pairs) > self.max_pairs:
                self._pairs.popitem(last=False)
            return pair

    def pair(self, source: str, *, compress: str | None = None, components: str = "*.*",
             recipe: Recipe | None = None, compressed_model: str | None = None,
             calibration: Sequence[str] | None = None, chat: bool = False) -> Pair:
        """Keyword form of :meth:`open` (``calibration``: the calibration prompt texts)."""
        req = PairRequest(model=source, compress=compress, components=components, recipe=recipe,
                          compressed_model=compressed_model, chat=chat)
        return self.open(req, list(calibration or ()))

    def cached(self, source: str) -> bool:
        return bool(self._dense and self._dense[0] == (source or "default").strip())


def calibration_note(pair: Pair) -> str:
    """One sentence saying what the pair's compression was calibrated on ('' if nothing)."""
    if pair.calibration is None:
        return ""
    return f"Calibration statistics from {pair.calibration.label}."


# --------------------------------------------------------------------------------------------
# IntactKV


def resolve_intactkv(setting: IntactKVSetting | str | None, pair: Pair, evaluated: Sequence[str],
                     *, chat: bool = False,
                     calibration: CalibrationSetting = CalibrationSetting(),
                     cache_dir=None, progress: Progress | None = None,
                     stop: threading.Event | None = None) -> IntactKV | None:
    """The IntactKV of a job (None when off), parsed once; calibrated on the calibration
    setting's prompts (default: the evaluated prompts) when asked. Calibrations are cached."""
    if not isinstance(setting, IntactKVSetting):
        setting = IntactKVSetting(pivots=setting)
    ikv = setting.parse()
    if ikv is None or not setting.calibrated:
        return ikv
    texts, _ = calibration.texts(evaluated)
    ids = encode_prompts(pair.tokenizer, texts, chat=chat)
    cal = calibrate(pair, ids, ikv, steps=int(setting.steps), lr=float(setting.lr),
                    cache_dir=cache_dir, progress=progress, stop=stop)
    return ikv.with_calibration(cal)


# --------------------------------------------------------------------------------------------
# Sweeps and plans


@dataclass
class SweepComparison:
    """A plain sweep and, with IntactKV, the IntactKV sweep of the same cells."""

    plain: SweepResult
    intactkv: SweepResult | None = None
    setting: IntactKV | None = None

    @property
    def main(self) -> SweepResult:
        """The sweep to show: the IntactKV one when it ran."""
        return self.intactkv if self.intactkv is not None else self.plain

    @property
    def table(self) -> pd.DataFrame:
        """The main sweep's cells, with the plain sweep's values as ``*_plain`` beside them when
        IntactKV was on."""
        if self.intactkv is None:
            return self.plain.table
        return with_variant(self.intactkv.table, self.plain.table, "plain",
                            list(heatmap_metrics()), on="component")

    @property
    def stopped(self) -> bool:
        return self.main.stopped

    @property
    def computed(self) -> int:
        return self.plain.computed + (self.intactkv.computed if self.intactkv else 0)

    @property
    def reused(self) -> int:
        return self.plain.reused + (self.intactkv.reused if self.intactkv else 0)


def sweep_variants(dense: LoadedModel, spec: str, prompt_ids, new_tokens: int, *,
                   intactkv: IntactKV | None = None, progress: Progress | None = None,
                   calibration: CalibrationSetting = CalibrationSetting(), chat: bool = False,
                   **kw) -> SweepComparison:
    """The plain sweep, then (with ``intactkv``, unless the first was stopped) the IntactKV
    sweep of the same cells; ``kw`` as for :func:`~dtm_core.analysis.sweep.sweep`. A method that needs
    calibration gets the calibration setting's prompts (default: the sweep's own)."""
    if intactkv is not None:   # a bad setting fails before the sweep
        intactkv.pivot_lengths(dense.tokenizer, prompt_ids)
    if parse_spec(spec).needs_calibration:
        kw["calibration"] = resolve_calibration(dense, calibration, prompt_ids, chat)

    def tell(prefix):
        return None if progress is None else (lambda f, m: progress(f, prefix + m))
    plain = sweep(dense, spec, prompt_ids, new_tokens, **kw,
                  progress=tell("plain sweep: " if intactkv else ""))
    if intactkv is None or plain.stopped:
        return SweepComparison(plain=plain)
    intact = sweep(dense, spec, prompt_ids, new_tokens, **kw, intactkv=intactkv,
                   progress=tell(f"IntactKV {intactkv.label}: "))
    return SweepComparison(plain=plain, intactkv=intact, setting=intactkv)


def estimated_sweep(dense: LoadedModel, spec: str, prompt_ids, new_tokens: int, *,
                    calibration: CalibrationSetting = CalibrationSetting(), chat: bool = False,
                    **kw):
    """:func:`~dtm_core.analysis.sweep.refine.estimate_and_refine` with the sweep's calibration
    policy (a method that needs calibration gets the setting's prompts, default the sweep's)."""
    from dtm_core.analysis.sweep.refine import estimate_and_refine

    if parse_spec(spec).needs_calibration:
        kw["calibration"] = resolve_calibration(dense, calibration, prompt_ids, chat)
    return estimate_and_refine(dense, spec, prompt_ids, new_tokens, **kw)


def plan_from_sweep(dense: LoadedModel, table: pd.DataFrame, spec: str, prompt_ids,
                    new_tokens: int, budget: float, *, references=None,
                    calibration: CalibrationSetting = CalibrationSetting(), chat: bool = False,
                    progress: Progress | None = None) -> Plan:
    """Dense references (unless given), then :func:`~dtm_core.planning.plan.make_plan` with the same
    calibration as the sweep (default: its prompts)."""
    if references is None:
        if progress:
            progress(0.0, "dense references")
        references = reference_continuations(dense, prompt_ids, new_tokens)
    calib = None
    if parse_spec(spec).needs_calibration:
        calib = resolve_calibration(dense, calibration, prompt_ids, chat)
    return make_plan(dense, table, spec, prompt_ids, references, new_tokens, budget,
                     progress=None if progress is None else (lambda k, m: progress(None, m)),
                     calibration=calib)


def plan_under_budget(dense: LoadedModel, specs, pset, new_tokens: int, *,
                      calibration: CalibrationSetting = CalibrationSetting(), chat: bool = False,
                      **kw):
    """:func:`~dtm_core.planning.budget_plan.make_budget_plan` with the calibration setting resolved: a
    calibration file or set as given; otherwise the fit prompts (never the held-out ones), as
    the sweeps use."""
    from dtm_core.planning.budget_plan import make_budget_plan, parse_specs

    calib = None
    if any(parse_spec(s).needs_calibration for s in parse_specs(specs)) \
            and calibration.source is not None:
        calib = resolve_calibration(dense, calibration, pset.prompts, chat)
    return make_budget_plan(dense, specs, pset, new_tokens, chat=chat, calibration=calib, **kw)
