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

from dtm_core.errors import DTMError


def get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Kind:
    """Where one kind's weights are inside a decoder layer.

    ``path`` names the module and ``param`` its parameter (2-D ``(out, in)``, Conv1D ``(in, out)``,
    or 3-D ``(experts, out, in)`` with ``experts``); ``rows(config)`` picks the output rows of a
    fused weight that belong to this kind (q inside qkv, gate inside gate_up).
    """

    path: str
    param: str = "weight"
    rows: Callable[[object], torch.Tensor] | None = None
    experts: bool = False
    transposed: bool | None = None      # held as (in, out); None: as the family's weights are


def _kind(k: "str | Kind") -> Kind:
    return k if isinstance(k, Kind) else Kind(k)


@dataclass(frozen=True)
class Family:
    name: str
    layers: str                         # attribute path of the decoder layer list
    kinds: dict                         # kind -> module path (str) or Kind, inside one layer
    transposed: bool = False            # Conv1D keeps weights as (in, out)
    tail: tuple[str, ...] = ()          # modules between the last layer and the LM head
    attention: str = "self_attn"        # the self-attention submodule of a layer
    gguf: dict[str, str] = field(default_factory=dict)   # kind -> GGUF tensor name (blk.N.*)
    examples: str = ""                  # architectures users know the family by
    model_types: tuple[str, ...] = ()   # config.model_type values of this family
    # slices of fused weights that can be addressed too, but are not part of "*"
    slices: dict = field(default_factory=dict)
    # logits = postprocess(model, head(hidden)); None: the head's output is the logits
    postprocess: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
    # which layers attend through a sliding window (config -> set of layer indices)
    sliding_layers: Callable[[object], set[int]] | None = None
    # kind -> the norm (path inside a layer) whose output is that kind's input, where a scale of
    # the input can be folded into it (AWQ); or config -> that dict
    norms: dict | Callable[[object], dict] = field(default_factory=dict)
    norm_offset: float = 0.0            # the norm multiplies by (offset + weight): Gemma's 1
    # (experts module, its inputs (tokens, hidden) routed to expert e, e, param) -> the input of
    # that expert's ``param`` matrix: what calibration statistics of single experts are taken on
    expert_input: Callable | None = None

    def input_norm(self, config, kind: str) -> str | None:
        """The norm whose output ``kind`` reads (None: no norm to fold a scale into)."""
        norms = self.norms(config) if callable(self.norms) else self.norms
        return norms.get(kind)

    def kind(self, name: str) -> Kind:
        return _kind(self.kinds[name] if name in self.kinds else self.slices[name])

    def matches(self, model) -> bool:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if self.model_types and mt not in self.model_types:
            return False
        try:
            layers = get_path(model, self.layers)
            return any(self._present(layers[0], k) for k in self.kinds)
        except (AttributeError, IndexError, TypeError):
            return False

    def _present(self, layer, kind: str) -> bool:
        k = self.kind(kind)
        try:
            return isinstance(getattr(get_path(layer, k.path), k.param), torch.Tensor)
        except AttributeError:
            return False

    def kinds_in(self, layer) -> list[str]:
        """The primary kinds this layer has (MoE models mix dense and sparse MLP layers)."""
        return [k for k in self.kinds if self._present(layer, k)]

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


def family_named(name: str | Family) -> Family:
    """The registered family of that name (a Family is returned as it is)."""
    if isinstance(name, Family):
        return name
    for f in FAMILIES:
        if f.name == name:
            return f
    raise DTMError(f"Unknown model family '{name}'.")


def register_family(fam: Family) -> Family:
    """Add (or replace, by name) a family adapter; earlier entries are tried first."""
    for i, f in enumerate(FAMILIES):
        if f.name == fam.name:
            FAMILIES[i] = fam
            return fam
    FAMILIES.append(fam)
    return fam


# ---- helpers the adapters share ------------------------------------------------------------

def softcap_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """Gemma's final logit soft-capping: cap * tanh(logits / cap) (none when the config has no
    cap), exactly as the model's own forward computes it."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def layer_types_sliding(config) -> set[int]:
    """Layers whose ``layer_types`` entry is sliding attention; all layers when the config has a
    window but no per-layer types (Mistral)."""
    types = getattr(config, "layer_types", None)
    if types:
        return {i for i, t in enumerate(types) if t == "sliding_attention"}
    if getattr(config, "sliding_window", None):
        return set(range(config.num_hidden_layers))
    return set()


def moe_expert_input(module, x: torch.Tensor, e: int, param: str) -> torch.Tensor:
    """transformers 5 experts (Mixtral, Qwen2/3-MoE): ``gate_up_proj[e]`` reads the routed hidden
    states, ``down_proj[e]`` reads act(gate) * up of them."""
    if param == "gate_up_proj":
        return x
    gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e].to(x.dtype)).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def gpt_oss_expert_input(module, x: torch.Tensor, e: int, param: str) -> torch.Tensor:
    """gpt-oss experts: ``gate_up_proj[e]`` (in, out) reads the routed hidden states,
    ``down_proj[e]`` reads the clamped SwiGLU of their gate/up projection (bias included)."""
    if param == "gate_up_proj":
        return x
    gate_up = x @ module.gate_up_proj[e].to(x.dtype) + module.gate_up_proj_bias[e].to(x.dtype)
    return module._apply_gate(gate_up)


def _interleaved_rows(part: int):
    """gpt-oss's gate (0) and up (1) rows alternate in its fused gate_up projection."""
    def rows(c):
        return torch.arange(part, 2 * c.intermediate_size, 2)
    return rows


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _qkv_rows(part: int):
    """Rows of q (0), k (1) or v (2) in a contiguous [q; k; v] projection (Phi-3, GPT-2)."""
    def rows(c):
        hd = _head_dim(c)
        nq = c.num_attention_heads * hd
        nkv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * hd
        start, size = [(0, nq), (nq, nkv), (nq + nkv, nkv)][part]
        return torch.arange(start, start + size)
    return rows


