"""The whole checkpoint: loading one that transformers cannot run here (de-quantized into the base
architecture), finishing one it loaded, one sentence for one it cannot, and whether it is a
compression of a given base (configs and tensor shapes compared)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from dtm_core.errors import DTMError
from dtm_core.models.checkpoints.base import _QPARAMS, _SHAPE_KEYS, FORMATS, CheckpointWeights, quant_method


def load_dequantized(path: Path, config: dict, weights: CheckpointWeights, dtype: torch.dtype,
                     device: torch.device, trust_remote_code: bool = False):
    """(tokenizer, model) of a checkpoint that transformers cannot load here: the base
    architecture from its config, every tensor from :class:`CheckpointWeights`, handed to
    transformers as a state dict (so its own conversions apply: experts stored one module each
    are fused as the architecture wants them, tied weights are tied)."""
    from transformers import AutoTokenizer

    FORMATS[quant_method(config)].requirements()
    model = weights.as_model(dtype, trust_remote_code)
    for name, mod in model.named_modules():     # the format's activation quantization
        hook = weights.input_hook(name)
        if hook is not None:
            mod.register_forward_pre_hook(hook)
    model.to(device)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return tok, model


def finish_load(model) -> None:
    """After transformers loaded a compressed-tensors checkpoint: decompress its weights now
    (the library would on the first forward), keeping its activation quantization."""
    q = getattr(model, "hf_quantizer", None)
    comp = getattr(q, "compressor", None)
    if comp is not None and hasattr(comp, "decompress_model"):
        if any(str(getattr(m, "quantization_status", "")) == "QuantizationStatus.COMPRESSED"
               or getattr(getattr(m, "quantization_status", None), "value", None) == "compressed"
               for m in model.modules()):
            from dtm_core.models.checkpoints.compressed_tensors import exact_fp4_weights

            exact = exact_fp4_weights(model)
            comp.decompress_model(model)
            for m, w in exact.items():       # FP4 weights as the format defines them
                m.weight.data = w.to(m.weight.device)
    # some decompressors (NVFP4's, MX's) hand back bfloat16 weights whatever the model's dtype
    # is: the forward would mix dtypes, so they are cast (exactly) to the model's
    dtype = model.get_input_embeddings().weight.dtype
    for m in model.modules():
        w = getattr(m, "weight", None)
        if (getattr(m, "quantization_scheme", None) is not None and isinstance(w, torch.Tensor)
                and w.is_floating_point() and w.dtype != dtype):
            m.weight.data = w.data.to(dtype)


def explain_load_error(source: str, config: dict, exc: BaseException) -> DTMError | None:
    """One sentence for a checkpoint that the installed stack cannot run here."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    method = quant_method(config)
    m = re.search(r"[Rr]equires? (?:the )?`?([A-Za-z0-9_.-]+)`?\s*(>=\s*[\d.]+)?", msg)
    if "GPU is required" in msg or "CUDA" in msg and "required" in msg:
        return DTMError(f"The {method} checkpoint '{source}' needs a CUDA GPU to run its kernels, "
                        "and none is available here.")
    if isinstance(exc, ImportError) or m:
        pkg = m.group(1) if m else msg
        return DTMError(f"The {method} checkpoint '{source}' needs {pkg}"
                        f"{' ' + m.group(2).replace(' ', '') if m and m.group(2) else ''}, which "
                        f"the installed stack lacks here ({msg.rstrip('.')}).")
    return None


# ---------------------------------------------------------------------------------------------
# Is it a compression of the base?


def config_differences(dense_cfg, comp_cfg) -> list[str]:
    """What differs between two configs in architecture and shapes, in words."""
    out = []
    a = dense_cfg.to_dict() if hasattr(dense_cfg, "to_dict") else dict(dense_cfg)
    b = comp_cfg.to_dict() if hasattr(comp_cfg, "to_dict") else dict(comp_cfg)
    if a.get("model_type") != b.get("model_type"):
        out.append(f"architecture {b.get('model_type')} against the base's {a.get('model_type')}")
    for k in _SHAPE_KEYS:
        if k in a and k in b and a[k] != b[k]:
            out.append(f"{k} {b[k]} against the base's {a[k]}")
    return out


def shape_differences(dense: torch.nn.Module, comp: torch.nn.Module) -> list[str]:
    """Parameters missing on either side or shaped differently (after de-quantization)."""
    dp = dict(dense.named_parameters())
    cp = dict(comp.named_parameters())
    out = []
    missing = [n for n in dp if n not in cp and not n.endswith("lm_head.weight")]
    extra = [n for n in cp if n not in dp and not n.endswith(_QPARAMS)]
    if missing:
        out.append(f"{len(missing)} of the base's tensors are missing (e.g. {missing[0]})")
    if extra:
        out.append(f"{len(extra)} tensors the base lacks (e.g. {extra[0]})")
    for n, t in dp.items():
        c = cp.get(n)
        if c is None or type(c).__name__ in ("Params4bit", "Int8Params"):
            continue
        if tuple(c.shape) != tuple(t.shape):
            out.append(f"{n} is {tuple(c.shape)} against the base's {tuple(t.shape)}")
            break
    return out
