"""What a compression method is: a frozen config that knows its spec string, its strength axis, the
calibration statistics it needs, its llama.cpp type and how to compress one weight matrix.

A method never branches on another method's name; the engine never branches on any method's name.
It asks the method (see :mod:`dtm_core.compression.methods` for the registry).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch

from dtm_core.errors import DTMError
from dtm_core.compression.methods.registry import bad_spec


@dataclass(frozen=True)
class Method:
    """Base of every method config. Subclasses are frozen dataclasses registered with
    :func:`dtm_core.compression.methods.register`."""

    name: ClassVar[str]                    # the spec's head, e.g. "magnitude"
    forms: ClassVar[tuple[str, ...]]       # accepted spec forms, e.g. ("magnitude:S",)
    summary: ClassVar[str] = ""            # one line for help texts and the docs
    family: ClassVar[str] = "none"         # "pruning", "quantization" or "none"
    needs: ClassVar[tuple[str, ...]] = ()  # calibration statistics (see dtm_core.compression.calibration)
    level_axis: ClassVar[str | None] = None   # "sparsity" or "bits": what level() measures
    presets: ClassVar[tuple[str, ...]] = ()   # specs the app offers in its preset list
    level_methods: ClassVar[tuple[str, ...]] = ()  # level-curve method names, e.g. "int:g128"
    # True: the components that read one input are compressed together (AWQ's shared scales):
    # the engine calls prepare_group once per group and hands its result to apply as
    # stats["group"]
    shares_input: ClassVar[bool] = False
    # True: a recipe of this method over several layers is calibrated layer by layer by default
    # (each layer's statistics on the outputs of the layers before it as already compressed),
    # as llm-compressor's sequential pipeline runs its GPTQ, SparseGPT, Wanda and AWQ modifiers
    sequential: ClassVar[bool] = False
    # True: the spec quantizes KV caches (``LAYER.kcache`` / ``LAYER.vcache``), not weights
    targets_cache: ClassVar[bool] = False

    # -- parsing ----------------------------------------------------------------------------
    @classmethod
    def matches(cls, head: str) -> bool:
        """Whether a spec's head (text before the first ':') names this method."""
        return head == cls.name

    @classmethod
    def parse(cls, head: str, options: list[str], spec: str) -> "Method":
        """The config a spec names; ``options`` are the ':'-separated parts after the head.
        Raise :func:`bad_spec` with a reason for anything malformed."""
        if options:
            raise bad_spec(spec, f"{cls.name} takes no options")
        return cls()

    def __str__(self) -> str:
        return self.name

    # -- what the engine asks ---------------------------------------------------------------
    @property
    def method(self) -> str:
        """The method's name (kept for code written against the old ``Spec.method``)."""
        return self.name

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs)

    @property
    def is_quantization(self) -> bool:
        return self.family == "quantization"

    @property
    def changes_weights(self) -> bool:
        return True

    @property
    def level(self) -> float | None:
        """The spec's strength on its axis: sparsity for pruning, bit width for quantization."""
        return None

    @property
    def sparsity_share(self) -> float:
        """The share of weights this spec sets to zero (pruning: its level; otherwise 0)."""
        return float(self.level) if self.family == "pruning" and self.level is not None else 0.0

    def storage_bits(self, cols: int, dtype_bits: int) -> float | None:
        """Bits per weight of an (out, ``cols``) matrix stored as this spec deploys it, where the
        working dtype has ``dtype_bits``; None when unknown (budgets refuse such a spec).

        Pruning: the kept values at the dtype's bits plus a one-bit-per-weight mask (the
        compressed-tensors bitmask format). Quantization methods count their grid's scales and
        zero points per group (see :func:`~dtm_core.compression.methods.rtn.grid_storage_bits`)."""
        if self.family == "pruning" and self.level is not None:
            return dtype_bits * (1.0 - float(self.level)) + 1.0
        return None

    def llmcompressor_scheme(self) -> dict | None:
        """How an llm-compressor recipe expresses this spec, or None when it cannot: a
        quantization scheme as ``{"modifier": NAME, "group": {...}}`` (a ``config_groups`` entry
        without its targets; ``"modifier_args"``: arguments of the modifier itself), a pruning
        modifier as ``{"modifier": NAME, "args": {...}}`` (without targets)."""
        return None

    def torchao_config(self) -> dict | None:
        """``{"config": CLASS, "kwargs": {...}}``: the torchao ``quantize_`` config of this spec
        (JSON-able; the exported snippet builds it), or None when torchao has none."""
        return None

    def with_level(self, level: float) -> "Method":
        """The same method at another strength (level curves, plans over levels)."""
        raise DTMError(f"{self.name} has no strength axis to vary.")

    @classmethod
    def at_level(cls, level: float, options: str = "") -> "Method":
        """The spec of a level curve's point: this method with ``options`` at ``level``."""
        raise DTMError(f"{cls.name} has no strength axis to vary.")

    def llama_cpp_type(self) -> str | None:
        """The llama.cpp tensor type closest to this spec, or None when there is none."""
        return None

    def apply(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor], name: str = ""
              ) -> torch.Tensor:
        """The compressed version of a float32 (out, in) weight matrix. ``stats`` holds this
        component's calibration statistics named in :attr:`needs`; ``name`` is the component
        (``LAYER.KIND``) for messages."""
        raise NotImplementedError

    def apply_at(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor], component,
                 expert: int | None = None) -> torch.Tensor:
        """:meth:`apply` for one matrix of a :class:`~dtm_core.models.components.Component` (``expert``:
        which expert's matrix of an experts parameter). A method that depends on where the
        matrix sits (``from:PATH`` reads that component from a checkpoint) overrides this."""
        return self.apply(w, stats, component.name)

    def runtime_hook_at(self, component) -> Callable | None:
        """:meth:`runtime_hook` for one component's module."""
        return self.runtime_hook()

    @property
    def key(self) -> str:
        """What identifies this spec's results in caches (the spec itself, plus whatever the
        spec reads from outside, e.g. a checkpoint's file stamps)."""
        return str(self)

    def prepare_group(self, weights: Mapping[str, torch.Tensor], stats: Mapping
                      ) -> object:
        """For :attr:`shares_input` methods: what the group of (out, in) float32 matrices that
        read one input (``weights`` by module path, dense) shares, from that input's
        statistics."""
        return None

    def runtime_hook(self) -> Callable | None:
        """A forward pre-hook the compressed module runs with (activation quantization), or
        None."""
        return None

    def runtime_hook_for(self, component, stats: Mapping) -> Callable | None:
        """:meth:`runtime_hook_at` given the component's calibration statistics (a static
        activation scale from the calibration inputs, as NVFP4 activations have)."""
        return self.runtime_hook_at(component)

    def fused_stats(self, model, component) -> Mapping | None:
        """Statistics this spec reads from the dense weights of the modules deployed fused with
        ``component`` (NVFP4's global scale, shared by q/k/v and gate/up), taken before anything
        of the recipe is compressed; None when it reads none."""
        return None

    per_tensor_bits: ClassVar[int] = 0   # bits stored once per tensor (a global scale)

    def bits_per_weight(self, rows: int, cols: int, dtype_bits: int) -> float | None:
        """:meth:`storage_bits` of an (rows, cols) matrix with what is stored once per tensor
        spread over its weights; None when unknown."""
        bits = self.storage_bits(cols, dtype_bits)
        return None if bits is None else bits + self.per_tensor_bits / (rows * cols)


def need_stat(stats: Mapping[str, torch.Tensor], stat: str, method: str) -> torch.Tensor:
    """The statistic a method needs, or one sentence saying how to provide it."""
    got = stats.get(stat) if stats else None
    if got is None:
        raise DTMError(f"{method} needs calibration ({stat.replace('_', ' ')}): give a prompt set "
                       "or a calibration file.")
    return got
