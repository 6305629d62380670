"""FP8, NVFP4, MXFP4, MXFP8 and W4AFP8 specs against compressed-tensors, the reference that
defines them: weights bit for bit (random and real weights, every strategy, a partial last group),
the FP4 values against the E2M1 grid itself, NVFP4's global scale shared by the fused linears,
activation quantization against the library's own forward, and checkpoints written by the
library's own compressor equal to the spec's pair."""
import math

import pytest
import torch

from checkpoint_writers import base_model, write_ct
from dtm_core.compression.methods import parse_spec
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.errors import DTMError

from compressed_tensors.quantization import QuantizationStrategy as S  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.utils.helpers import (calculate_qparams,  # noqa: E402
                                                           generate_gparam)

SPECS = {"fp8": "FP8_DYNAMIC", "fp8:tensor": "FP8", "fp8:block128": "FP8_BLOCK",
         "nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "mxfp8": "MXFP8A16", "w4afp8": "W4AFP8"}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference(w: torch.Tensor, preset: str, gscale=None) -> torch.Tensor:
    """The library's chain for one weight, as llm-compressor runs it: min/max per tensor, channel,
    group or block, calculate_qparams (with generate_gparam's global scale for tensor groups) and
    fake_quantize. A partial last group is quantized as that group padded with zeros."""
    args = PRESET_SCHEMES[preset]["weights"]
    rows, cols = w.shape
    if args.strategy in (S.GROUP, S.TENSOR_GROUP):
        g = args.group_size
        if args.strategy == S.TENSOR_GROUP and gscale is None:
            gscale = generate_gparam(w.min().reshape(1, 1), w.max().reshape(1, 1))
        full = cols // g * g
        parts = []
        for part in (w[:, :full], w[:, full:]):
            if part.shape[1] == 0:
                continue
            n = part.shape[1]
            padded = torch.cat([part, torch.zeros(rows, (-n) % g)], 1)
            v = padded.reshape(rows, -1, g)
            scale, zp = calculate_qparams(v.amin(-1), v.amax(-1), args,
                                          global_scale=gscale if args.strategy == S.TENSOR_GROUP
                                          else None)
            out = fake_quantize(padded, scale, zp, args,
                                global_scale=gscale if args.strategy == S.TENSOR_GROUP else None)
            parts.append(out[:, :n])
        return torch.cat(parts, 1)
    if args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        padded = torch.zeros(math.ceil(rows / bh) * bh, math.ceil(cols / bw) * bw)
        padded[:rows, :cols] = w
        v = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
        scale, zp = calculate_qparams(v.amin(dim=(1, 3)), v.amax(dim=(1, 3)), args)
        return fake_quantize(w, scale, zp, args)
    if args.strategy == S.CHANNEL:
        scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    else:
        scale, zp = calculate_qparams(w.amin().reshape(1), w.amax().reshape(1), args)
    return fake_quantize(w, scale, zp, args)


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("shape", [(64, 128), (96, 200), (130, 300), (7, 16)])
def test_weights_equal_the_library_bit_for_bit(spec, shape):
    torch.manual_seed(hash((spec, shape)) % 2**31)
    w = torch.randn(*shape) * torch.rand(shape[0], 1) * 3
    w[0, :5] = 0.0         # zeros and a large outlier
    w[-1, -1] = 40.0
    got = parse_spec(spec).apply(w, {})
    assert got.dtype == torch.float32 and got.shape == w.shape
    assert torch.equal(got, reference(w, SPECS[spec]))


@pytest.mark.parametrize("top", [29, 35])
@pytest.mark.parametrize("spec", ["mxfp4", "mxfp8", "fp8:block128", "fp8", "nvfp4"])
def test_weights_across_the_float_range_equal_the_library(spec, top):
    """Rows from subnormal to 1e29 in magnitude (the MX shortcut) or to 1e35 (its fallback
    above 2^100), exactly as the library's chain gives them."""
    torch.manual_seed(3)
    w = torch.randn(40, 96) * torch.logspace(-44, top, 40)[:, None]
    w[5, :32] = 0.0
    assert torch.equal(parse_spec(spec).apply(w, {}), reference(w, SPECS[spec]))


def test_real_weights_equal_the_library(default_model):
    m = default_model.model.model.layers
    for w in (m[0].self_attn.q_proj.weight, m[7].mlp.down_proj.weight):
        w = w.detach().float()
        for spec, preset in SPECS.items():
            assert torch.equal(parse_spec(spec).apply(w, {}), reference(w, preset)), spec


@pytest.mark.parametrize("preset", ["MXFP4A16", "MXFP8A16"])
def test_mx_scales_equal_the_library_over_the_whole_float_range(preset):
    """The MX scales' integer shortcut against ``calculate_qparams``, bit for bit: zeros,
    subnormals, the thresholds where a group's max rounds up to the next power of two (1.75 for
    the E2M1 rounding of both formats), the largest floats (whose power of two is infinity) and
    200,000 random bit patterns of non-negative finite floats."""
    from dtm_core.compression.methods.formats import mx_scales

    args = PRESET_SCHEMES[preset]["weights"]
    edges = torch.tensor([0.0, 1e-45, 1e-40, 1.17e-38, 1e-30, 0.001, 0.5, 1.0, 1.74, 1.75, 1.76,
                          2.0, 3.5, 6.0, 448.0, 1e30, 3.0e38, 3.4e38])
    torch.manual_seed(0)
    bits = torch.randint(0, 0x7F800000, (200_000,), dtype=torch.int32).view(torch.float32)
    m = torch.cat([edges, bits, torch.rand(10_000) * 4])
    ref, _ = calculate_qparams(-m, m, args)
    got = mx_scales(m, args.num_bits)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    assert torch.isinf(got[len(edges) - 1]) and got[0] == 2.0 ** -127


@pytest.mark.parametrize("preset,part,gscale", [
    ("FP8", "weights", None), ("FP8_BLOCK", "weights", None), ("W4AFP8", "weights", None),
    ("NVFP4A16", "weights", 1.0), ("NVFP4A16", "weights", 2688.0 / 0.37),
    ("NVFP4A16", "weights", 1e-20), ("W8A8", "weights", None)])
def test_symmetric_scales_equal_the_library_over_the_whole_float_range(preset, part, gscale):
    """The symmetric scales' short path against ``calculate_qparams(-m, m, ...)``, bit for bit:
    zeros (replaced by the dtype's eps), subnormals, values whose FP8 scale underflows or
    overflows (clamped), infinity and 200,000 random bit patterns of non-negative floats."""
    from dtm_core.compression.methods.formats import symmetric_scales

    args = PRESET_SCHEMES[preset][part]
    edges = torch.tensor([0.0, 1e-45, 1e-40, 1.17e-38, 1e-30, 0.001, 0.5, 1.0, 6.0, 448.0,
                          2688.0, 1e30, 3.4e38, float("inf")])
    torch.manual_seed(1)
    bits = torch.randint(0, 0x7F800000, (200_000,), dtype=torch.int32).view(torch.float32)
    m = torch.cat([edges, bits, torch.rand(10_000) * 4]).reshape(-1, 1)
    g = None if gscale is None else torch.tensor([gscale])
    ref, _ = calculate_qparams(-m, m, args, global_scale=g)
    got = symmetric_scales(m, args, g)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


def test_gparam_equals_the_library_over_the_whole_float_range():
    from dtm_core.compression.methods.formats import gparam_of

    torch.manual_seed(2)
    bits = torch.randint(0, 0x7F800000, (2000,), dtype=torch.int32).view(torch.float32)
    for t in torch.cat([torch.tensor([0.0, 1e-45, 1e-40, 1e-38, 0.37, 3e4, 3.4e38,
                                      float("inf"), float("nan")]), bits]):
        ref = generate_gparam(-t.reshape(1, 1), t.reshape(1, 1))
        got = gparam_of(t)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), float(t)


