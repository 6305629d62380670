"""A plan (component -> spec) in the formats of the tools that deploy models.

- ``llama.cpp``: ``--tensor-type REGEX=TYPE`` arguments for ``llama-quantize`` (llama.cpp applies
  every pattern with ``std::regex_search`` and the last match wins, so each pattern is anchored and
  names exactly its tensors: one per (tensor kind, type), e.g. ``^blk\\.(0|3|7)\\.attn_q\\.weight$``)
  and the base ``--type``: the working dtype, so every tensor outside the plan stays as measured.
- ``llmcompressor``: a recipe YAML (one ``config_groups`` entry per quantization scheme, explicit
  module names as ``targets``, the kept components and ``lm_head`` under ``ignore``; pruning specs
  as one-shot pruning modifiers, one stage per sparsity).
- ``torchao``: an ``FqnToConfig`` JSON (module name -> config class and arguments) and a Python
  snippet that builds it and calls ``quantize_``.
- ``recipe``: our own recipe JSON (``--recipe`` loads it; so does the app).

Each writer checks the plan against the tool's vocabulary and says in one sentence what it cannot
express (llama.cpp has no sparse tensors; torchao's ``quantize_`` does not prune).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from dtm_core.planning.allocation import KEEP
from dtm_core.errors import DTMError
from dtm_core.models.families import family_named
from dtm_core.compression.methods import parse_spec

EXPORTS = ("llama.cpp", "llmcompressor", "torchao", "recipe")
_GGUF_BASE = {32: "F32", 16: "F16"}


def _split(name: str) -> tuple[int, str]:
    layer, kind = name.split(".", 1)
    return int(layer), kind


def llama_cpp_arguments(assignments: dict[str, str], family="llama", dtype_bits: int = 16,
                        bf16: bool = False) -> dict:
    """``tensor_types`` (``--tensor-type`` arguments, one per tensor kind and type), ``base_type``
    and the ``command`` line of llama-quantize for a plan."""
    fam = family_named(family)
    groups: dict[tuple[str, str], list[int]] = {}
    for name, spec in assignments.items():
        if spec == KEEP:
            continue
        qtype = parse_spec(spec).llama_cpp_type()
        if qtype is None:
            raise DTMError(f"llama.cpp has no tensor type for '{spec}' (it stores no sparse "
                           "tensors): export this plan as a recipe or llmcompressor, or --save "
                           "the compressed model.")
        layer, kind = _split(name)
        tensor = fam.gguf_tensor(layer, kind)          # names its own error
        kind_part = tensor.split(".", 2)[2]            # "attn_q.weight"
        groups.setdefault((kind_part, qtype), []).append(layer)
    args = []
    for (kind_part, qtype), layers in groups.items():
        alt = "|".join(str(x) for x in sorted(set(layers)))
        layers_re = alt if len(set(layers)) == 1 else f"({alt})"
        args.append(f"--tensor-type ^blk\\.{layers_re}\\.{re.escape(kind_part)}$={qtype}")
    base = "BF16" if bf16 else _GGUF_BASE.get(dtype_bits, "F16")
    cmd = " ".join(["llama-quantize"] + [f"--tensor-type {shlex.quote(a.split(' ', 1)[1])}"
                                         for a in args]
                   + ["MODEL-F16.gguf", "MODEL-PLAN.gguf", base])
    return {"tensor_types": args, "base_type": base, "command": cmd}


def tensor_type_patterns(arguments: list[str]) -> list[tuple[str, str]]:
    """(regex, type) of each ``--tensor-type REGEX=TYPE`` argument (the first '=' splits, as
    llama.cpp's parser does)."""
    out = []
    for a in arguments:
        body = a.split(" ", 1)[1] if a.startswith("--tensor-type ") else a
        pattern, _, qtype = body.partition("=")
        out.append((pattern, qtype))
    return out


# -- llm-compressor ------------------------------------------------------------------------------

def _module_path(model, name: str) -> list[str]:
    from dtm_core.models.components import resolve

    comps = resolve(model, name)
    for c in comps:
        if c.rows is not None or c.experts is not None:
            raise DTMError(f"{name} is part of a fused or expert weight; llm-compressor and "
                           "torchao configure whole modules, so this plan cannot be exported to "
                           "them (use the recipe export).")
    return [c.path for c in comps]


def llmcompressor_recipe(model, assignments: dict[str, str]) -> dict:
    """The recipe as a dict (``yaml.safe_dump`` writes it): each method says how llm-compressor
    expresses it (:meth:`~dtm_core.compression.methods.base.Method.llmcompressor_scheme`)."""
    kept = [p for n, s in assignments.items() if s == KEEP for p in _module_path(model, n)]
    ignore = ["lm_head"] + kept
    quant: dict[str, dict] = {}
    stages: dict[str, dict] = {}
    for spec in dict.fromkeys(s for s in assignments.values() if s != KEEP):
        scheme = parse_spec(spec).llmcompressor_scheme()
        if scheme is None:
            raise DTMError(f"llm-compressor has no modifier for '{spec}'; export this plan as a "
                           "recipe.")
        targets = [p for n, s in assignments.items() if s == spec for p in _module_path(model, n)]
        if "group" in scheme:
            mod = quant.setdefault(scheme["modifier"], {"ignore": ignore, "config_groups": {}})
            mod.update(scheme.get("modifier_args", {}))
            group = {"targets": targets, **scheme["group"]}
            # a scheme that is one of compressed-tensors' presets is named by it (NVFP4A16, ...)
            key = scheme.get("preset")
            if key is None or key in mod["config_groups"]:
                key = f"group_{len(mod['config_groups'])}"
            mod["config_groups"][key] = group
        else:
            stages[f"sparsity_stage_{len(stages)}"] = {"sparsity_modifiers": {
                scheme["modifier"]: {"targets": targets, "ignore": ignore, **scheme["args"]}}}
    if quant:
        stages["quant_stage"] = {"quant_modifiers": quant}
    return stages


# -- torchao ---------------------------------------------------------------------------------------

def torchao_config(model, assignments: dict[str, str]) -> dict:
    """``{"fqn_to_config": {module: {"config": class name, "kwargs": {...}}}}`` (kept modules map
    to null, so a ``_default`` the user adds never touches them); each method says its config
    (:meth:`~dtm_core.compression.methods.base.Method.torchao_config`)."""
    out: dict[str, dict | None] = {}
    for name, spec in assignments.items():
        paths = _module_path(model, name)
        cfg = None if spec == KEEP else parse_spec(spec).torchao_config()
        if cfg is None and spec != KEEP:
            raise DTMError(f"torchao's quantize_ has no config for '{spec}' (it does not prune); "
                           "export this plan as a recipe or llmcompressor.")
        out.update({p: cfg for p in paths})
    return {"version": 1, "fqn_to_config": out}


TORCHAO_SNIPPET = '''"""Apply a DTM Inspector plan with torchao (pip install torchao).

GPTQ/AWQ specs map to the same grid here, applied with round-to-nearest: quantize the model that
`python -m dtm_core plan ... --save DIR` wrote (its weights already lie on the plan's grid).
"""
import json
import sys

import torch
import torchao.quantization as tq
from torchao.quantization import (FqnToConfig, IntxWeightOnlyConfig, MappingType, PerAxis,
                                  PerGroup, quantize_)


def float_config(entry):
    """The FP8 / NVFP4 / MX configs (NVFP4 and MX live in torchao.prototype.mx_formats; their
    kernels need a recent NVIDIA GPU)."""
    name, kw = entry["config"], dict(entry["kwargs"])
    if "granularity" in kw:
        kw["granularity"] = {"PerRow": tq.PerRow, "PerTensor": tq.PerTensor}[
            next(iter(kw["granularity"]))]()
    for k in ("activation_dtype", "weight_dtype"):
        if k in kw:
            kw[k] = getattr(torch, kw[k])
    if hasattr(tq, name):
        return getattr(tq, name)(**kw)
    import torchao.prototype.mx_formats as mx
    return getattr(mx, name)(**kw)


def plan_config(path="torchao_plan.json"):
    with open(path) as fh:
        entries = json.load(fh)["fqn_to_config"]
    configs = {}
    for fqn, entry in entries.items():
        if entry is None:
            configs[fqn] = None
        elif entry["config"] != "IntxWeightOnlyConfig":
            configs[fqn] = float_config(entry)
        else:
            kw = entry["kwargs"]
            gran = kw["granularity"]
            configs[fqn] = IntxWeightOnlyConfig(
                weight_dtype=getattr(torch, kw["weight_dtype"]),
                granularity=PerGroup(gran["PerGroup"]) if "PerGroup" in gran
                else PerAxis(gran["PerAxis"]),
                mapping_type=getattr(MappingType, kw["mapping_type"]))
    return FqnToConfig(fqn_to_config=configs)


if __name__ == "__main__":
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    quantize_(model, plan_config(), filter_fn=None)
    print(model)
'''


# -- writing -----------------------------------------------------------------------------------

def export_plan(plan, kind: str, folder, model=None, bf16: bool = False) -> list[Path]:
    """Write ``plan`` (a :class:`~dtm_core.planning.budget_plan.BudgetPlan` or anything with
    ``assignments``, ``family``, ``dtype_bits`` and ``recipe``) for ``kind`` into ``folder``;
    the files written."""
    if kind not in EXPORTS:
        raise DTMError(f"Unknown export '{kind}': use one of {', '.join(EXPORTS)}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = plan.assignments
    if kind != "recipe" and plan.recipe.has_cache_specs:
        raise DTMError(f"This plan sets KV-cache formats layer by layer; {kind} takes one cache "
                       "type for the whole model (llama.cpp --cache-type-k/-v, llm-compressor's "
                       "kv_cache_scheme, vLLM --kv-cache-dtype), so export it as a recipe.")
    if kind == "recipe":
        p = folder / "recipe.json"
        p.write_text(json.dumps({"recipe": plan.recipe.to_json()}, indent=2), encoding="utf-8")
        return [p]
    if kind == "llama.cpp":
        got = llama_cpp_arguments(a, plan.family, plan.dtype_bits, bf16)
        args = folder / "llama_cpp_tensor_types.txt"
        args.write_text("\n".join(got["tensor_types"]) + "\n", encoding="utf-8")
        sh = folder / "llama-quantize.sh"
        sh.write_text("#!/bin/sh\n# DTM Inspector plan: every tensor outside the plan keeps the "
                      f"base type {got['base_type']} (the working dtype it was measured in).\n"
                      "# llama.cpp's block formats (q4_0: 32 weights per scale, K-quants) are "
                      "close to, not the same as, the plan's grids.\n"
                      'exec ' + got["command"].replace("MODEL-F16.gguf", '"$1"')
                      .replace("MODEL-PLAN.gguf", '"$2"') + "\n", encoding="utf-8")
        return [args, sh]
    if model is None:
        raise DTMError(f"The {kind} export needs the model (its module names).")
    if kind == "llmcompressor":
        import yaml

        p = folder / "recipe.yaml"
        p.write_text("# DTM Inspector plan for llm-compressor (oneshot(model, recipe=...))\n"
                     + yaml.safe_dump(llmcompressor_recipe(model, a), sort_keys=False),
                     encoding="utf-8")
        return [p]
    cfg = folder / "torchao_plan.json"
    cfg.write_text(json.dumps(torchao_config(model, a), indent=2), encoding="utf-8")
    snippet = folder / "apply_torchao.py"
    snippet.write_text(TORCHAO_SNIPPET, encoding="utf-8")
    return [cfg, snippet]
