"""A GGUF de-quantized tensor by tensor into safetensors shards (the cache the loader reads).

transformers' own GGUF loading de-quantizes every tensor into one float32 state dict, builds the
model beside it and (for our cache) serializes it again: about 2.3x the loaded model at its peak.
Here each tensor is de-quantized with gguf's own ``dequantize``, renamed and reshaped by the same
transformers code (its architecture's ``TensorProcessor`` and ``get_gguf_hf_weights_map``), and
written into the shard being filled; a shard is written out as soon as it holds ``shard_bytes``.
So building the cache holds one shard and one tensor at a time, and loading the model from it
(memory-mapped shards, the weights cast to the target dtype) holds the model plus one shard.

Architectures that transformers loads through its newer GGUF path (weights kept packed, converted
by its weight-conversion operations) are left to it: :func:`streamable` tells them apart.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import torch

SHARD_BYTES = 64 << 20


def _arch(path: Path) -> str:
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    return read_field(GGUFReader(str(path)), "general.architecture")[0]


def streamable(path: Path) -> bool:
    """Whether the GGUF's architecture goes through transformers' tensor-processor loader (the
    one this module follows); False for the architectures of its newer packed path."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return True
    return not is_gguf_arch_supported(_arch(path))


ROWS_BYTES = 8 << 20


def _dequantized(t, dequantize) -> np.ndarray:
    """A GGUF tensor de-quantized to float32 rows at a time (gguf's ``dequantize`` of a whole
    embedding holds several float32 temporaries of its size); the same values, since a row is
    a whole number of blocks."""
    data = t.data
    if data.ndim < 2 or data.shape[0] < 2 or data.nbytes <= ROWS_BYTES:
        return np.array(dequantize(data, t.tensor_type), dtype=np.float32, copy=True)
    first = dequantize(data[:1], t.tensor_type)
    out = np.empty((data.shape[0],) + first.shape[1:], dtype=np.float32)
    step = max(1, ROWS_BYTES // max(1, first.nbytes))
    for a in range(0, data.shape[0], step):
        out[a:a + step] = dequantize(data[a:a + step], t.tensor_type)
    return out


def write_cache(path: Path, out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """The de-quantized float32 weights of the GGUF at ``path`` as sharded safetensors with their
    index, its config and its tokenizer, in the folder ``out``: what
    ``from_pretrained(folder, gguf_file=...)`` followed by ``save_pretrained`` writes."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint, read_field)

    out.mkdir(parents=True, exist_ok=True)
    # the tokenizer and the config first, their parsed metadata released before any tensor
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(out)
    del tok
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    parsed = {"config": load_gguf_checkpoint(str(path), return_tensors=False).get("config", {})}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gc.collect()
    reader = GGUFReader(str(path))
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    parsed["tensors"] = {}            # where processors that stack tensors (experts) build them
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    sizes = [0, 0]                    # bytes in the current shard, in all shards

    def flush():
        if not shard:
            return
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = name
        shard.clear()
        sizes[0] = 0
        gc.collect()

    for t in reader.tensors:
        w = _dequantized(t, dequantize)
        res = processor.process(weights=w, name=t.name, tensor_key_mapping=mapping,
                                parsed_parameters=parsed)
        if res.name is None or res.name not in mapping:
            continue
        x = torch.from_numpy(res.weights if res.weights is w and w.flags.owndata
                             else np.copy(res.weights))
        shard[mapping[res.name]] = x
        sizes[0] += x.numel() * x.element_size()
        sizes[1] += x.numel() * x.element_size()
        del w, res, x
        if sizes[0] >= shard_bytes:
            flush()
    for k, x in parsed["tensors"].items():      # stacked by the processor: complete only now
        shard[k] = x
        sizes[1] += x.numel() * x.element_size()
    parsed["tensors"] = {}
    flush()
    total = len(set(weight_map.values()))
    renamed = {}
    for i, name in enumerate(sorted(set(weight_map.values())), 1):
        new = f"model-{i:05d}-of-{total:05d}.safetensors"
        (out / name).rename(out / new)
        renamed[name] = new
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sizes[1]},
         "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}, indent=2))
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32                   # what the weights are stored in
    config.save_pretrained(out)
    try:
        from transformers import GenerationConfig
        GenerationConfig.from_model_config(config).save_pretrained(out)
    except Exception:  # noqa: BLE001 - an optional file
        pass
