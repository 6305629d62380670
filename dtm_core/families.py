"""Family adapters: everything the engine needs to know about one architecture family, in one place.

After TransformerLens' per-architecture conversions: where the decoder layers, the final norm(s) and
the LM head are, the compressible kinds and their module paths inside a layer, the attention
submodule, how logits are post-processed after the head, which layers use sliding-window
attention, and the GGUF tensor names of each kind (for llama.cpp exports). Everything else
(components, sweeps, IntactKV, the sink view, plans) asks the adapter of a model.

Adding a family: one :class:`Family` entry passed to :func:`register_family` (see
docs/architecture.md). A family is recognized by :meth:`Family.matches`: its layer list exists and
the first layer holds every kind's module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import DTMError


def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Family:
    name: str
    layers: str                         # attribute path of the decoder layer list
    kinds: dict[str, str]               # kind -> attribute path inside one layer
    transposed: bool = False            # Conv1D keeps weights as (in, out)
    tail: tuple[str, ...] = ()          # modules between the last layer and the LM head
    attention: str = "self_attn"        # the self-attention submodule of a layer
    gguf: dict[str, str] = field(default_factory=dict)   # kind -> GGUF tensor name (blk.N.*)
    examples: str = ""                  # architectures users know the family by
    # logits = postprocess(model, head(hidden)); None: the head's output is the logits
    postprocess: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
    # which layers attend through a sliding window (config -> set of layer indices)
    sliding_layers: Callable[[object], set[int]] | None = None

    def matches(self, model) -> bool:
        try:
            first = get_path(model, self.layers)[0]
            return all(hasattr(get_path(first, p), "weight") for p in self.kinds.values())
        except (AttributeError, IndexError, TypeError):
            return False

    def decoder_layers(self, model) -> list:
        return list(get_path(model, self.layers))

    def tail_modules(self, model) -> list:
        """The modules applied after the last decoder layer and before the LM head."""
        out = []
        for path in self.tail:
            try:
                mod = get_path(model, path)
            except AttributeError:
                continue
            if mod is not None:
                out.append(mod)
        return out

    def attention_module(self, layer):
        return get_path(layer, self.attention)

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from final hidden states (after the tail): head, then the
        family's post-processing."""
        out = model.get_output_embeddings()(hidden)
        return self.postprocess(model, out) if self.postprocess is not None else out

    def sliding_window_layers(self, model) -> set[int]:
        return set(self.sliding_layers(model.config)) if self.sliding_layers else set()

    def gguf_tensor(self, layer: int, kind: str) -> str:
        if kind not in self.gguf:
            raise DTMError(f"No GGUF tensor name is known for kind '{kind}' of {self.name}-family "
                           "models.")
        return f"blk.{layer}.{self.gguf[kind]}.weight"


FAMILIES: list[Family] = []


def register_family(fam: Family) -> Family:
    """Add (or replace, by name) a family adapter; earlier entries are tried first."""
    for i, f in enumerate(FAMILIES):
        if f.name == fam.name:
            FAMILIES[i] = fam
            return fam
    FAMILIES.append(fam)
    return fam


_LLAMA_GGUF = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}

register_family(Family(
    "llama", "model.layers", {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
        "down": "mlp.down_proj"}, tail=("model.norm",), gguf=_LLAMA_GGUF,
    examples="Llama, SmolLM"))
register_family(Family(
    "gpt2", "transformer.h", {
        "qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    transposed=True, tail=("transformer.ln_f",), attention="attn",
    gguf={"qkv": "attn_qkv", "o": "attn_output", "up": "ffn_up", "down": "ffn_down"},
    examples="GPT-2"))
register_family(Family(
    "opt", "model.decoder.layers", {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
    tail=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    gguf={"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "up": "ffn_up",
          "down": "ffn_down"}, examples="OPT"))


def family_of(model) -> Family:
    """The first registered family whose layer list and every kind's module exist in the model."""
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    arch = type(model).__name__
    names = ", ".join(f"{f.name} ({f.examples})" if f.examples else f.name for f in FAMILIES)
    raise DTMError(f"Architecture {arch} is not supported: components are named for the families "
                   f"{names}; a new family is one adapter entry in dtm_core/families.py "
                   "(see docs/architecture.md).")