@pytest.mark.parametrize("size,left_out", [(1e3, True), (0.2, False), (1e-3, True), (None, False)])
def test_nvfp4_range_clamp_is_left_out_only_where_rounding_stays_in_range(size, left_out):
    """NVFP4 under a global scale from a far larger fused neighbour (max |w| 3e4): weights of
    ordinary size keep normal FP8 group scales and leave the clamp out; smaller ones (0.2) get
    subnormal FP8 scales and keep it; tiny ones (1e-3) only zero scales, replaced by eps, which
    is safe; rows from 1e-4 to 1e3 mix all three and keep it. Either way, every value equals the
    library's, and no FP4 value leaves [-6, 6]."""
    from dtm_core.compression.methods import formats as F

    torch.manual_seed(7)
    args = PRESET_SCHEMES["NVFP4A16"]["weights"]
    rows = torch.logspace(-4, 3, 96)[:, None] if size is None else torch.rand(96, 1) * size
    w = torch.randn(96, 200) * rows
    g = generate_gparam(torch.tensor([[-3e4]]), torch.tensor([[3e4]]))
    _, hi = F.observe(F._pad_last(w, 16), args)
    scale8 = F.symmetric_scales(hi, args, g)
    assert F.e2m1_stays_in_range(scale8, float(hi.max()) * float(g) / 6) == left_out
    got = F.fake_quantize_weight(w, args, g)
    assert torch.equal(got, reference(w, "NVFP4A16", gscale=g))
    q = F._pad_last(got, 16).unflatten(-1, (-1, 16)) / (scale8 / g).unsqueeze(-1)
    assert float(q.abs().max()) <= 6.0 * (1 + 1e-6)        # (the re-division rounds)


