"""Write a re-quantized copy of a GGUF file (test scaffolding for two-GGUF pairs).

Every metadata field is copied; the decoder's 2-D weight tensors are de-quantized and quantized
again to ``qtype`` (e.g. Q4_0 or Q8_0) with gguf-py; other tensors are copied as they are.
"""
from __future__ import annotations

import numpy as np


def requantize(src: str, dst: str, qtype_name: str = "Q4_0") -> None:
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[qtype_name]
    reader = GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = GGUFWriter(dst, arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]   # numpy order
        data = t.data
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(shape) == 2 \
                and shape[-1] % block == 0:
            w = dequantize(data, t.tensor_type).reshape(shape).astype(np.float32)
            writer.add_tensor(t.name, quantize(w, qtype), raw_shape=quantize(w, qtype).shape,
                              raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