def _neox_rows(part: int):
    """Rows of q, k or v in GPT-NeoX's per-head interleaved [q_h; k_h; v_h] projection."""
    def rows(c):
        hd = c.hidden_size // c.num_attention_heads
        return torch.cat([torch.arange(h * 3 * hd + part * hd, h * 3 * hd + (part + 1) * hd)
                          for h in range(c.num_attention_heads)])
    return rows


def _half_rows(part: int, size_attr: str = "intermediate_size"):
    """First (gate) or second (up) half of a fused [gate; up] projection."""
    def rows(c):
        n = getattr(c, size_attr)
        return torch.arange(part * n, (part + 1) * n)
    return rows


def _moe_rows(part: int):
    def rows(c):
        n = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
        return torch.arange(part * n, (part + 1) * n)
    return rows


_LLAMA_KINDS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
_LLAMA_GGUF = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
_ATTN = {k: _LLAMA_KINDS[k] for k in ("q", "k", "v", "o")}
_LLAMA_NORMS = {"q": "input_layernorm", "k": "input_layernorm", "v": "input_layernorm",
                "gate": "post_attention_layernorm", "up": "post_attention_layernorm"}
_ATTN_NORMS = {k: _LLAMA_NORMS[k] for k in ("q", "k", "v")}
_MOE = {"router": "mlp.gate",
        "experts.gate": Kind("mlp.experts", "gate_up_proj", _moe_rows(0), experts=True),
        "experts.up": Kind("mlp.experts", "gate_up_proj", _moe_rows(1), experts=True),
        "experts.down": Kind("mlp.experts", "down_proj", experts=True)}
_MOE_GGUF = {**{k: _LLAMA_GGUF[k] for k in ("q", "k", "v", "o")}, "router": "ffn_gate_inp",
             "experts.gate": "ffn_gate_exps", "experts.up": "ffn_up_exps",
             "experts.down": "ffn_down_exps"}

for _name, _types, _examples in (("llama", ("llama",), "Llama, Llama-3, SmolLM"),
                                 ("mistral", ("mistral",), "Mistral"),
                                 ("qwen2", ("qwen2",), "Qwen2, Qwen2.5"),
                                 ("qwen3", ("qwen3",), "Qwen3")):
    register_family(Family(_name, "model.layers", dict(_LLAMA_KINDS), tail=("model.norm",),
                           gguf=_LLAMA_GGUF, examples=_examples, model_types=_types,
                           sliding_layers=layer_types_sliding, norms=_LLAMA_NORMS))
for _name, _types, _examples in (("gemma2", ("gemma2",), "Gemma-2"),
                                 ("gemma3", ("gemma3_text",), "Gemma-3 (text)")):
    register_family(Family(_name, "model.layers", dict(_LLAMA_KINDS), tail=("model.norm",),
                           gguf=_LLAMA_GGUF, examples=_examples, model_types=_types,
                           postprocess=softcap_logits, sliding_layers=layer_types_sliding,
                           norms={**_ATTN_NORMS, "gate": "pre_feedforward_layernorm",
                                  "up": "pre_feedforward_layernorm"}, norm_offset=1.0))