@pytest.mark.parametrize("spec", ["nvfp4", "mxfp4"])
def test_fp4_values_are_the_nearest_e2m1_points_of_each_group(spec):
    """The obviously-correct definition, group by group: every value is scale x the E2M1 point
    nearest to w / scale (scale: the FP8-rounded absmax / 6 under the global scale for NVFP4, the
    power of two that brings the group's absmax into range for MXFP4)."""
    torch.manual_seed(1)
    w = torch.randn(8, 96) * 2
    out = parse_spec(spec).apply(w, {})
    g = 16 if spec == "nvfp4" else 32
    grid = torch.cat([-E2M1.flip(0), E2M1])
    gs = 448.0 * 6.0 / w.abs().max()
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x, y = w[r, c:c + g].double(), out[r, c:c + g].double()
            amax = x.abs().max()
            if spec == "nvfp4":
                s8 = torch.tensor(float(gs * amax / 6.0)).to(torch.float8_e4m3fn).double()
                scale = s8 / gs.double()
            else:
                e = torch.floor(torch.log2(amax))
                scale = 2.0 ** (e - 2 + (amax / 2.0 ** e >= 1.75).double())
            q = x / scale
            nearest = grid.double()[(q[:, None] - grid.double()[None, :]).abs().argmin(1)]
            assert torch.allclose(y, nearest * scale, rtol=0, atol=1e-6 * float(scale)), (r, c)
            assert (y.abs() <= 6.0 * scale * (1 + 1e-6)).all()


def test_nvfp4_global_scale_is_shared_by_the_fused_linears(tmp_path):
    """q alone equals q of q/k/v together (the checkpoint's), and both use the global scale of
    the three; gate and up likewise; o and down have their own."""
    from conftest import make_tiny

    lm = make_tiny("llama", scale=4.0)
    attn = lm.model.model.layers[1].self_attn
    with torch.no_grad():
        attn.k_proj.weight[0, 0] = 50.0     # k holds the group's maximum
    q, k, v = (attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone(),
               attn.v_proj.weight.detach().clone())
    alone = make_pair(lm, Recipe.single("nvfp4", "1.q"))
    together = make_pair(lm, Recipe.single("nvfp4", "1.q,1.k,1.v,1.o"))
    qa = alone.compressed.model.layers[1].self_attn.q_proj.weight
    qt = together.compressed.model.layers[1].self_attn
    g = generate_gparam(torch.stack([q.min(), k.min(), v.min()]).min().reshape(1, 1),
                        torch.stack([q.max(), k.max(), v.max()]).max().reshape(1, 1))
    assert torch.equal(qa, qt.q_proj.weight)
    assert torch.equal(qa, reference(q, "NVFP4A16", g))
    assert not torch.equal(qa, reference(q, "NVFP4A16"))     # the fusion changed something
    o = attn.o_proj.weight.detach()
    assert torch.equal(qt.o_proj.weight, reference(o, "NVFP4A16"))


def test_nvfp4_slice_of_a_fused_weight_uses_the_whole_modules_global_scale():
    from test_families import make

    lm = make("phi3")
    pair = make_pair(lm, Recipe.single("nvfp4", "0.q"))
    full = lm.model.model.layers[0].self_attn.qkv_proj.weight.detach()
    got = pair.compressed.model.layers[0].self_attn.qkv_proj.weight
    g = generate_gparam(full.min().reshape(1, 1), full.max().reshape(1, 1))
    q = lm.model.config.hidden_size      # the q rows of qkv_proj
    assert torch.equal(got[:q], reference(full[:q], "NVFP4A16", g))
    assert not torch.equal(got[:q], reference(full[:q], "NVFP4A16"))
    assert torch.equal(got[q:], full[q:])


@pytest.mark.parametrize("spec,preset", [("fp8:dyn", "FP8_DYNAMIC"),
                                         ("fp8:block128:dyn", "FP8_BLOCK"),
                                         ("w4afp8", "W4AFP8"), ("nvfp4:a", "NVFP4")])
