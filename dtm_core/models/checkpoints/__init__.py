"""Compressed checkpoints made by other tools: what they are, their weights de-quantized, and
whether they compress a given base.

A checkpoint is a transformers folder whose ``config.json`` carries a ``quantization_config``
(llm-compressor's compressed-tensors, GPTQModel/AutoGPTQ, AutoAWQ, bitsandbytes, torchao) or a
GGUF file. Each format is one :class:`Format` in :data:`FORMATS`, found by the config's
``quant_method``, in a module of its own here (:mod:`.compressed_tensors`, :mod:`.gptq`,
:mod:`.awq`, :mod:`.bitsandbytes`, :mod:`.torchao`, :mod:`.modelopt`,
:mod:`.mxfp4`); it knows the packages it needs, how to
describe its scheme, whether transformers can load it here, and how to read one module's weight
de-quantized to float32 (:class:`CheckpointWeights`, what ``from:PATH`` uses). :mod:`.base` holds
what they share, :mod:`.describe` says what a checkpoint is without loading it, and
:mod:`.loading` loads a whole one and checks it against its base.

Loading the whole checkpoint goes through the library that defines its format wherever the
installed stack runs it (compressed-tensors through transformers, with the activation quantization
that the format defines in the forward pass; bitsandbytes and torchao through transformers).
GPTQ and AWQ kernels come with gptqmodel, which cannot be installed next to the pinned torch, so
those checkpoints are de-quantized (AWQ by compressed-tensors' own AutoAWQ converter, GPTQ by
:func:`unpack_gptq`) into the base architecture: they are weight-only formats, so the forward pass
of the de-quantized model is the checkpoint's function up to the kernels' rounding.
"""
from dtm_core.models.checkpoints.base import (FORMATS, CheckpointInfo, CheckpointWeights, Format,
                                              PlainWeights, Shards, dequantized, disk_size,
                                              located, meta_model, quant_method, read_config,
                                              register_format)
# the formats register themselves on import
from dtm_core.models.checkpoints.compressed_tensors import (LEGACY_SPARSE, CompressedTensors,
                                                            CTWeights, ct_schemes)
from dtm_core.models.checkpoints.packed import PackedWeights, unpack_bits
from dtm_core.models.checkpoints.gptq import GPTQ, GPTQWeights, unpack_gptq
from dtm_core.models.checkpoints.awq import AWQ, AWQWeights
from dtm_core.models.checkpoints.bitsandbytes import BitsAndBytes, BnbWeights
from dtm_core.models.checkpoints.torchao import TorchAO
from dtm_core.models.checkpoints.modelopt import ModelOpt, ModelOptWeights
from dtm_core.models.checkpoints.mxfp4 import MXFP4Weights, TransformersMXFP4
from dtm_core.models.checkpoints.describe import fingerprint, inspect, resolve_source, stamp
from dtm_core.models.checkpoints.loading import (config_differences, explain_load_error,
                                                 finish_load, load_dequantized,
                                                 shape_differences)

__all__ = ["AWQ", "AWQWeights", "BitsAndBytes", "BnbWeights", "CTWeights", "CheckpointInfo",
           "CheckpointWeights", "CompressedTensors", "FORMATS", "Format", "GPTQ", "GPTQWeights",
           "LEGACY_SPARSE", "MXFP4Weights", "ModelOpt", "ModelOptWeights", "PackedWeights", "PlainWeights", "Shards", "TorchAO",
           "config_differences", "ct_schemes", "dequantized", "disk_size", "explain_load_error",
           "fingerprint", "finish_load", "inspect", "load_dequantized", "located", "meta_model",
           "quant_method", "read_config", "register_format", "resolve_source",
           "shape_differences", "stamp", "TransformersMXFP4", "unpack_bits", "unpack_gptq"]