register_family(Family(
    "phi3", "model.layers", {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
                             "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
    tail=("model.norm",), model_types=("phi3",), examples="Phi-3",
    slices={"q": Kind("self_attn.qkv_proj", rows=_qkv_rows(0)),
            "k": Kind("self_attn.qkv_proj", rows=_qkv_rows(1)),
            "v": Kind("self_attn.qkv_proj", rows=_qkv_rows(2)),
            "gate": Kind("mlp.gate_up_proj", rows=_half_rows(0)),
            "up": Kind("mlp.gate_up_proj", rows=_half_rows(1))},
    gguf={"qkv": "attn_qkv", "o": "attn_output", "gate_up": "ffn_up", "down": "ffn_down"},
    sliding_layers=layer_types_sliding,
    norms={"qkv": "input_layernorm", "gate_up": "post_attention_layernorm"}))
register_family(Family(
    "gpt_neox", "gpt_neox.layers", {"qkv": "attention.query_key_value", "o": "attention.dense",
                                    "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
    tail=("gpt_neox.final_layer_norm",), attention="attention", model_types=("gpt_neox",),
    examples="GPT-NeoX, Pythia",
    slices={"q": Kind("attention.query_key_value", rows=_neox_rows(0)),
            "k": Kind("attention.query_key_value", rows=_neox_rows(1)),
            "v": Kind("attention.query_key_value", rows=_neox_rows(2))},
    gguf={"qkv": "attn_qkv", "o": "attn_output", "up": "ffn_up", "down": "ffn_down"},
    norms={"qkv": "input_layernorm", "up": "post_attention_layernorm"}))
register_family(Family(
    "gpt2", "transformer.h", {
        "qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    transposed=True, tail=("transformer.ln_f",), attention="attn", model_types=("gpt2",),
    slices={"q": Kind("attn.c_attn", rows=_qkv_rows(0)), "k": Kind("attn.c_attn", rows=_qkv_rows(1)),
            "v": Kind("attn.c_attn", rows=_qkv_rows(2))},
    gguf={"qkv": "attn_qkv", "o": "attn_output", "up": "ffn_up", "down": "ffn_down"},
    examples="GPT-2", norms={"qkv": "ln_1", "up": "ln_2"}))
register_family(Family(
    "opt", "model.decoder.layers", {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
    tail=("model.decoder.final_layer_norm", "model.decoder.project_out"), model_types=("opt",),
    gguf={"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "up": "ffn_up",
          "down": "ffn_down"}, examples="OPT",
    # pre-norm OPT only: with do_layer_norm_before off (OPT-350m) the norms come after
    norms=lambda c: ({"q": "self_attn_layer_norm", "k": "self_attn_layer_norm",
                      "v": "self_attn_layer_norm", "up": "final_layer_norm"}
                     if getattr(c, "do_layer_norm_before", True) else {})))
register_family(Family(
    "mixtral", "model.layers", {**_ATTN, **_MOE}, tail=("model.norm",), model_types=("mixtral",),
    gguf=_MOE_GGUF, examples="Mixtral", sliding_layers=layer_types_sliding,
    norms=_ATTN_NORMS, expert_input=moe_expert_input))
register_family(Family(
    "qwen3_moe", "model.layers", {**_LLAMA_KINDS, **_MOE}, tail=("model.norm",),
    model_types=("qwen3_moe",), gguf={**_LLAMA_GGUF, **_MOE_GGUF}, examples="Qwen3-MoE",
    sliding_layers=layer_types_sliding, norms=_LLAMA_NORMS, expert_input=moe_expert_input))
register_family(Family(
    "qwen2_moe", "model.layers", {**_LLAMA_KINDS, **_MOE,
                                  "shared.gate": "mlp.shared_expert.gate_proj",
                                  "shared.up": "mlp.shared_expert.up_proj",
                                  "shared.down": "mlp.shared_expert.down_proj",
                                  "shared.router": "mlp.shared_expert_gate"},
    tail=("model.norm",), model_types=("qwen2_moe",), gguf={**_LLAMA_GGUF, **_MOE_GGUF},
    examples="Qwen2-MoE", sliding_layers=layer_types_sliding, norms=_ATTN_NORMS,
    expert_input=moe_expert_input))

register_family(Family(
    "gpt_oss", "model.layers", {
        **_ATTN, "router": "mlp.router",
        "experts.gate": Kind("mlp.experts", "gate_up_proj", _interleaved_rows(0), experts=True,
                             transposed=True),
        "experts.up": Kind("mlp.experts", "gate_up_proj", _interleaved_rows(1), experts=True,
                           transposed=True),
        "experts.down": Kind("mlp.experts", "down_proj", experts=True, transposed=True)},
    tail=("model.norm",), model_types=("gpt_oss",), gguf=_MOE_GGUF, examples="gpt-oss",
    sliding_layers=layer_types_sliding, norms=_ATTN_NORMS, expert_input=gpt_oss_expert_input))


def family_for_type(model_type: str | None) -> Family | None:
    """The family registered for a ``config.model_type`` (None when there is none)."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def kinds_help(fam: Family | None) -> str:
    """The component help line for a family (the app shows it under the Components box)."""
    if fam is None:
        return "LAYERS.KIND, e.g. *.q,*.k,0-3.down"
    text = f"LAYERS.KIND; {fam.name} kinds: {', '.join(fam.kinds)}"
    if fam.slices:
        text += f"; slices: {', '.join(fam.slices)}"
    moe = [k.split('.', 1)[1] for k in fam.kinds if _kind(fam.kinds[k]).experts]
    if moe:
        text += f"; one expert: eN.{moe[-1]}, each expert: e*.{moe[-1]}"
    return text


def family_of(model) -> Family:
    """The first registered family whose layer list and every kind's module exist in the model."""
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    arch = type(model).__name__
    mt = getattr(getattr(model, "config", None), "model_type", "?")
    names = ", ".join(f"{f.name} ({f.examples})" if f.examples else f.name for f in FAMILIES)
    raise DTMError(f"Architecture {arch} (model_type '{mt}') is not supported: the supported "
                   f"families are {names}; a new family is one adapter entry (see 'How to add a "
                   "family' in docs/architecture.md).")