def test_activation_quantization_equals_the_library_forward(spec, preset):
    """The pre-hook's output equals compressed-tensors' own forward_quantize of the module's
    input under the preset's activation arguments (NVFP4: with the static global scale of the
    calibration inputs' range)."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    torch.manual_seed(2)
    x = torch.randn(2, 7, 256) * 3
    sp = parse_spec(spec)
    holder = torch.nn.Module()
    holder.quantization_status = QuantizationStatus.FROZEN
    stats = {}
    if sp.needs:
        calib = torch.randn(50, 256) * 4
        stats = {"input_absmax": calib.abs().amax(0)}
        holder.input_global_scale = generate_gparam(calib.min().reshape(1, 1),
                                                    calib.max().reshape(1, 1))
    args = PRESET_SCHEMES[preset]["input_activations"]
    want = forward_quantize(holder, x, "input", args)
    got = sp.runtime_hook_for(None, stats)(None, (x,))[0]
    assert torch.equal(got, want)


def test_nvfp4_activations_need_calibration():
    with pytest.raises(DTMError, match="needs calibration"):
        parse_spec("nvfp4:a").runtime_hook_for(None, {})


@pytest.mark.parametrize("spec", ["fp8:block", "fp8:dyn:dyn", "nvfp4:b", "mxfp4:g16", "fp8:x"])
def test_bad_format_specs_are_one_sentence(spec):
    with pytest.raises(DTMError, match="Bad compression spec"):
        parse_spec(spec)


def test_storage_bits_exports_and_level():
    cases = {"fp8": (8 + 16 / 1024, "q8_0"), "fp8:block128": (8 + 16 / 16384, "q8_0"),
             "nvfp4": (4.5, "nvfp4"), "mxfp4": (4.25, "mxfp4"), "mxfp8": (8.25, "q8_0"),
             "w4afp8": (4.125, "q4_0")}
    import gguf
    for spec, (bits, ltype) in cases.items():
        sp = parse_spec(spec)
        assert sp.storage_bits(1024, 16) == pytest.approx(bits), spec
        assert sp.llama_cpp_type() == ltype
        assert ltype.upper() in gguf.GGMLQuantizationType.__members__   # a GGML type
    assert parse_spec("nvfp4").per_tensor_bits == 32
    assert parse_spec("nvfp4").llmcompressor_scheme()["preset"] == "NVFP4A16"
    assert parse_spec("nvfp4:a").llmcompressor_scheme()["preset"] == "NVFP4"
    assert parse_spec("fp8:dyn").llmcompressor_scheme()["preset"] == "FP8_DYNAMIC"
    assert parse_spec("mxfp4").torchao_config()["config"] == "MXDynamicActivationMXWeightConfig"
    assert parse_spec("nvfp4").torchao_config()["config"] == "NVFP4WeightOnlyConfig"
    assert parse_spec("fp8:dyn").torchao_config()["config"] == \
        "Float8DynamicActivationFloat8WeightConfig"
    for spec in ("fp8", "nvfp4", "mxfp4"):
        assert spec in __import__("dtm_core.compression.methods", fromlist=["x"]).presets()


CHECKPOINTS = [("NVFP4A16", "nvfp4", 64, "NVFP4"), ("MXFP4A16", "mxfp4", 64, "MXFP4"),
               ("FP8_DYNAMIC", "fp8:dyn", 64, "FP8 per channel"),
               ("FP8_BLOCK", "fp8:block128:dyn", 128, "FP8 block 128x128"),
               ("W4AFP8", "w4afp8", 128, "W4AFP8")]


@pytest.mark.parametrize("scheme,spec,hidden,name", CHECKPOINTS)
def test_a_checkpoint_of_the_scheme_is_the_specs_pair(tmp_path, scheme, spec, hidden, name):
    """A checkpoint written by compressed-tensors' own compressor (its preset, llm-compressor's
    observers and fusion) loads as the compressed side, is described by its maker's name, holds
    exactly the spec's weights, and gives the spec pair's numbers."""
    from dtm_core.jobs import PairRequest, build_pair
    from dtm_core.measure.divergence import divergence
    from dtm_core.models.checkpoints import inspect
    from dtm_core.models.generation import encode_prompts
    from dtm_core.models.load import load_model

    base = tmp_path / "base"
    base_model(base, hidden=hidden, intermediate=256)
    write_ct(base, tmp_path / "ck", scheme=scheme, group_size=None)
    info = inspect(str(tmp_path / "ck"))
    assert info.groups[0].startswith(f"group_0: {name}"), info.groups
    dense = load_model(str(base))
    ck = build_pair(dense, PairRequest(model=str(base), compressed_model=str(tmp_path / "ck")))
    mine = make_pair(dense, Recipe.single(spec, "*"))
    theirs = dict(ck.compressed.named_parameters())
    for n, p in mine.compressed.named_parameters():
        if n.endswith("proj.weight"):
            assert torch.equal(p, theirs[n].to(p.dtype)), n
    ids = encode_prompts(dense.tokenizer, ["The capital of France is", "Water boils at"])
    a = divergence(ck, prompt_ids=ids, new_tokens=8)
    b = divergence(mine, prompt_ids=ids, new_tokens=8)
    assert a.table.fdt.tolist() == b.table.fdt.tolist()
    assert a.summary["kl_mean"] == pytest.approx(b.summary["kl_mean"], rel=1e-4, abs=1e-7)


def test_plan_exports_name_the_formats(tmp_path):
    """llm-compressor config groups named by the preset with its exact arguments, torchao
    configs the exported snippet builds, llama.cpp's mxfp4 / nvfp4 tensor types."""
    import runpy

    from compressed_tensors.quantization import QuantizationScheme
    from conftest import make_tiny
    from dtm_core.models.families import family_of
    from dtm_core.planning.allocation import KEEP
    from dtm_core.planning.plan_exports import (TORCHAO_SNIPPET, llama_cpp_arguments,
                                                llmcompressor_recipe, torchao_config)

    lm = make_tiny("llama")
    a = {"0.q": "nvfp4", "0.k": "nvfp4", "0.v": "fp8:dyn", "0.o": "mxfp4", "0.down": "int4:g16",
         "1.q": "w4afp8", "1.k": KEEP}
    groups = llmcompressor_recipe(lm.model, a)["quant_stage"]["quant_modifiers"][
        "QuantizationModifier"]["config_groups"]
    assert set(groups) == {"NVFP4A16", "FP8_DYNAMIC", "MXFP4A16", "W4AFP8", "group_3"}
    for preset in ("NVFP4A16", "FP8_DYNAMIC", "MXFP4A16", "W4AFP8"):
        g = QuantizationScheme.model_validate(groups[preset])
        ref = PRESET_SCHEMES[preset]
        # as the library serializes them (a config.json holds the same)
        assert g.weights.model_dump() == ref["weights"].model_dump()
        acts = ref.get("input_activations")
        assert (g.input_activations is None and acts is None) or \
            g.input_activations.model_dump() == acts.model_dump()
    assert groups["NVFP4A16"]["targets"] == ["model.layers.0.self_attn.q_proj",
                                             "model.layers.0.self_attn.k_proj"]
    cfg = torchao_config(lm.model, a)
    (tmp_path / "torchao_plan.json").write_text(__import__("json").dumps(cfg))
    (tmp_path / "apply_torchao.py").write_text(TORCHAO_SNIPPET)
    built = runpy.run_path(str(tmp_path / "apply_torchao.py"))["plan_config"](
        str(tmp_path / "torchao_plan.json")).fqn_to_config
    kinds = {k.replace("model.layers.", ""): type(v).__name__ if v is not None else None
             for k, v in built.items()}
    assert kinds == {"0.self_attn.q_proj": "NVFP4WeightOnlyConfig",
                     "0.self_attn.k_proj": "NVFP4WeightOnlyConfig",
                     "0.self_attn.v_proj": "Float8DynamicActivationFloat8WeightConfig",
                     "0.self_attn.o_proj": "MXDynamicActivationMXWeightConfig",
                     "0.mlp.down_proj": "IntxWeightOnlyConfig",
                     "1.self_attn.q_proj": "Float8DynamicActivationInt4WeightConfig",
                     "1.self_attn.k_proj": None}
    types = llama_cpp_arguments({k: v for k, v in a.items()}, family_of(lm.model), 32, False)
    text = "\n".join(types["tensor_types"])
    assert r"^blk\.0\.attn_q\.weight$=nvfp4" in text and r"^blk\.0\.attn_output\.weight$=mxfp4" in text


