"""Small compressed checkpoints written in the tests themselves, each with its format's own writer
where one can run here:

- compressed-tensors: the library's own lifecycle (apply_quantization_config, qparams from the
  library's calculate_qparams on min/max, ModelCompressor.compress_model, update_config), as
  llm-compressor does it without its observers;
- bitsandbytes and torchao: transformers' quantizers on load, then save_pretrained;
- GPTQ (GPTQModel / AutoGPTQ layout) and AutoAWQ GEMM: their packers cannot be installed next to
  the pinned torch, so the packing loops below follow GPTQModel's ``PackableQuantLinear.pack`` and
  AutoAWQ's ``WQLinear_GEMM.from_linear`` bit for bit (one value per loop step, no vectorized
  shortcut), and each writer returns the integer weights, zero points and scales it packed so a
  test can check the reader against ``(q - z) * s`` computed from them directly.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 49152


def base_model(folder: Path, seed: int = 0, layers: int = 2, scale: float = 4.0,
               family: str = "llama", intermediate: int = 128, hidden: int = 64):
    """A tiny random model with the default model's tokenizer, saved as a transformers folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "qwen3_moe":
        kw.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)
    if family == "gpt_oss":
        kw.update(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                  sliding_window=8, layer_types=["sliding_attention", "full_attention"] * layers,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        kw["layer_types"] = kw["layer_types"][:layers]
    cfg = AutoConfig.for_model(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    return model


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The default model's tokenizer (read from its GGUF once per test process)."""
    from transformers import AutoTokenizer

    from dtm_core.models.load import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (dst / f.name).write_bytes(f.read_bytes())


# ---------------------------------------------------------------------------------------------
# compressed-tensors


def write_ct(base: Path, out: Path, scheme: str = "W4A16", group_size: int | None = 32,
             ignore=("lm_head",), input_scale: float = 0.05, targets=("Linear",)):
    """A compressed-tensors checkpoint of the model in ``base`` with a preset scheme."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                 apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    sch = preset_name_to_scheme(scheme, list(targets))
    if sch.weights is not None and sch.weights.group_size and group_size:
        sch.weights.group_size = group_size
    config = QuantizationConfig(config_groups={"group_0": sch}, ignore=list(ignore))
    apply_quantization_config(model, config)
    fused = _fused_global_scales(model)
    for name, mod in model.named_modules():
        s = getattr(mod, "quantization_scheme", None)
        if s is None:
            continue
        w = mod.weight.data
        a = s.weights
        strat = str(getattr(a.strategy, "value", a.strategy))
        gscale = None
        if strat == "tensor_group":      # NVFP4: the global scale its fused group shares
            gscale = fused.get(name)
            if gscale is None:
                gscale = generate_gparam(w.amin().reshape(1, 1), w.amax().reshape(1, 1))
            mod.weight_global_scale.data = gscale.reshape(mod.weight_global_scale.shape).to(
                mod.weight_global_scale.dtype).clone()
        if strat in ("group", "tensor_group"):
            v = w.view(w.shape[0], -1, a.group_size)
            lo, hi = v.amin(-1), v.amax(-1)
        elif strat == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif strat == "block":
            bh, bw = a.block_structure
            v = maybe_pad_tensor_for_block_quant(w, a.block_structure)
            v = v.reshape(v.shape[0] // bh, bh, v.shape[1] // bw, bw)
            lo, hi = v.amin(dim=(1, 3)), v.amax(dim=(1, 3))
        else:
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        scale, zp = calculate_qparams(lo, hi, a, global_scale=gscale)
        mod.weight_scale.data = scale.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
        if hasattr(mod, "weight_zero_point"):
            mod.weight_zero_point.data = zp.reshape(mod.weight_zero_point.shape).to(
                mod.weight_zero_point.dtype)
        if s.input_activations is not None and not s.input_activations.dynamic:
            mod.input_scale.data.fill_(input_scale)
        if hasattr(mod, "input_global_scale"):   # NVFP4 activations: a static global scale
            mod.input_global_scale.data.fill_(1.0 / input_scale)
        mod.quantization_status = QuantizationStatus.FROZEN
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(out)
    comp.update_config(out)
    _copy_tokenizer(base, out)
    return out


def _fused_global_scales(model) -> dict:
    """NVFP4's global scale of each linear in a group llm-compressor fuses (q/k/v, gate/up): the
    library's generate_gparam of the group's joint min and max (llm-compressor's fused weight
    observers)."""
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    out = {}
    for name, mod in model.named_modules():
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if all(hasattr(mod, n) for n in group):
                ws = [getattr(mod, n).weight.data for n in group]
                g = generate_gparam(torch.stack([w.amin() for w in ws]).amin().reshape(1, 1),
                                    torch.stack([w.amax() for w in ws]).amax().reshape(1, 1))
                for n in group:
                    out[f"{name}.{n}"] = g
    return out


def write_ct_sparse(base: Path, out: Path, fmt: str = "sparse-24-bitmask"):
    """A sparse-only llm-compressor checkpoint as compressed-tensors < 0.15 wrote them (the
    layout of its Sparse24BitMaskTensor / BitmaskTensor: ``shape``, ``compressed`` values in
    row-major order, ``bitmask`` packed by the library's pack_bitmasks, ``row_offsets`` for the
    unstructured form); ``fmt`` "dense" stores the pruned weights plainly with the same metadata.
    2:4 keeps the two largest magnitudes of every four weights (the library's get_24_bytemasks);
    sparse-bitmask prunes half of each matrix by magnitude. Returns {module: pruned weight}."""
    from compressed_tensors.utils.helpers import pack_bitmasks
    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    pruned, tensors = {}, {}
    for name in list(state):
        if ".layers." not in name or not name.endswith("_proj.weight"):
            continue
        mod = name[:-len(".weight")]
        w = state.pop(name)
        if fmt == "sparse-bitmask":
            mask = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values
        else:
            four = w.reshape(-1, 4)
            mask = torch.zeros_like(four, dtype=torch.bool)
            mask.scatter_(1, four.abs().topk(2, dim=1).indices, True)
            mask = mask.view(w.shape)
        pruned[mod] = torch.where(mask, w, torch.zeros_like(w))
        if fmt == "dense":
            tensors[name] = pruned[mod]
            continue
        tensors[f"{mod}.shape"] = torch.tensor(list(w.shape)).reshape(-1, 1)
        values = w[mask]
        tensors[f"{mod}.compressed"] = (values if fmt == "sparse-bitmask"
                                        else values.reshape(w.shape[0], w.shape[1] // 2))
        tensors[f"{mod}.bitmask"] = pack_bitmasks(mask)
        if fmt == "sparse-bitmask":
            tensors[f"{mod}.row_offsets"] = torch.cumsum(mask.sum(1), 0) - mask.sum(1)
    out.mkdir(parents=True, exist_ok=True)
    save_file({**state, **tensors}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "dense", "quantization_status": "compressed",
        "sparsity_config": {"format": fmt, "global_sparsity": 0.5, "ignore": ["lm_head"],
                            "registry_requires_subclass": False, "targets": ["Linear"],
                            "sparsity_structure": "unstructured" if fmt == "sparse-bitmask"
                            else "2:4"}}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "recipe.yaml").write_text("sparsity_stage:\n  sparsity_modifiers:\n"
                                     "    SparseGPTModifier:\n      sparsity: 0.5\n")
    _copy_tokenizer(base, out)
    return pruned


# ---------------------------------------------------------------------------------------------
# GPTQ (GPTQModel / AutoGPTQ)


def _rtn_params(w: torch.Tensor, bits: int, g_idx: torch.Tensor, groups: int, sym: bool):
    """Per-(group, output) scales and integer zero points from min/max of each group's columns."""
    maxq = 2 ** bits - 1
    out = w.shape[0]
    scales = torch.zeros(groups, out)
    zeros = torch.zeros(groups, out, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo = cols.amin(1).clamp(max=0)
        hi = cols.amax(1).clamp(min=0)
        if sym:
            m = torch.maximum(lo.abs(), hi)
            s = (2 * m / maxq).clamp(min=1e-8)
            z = torch.full((out,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            s = ((hi - lo) / maxq).clamp(min=1e-8)
            z = torch.round(-lo / s).to(torch.int64)
        scales[g] = s.half().float()
        zeros[g] = z
    q = torch.clamp(torch.round(w / scales[g_idx].t() + zeros[g_idx].t()), 0, maxq).to(torch.int64)
    return q, zeros, scales


def _pack_rows(ints: np.ndarray, bits: int) -> np.ndarray:
    """GPTQModel's qweight packing: rows of (in, out) ints into (in*bits/32, out) words."""
    pf = 32 // bits if bits in (2, 4, 8) else None
    rows_in = ints.shape[0]
    if pf is not None:
        qw = np.zeros((rows_in // pf, ints.shape[1]), dtype=np.uint32)
        for r in range(rows_in // pf):
            for j in range(pf):
                qw[r] |= ints[r * pf + j] << (bits * j)
        return qw
    qw = np.zeros((rows_in // 32 * 3, ints.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qw.shape[0]:
        for j in range(i, i + 10):
            qw[row] |= ints[j] << (3 * (j - i))
        i += 10
        qw[row] |= (ints[i] << 30) & 0xFFFFFFFF
        row += 1
        qw[row] |= (ints[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qw[row] |= ints[j] << (3 * (j - i) + 1)
        i += 10
        qw[row] |= (ints[i] << 31) & 0xFFFFFFFF
        row += 1
        qw[row] |= (ints[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qw[row] |= ints[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return qw


def write_gptq(base: Path, out: Path, bits: int = 4, group_size: int = 32, sym: bool = False,
               act_order: bool = False, v1: bool = True, seed: int = 0):
    """A GPTQ checkpoint of ``base`` (every decoder linear); returns {module: (q, z, s, g_idx)}."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    packed, truth = {}, {}
    for name in list(state):
        if ".layers." not in name or not name.endswith("_proj.weight"):
            continue
        mod = name[:-len(".weight")]
        w = state.pop(name).float()
        n_in = w.shape[1]
        groups = n_in // group_size
        if act_order:
            perm = torch.randperm(n_in, generator=gen)
            g_idx = torch.empty(n_in, dtype=torch.int64)
            g_idx[perm] = torch.arange(n_in) // group_size
        else:
            g_idx = torch.arange(n_in) // group_size
        q, z, s = _rtn_params(w, bits, g_idx, groups, sym)
        truth[mod] = (q, z, s, g_idx)
        stored_z = (z - 1) if v1 else z
        ints = q.t().numpy().astype(np.uint32)                       # (in, out)
        zeros = (stored_z.numpy().astype(np.int64) & (2 ** bits - 1)).astype(np.uint32)  # (groups, out)
        packed[f"{mod}.qweight"] = torch.from_numpy(_pack_rows(ints, bits).view(np.int32))
        packed[f"{mod}.qzeros"] = torch.from_numpy(
            _pack_rows(zeros.T.copy(), bits).T.copy().view(np.int32))
        packed[f"{mod}.scales"] = s.half()
        packed[f"{mod}.g_idx"] = g_idx.to(torch.int32)
    out.mkdir(parents=True, exist_ok=True)
    save_file({**state, **packed}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                  "desc_act": act_order, "sym": sym,
                                  "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    (out / "config.json").write_text(json.dumps(cfg))
    _copy_tokenizer(base, out)
    return truth


# ---------------------------------------------------------------------------------------------
# AutoAWQ (GEMM)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_awq_cols(ints: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM packing of (rows, cols) 4-bit ints into (rows, cols/8) words."""
    out = np.zeros((ints.shape[0], ints.shape[1] // 8), dtype=np.uint32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= ints[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return out


def write_awq(base: Path, out: Path, group_size: int = 32, zero_point: bool = True):
    """An AutoAWQ GEMM checkpoint of ``base``; returns {module: (q, z, s)} as (out, in) / groups."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    packed, truth = {}, {}
    for name in list(state):
        if ".layers." not in name or not name.endswith("_proj.weight"):
            continue
        mod = name[:-len(".weight")]
        w = state.pop(name).float()
        g_idx = torch.arange(w.shape[1]) // group_size
        q, z, s = _rtn_params(w, 4, g_idx, w.shape[1] // group_size, sym=not zero_point)
        truth[mod] = (q, z, s, g_idx)
        packed[f"{mod}.qweight"] = torch.from_numpy(
            _pack_awq_cols(q.t().numpy().astype(np.uint32)).view(np.int32))    # (in, out/8)
        packed[f"{mod}.qzeros"] = torch.from_numpy(
            _pack_awq_cols(z.numpy().astype(np.uint32)).view(np.int32))        # (groups, out/8)
        packed[f"{mod}.scales"] = s.half()                                    # (groups, out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({**state, **packed}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                  "zero_point": zero_point, "version": "gemm"}
    (out / "config.json").write_text(json.dumps(cfg))
    _copy_tokenizer(base, out)
    return truth


def expected_weight(q, z, s, g_idx) -> torch.Tensor:
    """(q - z) * s per element, the formats' definition, one group index per input column."""
    return (q - z[g_idx].t()).float() * s[g_idx].t()


# ---------------------------------------------------------------------------------------------
# bitsandbytes and torchao through transformers' own quantizers


def write_transformers_quantized(base: Path, out: Path, quantization_config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 quantization_config=quantization_config)
    model.save_pretrained(out)
    _copy_tokenizer(base, out)
    return out


def default_model_folder(folder: Path) -> Path:
    """The embedded default model (its de-quantized Q4_1 weights) as a transformers folder, the
    base that checkpoints of the default model are written from."""
    from dtm_core.models.load import load_model

    if not (folder / "config.json").is_file():
        lm = load_model("default", device="cpu")
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# NVIDIA ModelOpt


def write_modelopt(base: Path, out: Path, algo: str = "NVFP4", seed: int = 0) -> Path:
    """An NVIDIA ModelOpt export of the model in ``base`` (``algo`` NVFP4 or FP8): ModelOpt's own
    quantize (calibrated on a few random token sequences) and export_hf_checkpoint, on CPU."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    ids = torch.randint(3, 1000, (2, 16))
    cfg = {"NVFP4": mtq.NVFP4_DEFAULT_CFG, "FP8": mtq.FP8_DEFAULT_CFG}[algo]
    model = mtq.quantize(model, cfg, lambda m: m(ids))
    export_hf_checkpoint(model, dtype=torch.float32, export_dir=str(out))
    _copy_tokenizer(base, out)
    return out


# ---------------------------------------------------------------------------------------------
# transformers' MXFP4 (gpt-oss)


def write_transformers_mxfp4(base: Path, out: Path) -> Path:
    """A gpt-oss style MXFP4 checkpoint of the gpt-oss model in ``base``: every experts parameter
    quantized by compressed-tensors' MXFP4 preset (per 32 inputs: calculate_qparams on min/max,
    quantize, the library's pack_fp4_to_uint8 and compress_mx_scale) and laid out as transformers'
    Mxfp4 integration reads it (``*_blocks`` (experts, out, in / 32, 16), ``*_scales``
    (experts, out, in / 32)); transformers' own writer needs triton's kernels."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    args = PRESET_SCHEMES["MXFP4A16"]["weights"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = {}
    for name, t in model.state_dict().items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[name] = t.contiguous()
            continue
        blocks, scales = [], []
        for w in t.transpose(1, 2):                       # each expert's (out, in)
            v = w.reshape(w.shape[0], -1, args.group_size)
            scale, zp = calculate_qparams(v.amin(-1), v.amax(-1), args)
            q = quantize(w, scale, zp, args)
            blocks.append(pack_fp4_to_uint8(q).reshape(w.shape[0], -1, args.group_size // 2))
            scales.append(compress_mx_scale(scale, torch.uint8))
        state[f"{name}_blocks"] = torch.stack(blocks).contiguous()
        state[f"{name}_scales"] = torch.stack(scales).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(base, out)
    return out