def test_mixed_plan_over_float_and_integer_formats(tmp_path):
    """A budget plan chooses per component among float and integer formats, each counted at its
    storage bits (NVFP4 4.5 plus the global scale, MXFP4 4.25, FP8 8 plus scales)."""
    from test_budget_plan import number_set, tiny_llama

    from dtm_core.planning.allocation import Budget
    from dtm_core.planning.budget_plan import make_budget_plan

    m = tiny_llama()
    plan = make_budget_plan(m, "fp8,nvfp4,mxfp4,int3:g16", number_set(6), 8,
                            budget=Budget("bits", 5.0), cache_dir=tmp_path, holdout=0.0,
                            planner="fdt")
    assert plan.measure["avg_bits"] <= 5.0 + 1e-9
    used = set(plan.assignments.values())
    assert used & {"fp8", "nvfp4", "mxfp4"}, used
    cells = plan.cells.set_index(["component", "spec"]).bits_per_weight
    q = cells.loc[("0.q", "mxfp4")], cells.loc[("0.q", "nvfp4")], cells.loc[("0.q", "fp8")]
    assert q[0] == pytest.approx(4.25)
    assert q[1] == pytest.approx(4.5 + 32 / (64 * 64))           # plus the FP32 global scale
    assert q[2] == pytest.approx(8 + 16 / 64)                     # an FP8 scale per row


def test_level_curves_across_formats():
    from test_budget_plan import tiny_llama

    from dtm_core.analysis.levels import level_curves, level_specs

    specs = level_specs("formats", "fp8,nvfp4,mxfp4,int3:g16")
    assert [s for _, s in specs] == ["fp8", "nvfp4", "mxfp4", "int3:g16"]
    assert [round(b, 2) for b, _ in specs] == [8.0, 4.5, 4.25, 4.0]
    lm = tiny_llama()
    table = level_curves(lm, "formats", "fp8,nvfp4,mxfp4", "q,down", ["5 6 7 8", "9 10 11"], 6)
    assert len(table) == 6 and set(table.spec) == {"fp8", "nvfp4", "mxfp4"}
    fp8 = table[(table.kind == "down") & (table.spec == "fp8")].kl_mean.iloc[0]
    fp4 = table[(table.kind == "down") & (table.spec == "mxfp4")].kl_mean.iloc[0]
    assert fp8 < fp4
    # pruning sits at its stored bits too (16-bit values kept, a one-bit mask)
    assert level_specs("formats", "magnitude:0.5") == [(9.0, "magnitude:0.5")]
    with pytest.raises(DTMError, match="Bad compression spec"):
        level_specs("formats", "fp9")


def test_a_gguf_with_mxfp4_tensors_loads_and_is_described(default_model, tmp_path):
    """llama.cpp's MXFP4 tensors, written and de-quantized by gguf-py (0.19 has MXFP4; its NVFP4
    has no de-quantization yet): the file is described by its types, loads as the compressed side,
    and every decoder matrix lies on an MXFP4 grid (each group of 32 inputs: E2M1 values times one
    power of two)."""
    from gguf_requant import requantize

    from dtm_core.models.checkpoints import inspect
    from dtm_core.models.load import default_gguf_path, load_model

    f = tmp_path / "mxfp4.gguf"
    requantize(str(default_gguf_path()), str(f), "MXFP4")
    info = inspect(str(f), base="default")
    assert info.kind == "gguf" and info.groups[0] == "MXFP4: 210 matrices"
    m = load_model(str(f), device="cpu")
    w = m.model.model.layers[3].mlp.down_proj.weight.detach().double()
    groups = w.reshape(w.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    scale = 2.0 ** (torch.ceil(torch.log2(amax / 6.0)))     # a power of two per group
    q = groups / scale
    on_grid = (q.abs()[..., None] - E2M1.double()).abs().amin(-1) < 1e-9
    assert bool(on_grid.all())
    pair = make_pair(default_model, Recipe.single(f"from:{f}", "3.down"))
    assert torch.equal(pair.compressed.model.layers[3].mlp.down_proj.weight, w.float())


@pytest.mark.parametrize("algo", ["NVFP4", "FP8"])
def test_a_modelopt_export_is_read_as_modelopt_defines_it(tmp_path, algo):
    """An NVIDIA ModelOpt export (its own quantize and export_hf_checkpoint): described as NVFP4 /
    FP8 with ModelOpt's scale convention, every quantized weight equal to ModelOpt's own
    de-quantization (NVFP4QTensor.dequantize; FP8 weight x scale), its static activation scales
    in the forward pass, and pairs that run; NVFP4 is the same format as the nvfp4 spec (the
    reciprocal global-scale convention), so the weights agree to float32 rounding."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors import safe_open

    from checkpoint_writers import write_modelopt
    from dtm_core.jobs import PairRequest, build_pair
    from dtm_core.measure.divergence import divergence
    from dtm_core.models.checkpoints import inspect
    from dtm_core.models.load import checkpoint_weights
    from dtm_core.models.generation import encode_prompts
    from dtm_core.models.load import load_model

    base = tmp_path / "base"
    base_model(base, hidden=64, intermediate=256)
    ck = write_modelopt(base, tmp_path / "mo", algo)
    info = inspect(str(ck))
    assert info.kind == "modelopt" and info.groups[0].startswith(
        "NVFP4: FP4 E2M1" if algo == "NVFP4" else "FP8 per tensor")
    assert "static per-tensor" in info.activations and info.quantized == 14
    reader = checkpoint_weights(str(ck))
    f = safe_open(str(next(ck.glob("*.safetensors"))), "pt")
    dense = load_model(str(base))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        w = f.get_tensor(name + ".weight")
        scale = f.get_tensor(name + ".weight_scale")
        if algo == "NVFP4":
            want = NVFP4QTensor(torch.Size([w.shape[0], w.shape[1] * 2]), torch.float32,
                                w).dequantize(torch.float32, scale=scale,
                                              double_scale=f.get_tensor(name + ".weight_scale_2"),
                                              block_sizes={-1: 16})
        else:
            want = w.float() * scale.float()
        got = reader.tensor(name + ".weight")
        assert torch.equal(got, want), name
        if algo == "NVFP4":
            ours = parse_spec("nvfp4").apply(dense.model.get_submodule(name).weight.detach(),
                                             {"fused": [dense.model.get_submodule(
                                                 name.rpartition(".")[0] + "." + n).weight.detach()
                                                 for n in ("q_proj", "k_proj", "v_proj")]}
                                             if "self_attn" in name else {})
            assert torch.allclose(ours, got, rtol=1e-6, atol=0)
    pair = build_pair(dense, PairRequest(model=str(base), compressed_model=str(ck)))
    hooks = sum(len(m._forward_pre_hooks) for m in pair.compressed.modules())
    assert hooks == 14            # every quantized linear quantizes its input
    # the activation quantization: FP8 x -> fp8(x / input_scale) x input_scale; NVFP4 the spec's
    # activation path under the global scale 1 / input_scale
    from dtm_core.compression.methods.formats import fake_quantize_activation, preset_args

    name = "model.layers.1.mlp.down_proj"
    s_in = f.get_tensor(name + ".input_scale").float()
    x = torch.randn(2, 5, 256) * 3
    got = reader.input_hook(name)(None, (x,))[0]
    if algo == "FP8":
        want = (x / s_in).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s_in
    else:
        want = fake_quantize_activation(x, preset_args("NVFP4", "input_activations"),
                                        (1.0 / s_in).reshape(1, 1))
    assert torch.equal(got, want)
    ids = encode_prompts(dense.tokenizer, ["The capital of France is"])
    res = divergence(pair, prompt_ids=ids, new_tokens=6)
    assert 0 <= res.summary["fdt_mean"] <= 6 and res.summary["kl_mean"] > 0


def test_e2m1_rounding_breaks_ties_as_the_library():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    from dtm_core.compression.methods.formats import round_e2m1

    torch.manual_seed(3)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.0, 2.0, 4.0, 1.9999999,
                         3.9999998, 0.4999999, 0.2500001, 4.9999995, 5.0000005])
    x = torch.cat([ties, -ties, (torch.randn(10000) * 3).clamp(-6, 6),
                   (torch.randn(10000) * 1e-3), torch.tensor([1e-30, -1e-30, 1e-45])])
    got = round_e2m1(x)
    want = cast_to_fp4(x.clone())
    assert torch.equal(got, want)
    # bit for bit but for the sign of a negative value rounded to zero (+0 here, -0 in the
    # library), which no product or sum can tell apart
    assert torch.equal(got.signbit() | (want == 0), want.signbit() | (want == 0))
    assert torch.equal(round_e2m1(x.bfloat16()), cast_to_fp4(x.bfloat16().clone()))


def test_e4m3_rounding_equals_the_float8_cast():
    """The FP8 rounding of the weights and activations (two float32 additions per value) is
    PyTorch's float8_e4m3fn cast: every E4M3 value, every midpoint between two (ties to even),
    a value just either side of each midpoint, subnormals, zeros and a wide random range."""
    from dtm_core.compression.methods.formats import round_e4m3

    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    near = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    g = torch.Generator().manual_seed(5)
    rand = torch.cat([torch.randn(200000, generator=g) * s for s in (1e-4, 1e-2, 1, 100)])
    x = torch.cat([vals, mids, near, rand, torch.tensor([0.0, -0.0, 1e-38, 2.0 ** -10])])
    x = torch.cat([x, -x]).clamp(-448, 448)
    want = x.to(torch.float8_e4m3fn).float()
    got = round_e4m3(x)
    assert torch.equal(got, want)
    assert torch.equal(got.signbit() | (want == 0), want.signbit() | (want == 0))
    t = x[:1000].reshape(40, 25).t()            # a strided view, as block scales produce
    assert torch.equal(round_e4m3(t), t.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8"])
@pytest.mark.parametrize("act", [False, True])
def test_gptq_on_a_format_grid_equals_the_slow_reference(fmt, act):
    """gptq:FORMAT is GPTQ with the format's group scales (compressed-tensors' qparams on the
    group's current weights, or on the original ones with act-order's static groups) and its
    rounding, as llm-compressor's GPTQModifier runs these schemes: checked against the slow
    optimal-brain-surgeon reference of test_gptq, and never worse than the format's RTN on the
    calibration inputs."""
    from test_gptq import obs_reference, problem

    from dtm_core.compression.methods.formats import FormatGrid, global_scale

    w, x, h = problem(rows=12, cols=64, n=300, seed=5)
    sp = parse_spec(f"gptq:{fmt}" + ("" if act else ":noact"))
    assert str(sp) == f"gptq:{fmt}" + ("" if act else ":noact") and sp.act == act
    got = sp.apply(w.float(), {"input_hessian": h.float()})
    grid = FormatGrid(parse_spec(fmt).weight_args(), global_scale([w.float()]))
    g = grid.group
    hd = h + 0.01 * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    order = torch.argsort(torch.diag(hd), descending=True).tolist() if act else list(range(64))
    static = {c0: grid.params(w[:, c0:c0 + g].float()) for c0 in range(0, 64, g)} if g else None
    whole = grid.params(w.float())
    state = {}
    tie = torch.zeros_like(w, dtype=torch.bool)

    def fix(step, c, cur):
        if g and act:
            p = static[c // g * g]
        elif g:
            if c % g == 0:
                state["p"] = grid.params(cur[:, c:c + g].float())
            p = state["p"]
        else:
            p = whole
        col = cur[:, c]
        # a value within 1e-5 of a rounding boundary may round either way in float32
        tie[:, c] = ~torch.eq(grid.quantize((col * (1 + 1e-5)).float(), p),
                              grid.quantize((col * (1 - 1e-5)).float(), p))
        return grid.quantize(col.float(), p).double()

    want = obs_reference(w, hd, fix, order)
    differ = ~torch.isclose(got.double(), want, atol=1e-5, rtol=0)
    # float32 against the float64 reference: a row may part from the reference only at a value
    # on a rounding tie (after which its error feedback differs, so later columns may too)
    rows = differ.any(1).nonzero().flatten().tolist()
    assert len(rows) <= 2, rows
    for r in rows:
        first = next(c for c in order if differ[r, c])
        assert tie[r, first], (r, first)
    err = lambda q: float(((x @ w.t() - x @ q.double().t()) ** 2).sum())  # noqa: E731
    assert err(got) <= err(parse_spec(fmt).apply(w.float(), {}))


def test_gptq_on_nvfp4_shares_the_fused_global_scale_and_exports():
    """gptq:nvfp4 on k alone equals k of q/k/v together, and is GPTQ under the global scale of
    the three dense weights (not k's own): the checkpoint llm-compressor writes."""
    from conftest import make_tiny, random_prompts

    from dtm_core.compression.methods.formats import FormatGrid, global_scale
    from dtm_core.compression.methods.gptq import gptq_quantize

    lm = make_tiny("llama", scale=4.0)
    attn = lm.model.model.layers[1].self_attn
    with torch.no_grad():
        attn.q_proj.weight[0, 0] = 30.0          # q holds the group's maximum
    prompts = random_prompts(6, seed=4, lo=6, hi=14)
    alone = make_pair(lm, Recipe.single("gptq:nvfp4", "1.k"), calibration=prompts)
    together = make_pair(lm, Recipe.single("gptq:nvfp4", "1.q,1.k,1.v"), calibration=prompts)
    k = alone.compressed.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(k, together.compressed.model.layers[1].self_attn.k_proj.weight)
    path = "model.layers.1.self_attn.k_proj"
    h = alone.calibration.get("input_hessian", [path])[path]
    dense = [getattr(attn, n).weight.detach() for n in ("q_proj", "k_proj", "v_proj")]
    args = parse_spec("nvfp4").weight_args()
    fused = gptq_quantize(dense[1], h, 4, grid=FormatGrid(args, global_scale(dense)),
                          act_order=True)
    own = gptq_quantize(dense[1], h, 4, grid=FormatGrid(args, global_scale([dense[1]])),
                        act_order=True)
    assert torch.equal(k, fused) and not torch.equal(k, own)
    sp = parse_spec("gptq:nvfp4")
    assert sp.storage_bits(64, 16) == 4.5 and sp.per_tensor_bits == 32
    assert sp.llama_cpp_type() == "nvfp4"
    w = sp.llmcompressor_scheme()["group"]["weights"]
    assert w["strategy"] == "tensor_group" and w["group_size"] == 16 and w["actorder"] == "static"
    for bad in ("gptq:w4afp8", "gptq:nvfp4:g32", "gptq:mxfp4:asym"):
        with pytest.raises(DTMError, match="Bad compression spec"):
            parse_spec(bad)


def test_awq_on_nvfp4_equals_its_definition_with_the_library_quantizer():
    """awq:nvfp4: per-input-channel scales s = a^alpha (normalized) searched over the 20
    exponents by the group's summed output error, each candidate quantized by the library's
    chain on W diag(s) under the global scale of the group's scaled weights: written out here
    with the reference quantizer of this file, and never worse than nvfp4 on the group."""
    from conftest import make_tiny, random_prompts

    from dtm_core.compression.methods.awq import output_error, scales_at

    lm = make_tiny("llama", scale=4.0)
    prompts = random_prompts(6, seed=4, lo=6, hi=14)
    pair = make_pair(lm, Recipe.single("awq:nvfp4", "1.q,1.k,1.v"), calibration=prompts)
    attn = lm.model.model.layers[1].self_attn
    paths = [f"model.layers.1.self_attn.{n}_proj" for n in "qkv"]
    st = pair.calibration.many(["input_absmean", "input_hessian"], paths)[paths[0]]
    dense = [getattr(attn, f"{n}_proj").weight.detach() for n in "qkv"]

    def candidate(alpha):
        s = scales_at(st["input_absmean"], alpha)
        g = generate_gparam(torch.stack([(w * s).min() for w in dense]).min().reshape(1, 1),
                            torch.stack([(w * s).max() for w in dense]).max().reshape(1, 1))
        return [reference(w * s, "NVFP4A16", g) / s for w in dense]

    errs = [sum(output_error(w, q, st["input_hessian"]) for w, q in zip(dense, candidate(n / 20)))
            for n in range(20)]
    best = candidate(min(range(20), key=lambda n: errs[n]) / 20)
    got = [getattr(pair.compressed.model.layers[1].self_attn, f"{n}_proj").weight for n in "qkv"]
    for a, b in zip(got, best):
        assert torch.equal(a, b)
    assert min(errs) <= errs[0]     # alpha = 0 is nvfp4 itself
    assert str(parse_spec("awq:nvfp4")) == "awq:nvfp4"
    assert parse_spec("awq:nvfp4").llmcompressor_scheme()["group"]["weights"]["group_size"] == 16
