"""Compressed checkpoints of other tools as the compressed side (issue 15): each format written in
the test by its own writer, loaded as a pair, de-quantized weights checked against the format's
definition or the library's own de-quantization, ``from:PATH`` on every component equal to the
whole checkpoint, exactness against real greedy generation, and other bases refused by name."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import checkpoint_writers as W
from conftest import greedy_fdt, hf_greedy
from dtm_core.models import checkpoints as C
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.errors import DTMError
from dtm_core.jobs import PairRequest, build_pair
from dtm_core.models.load import checkpoint_weights, eos_ids, load_model
from dtm_core.compression.pair import make_pair
from dtm_core.analysis.sweep import sweep

N = 8
PROMPTS = [[1, 450, 3681, 29], [1, 12, 7, 9, 1000, 4000], [1, 300, 301, 302, 303, 304, 305],
           [1, 42]]
CT_SCHEMES = ["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    W.base_model(root / "base")
    return root


@pytest.fixture(scope="module")
def base(ck):
    return load_model(str(ck / "base"), device="cpu")


def _ct(ck, scheme):
    out = ck / f"ct-{scheme}"
    if not out.exists():
        W.write_ct(ck / "base", out, scheme)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _linears(lm):
    return {n: m for n, m in lm.model.named_modules() if n.endswith("_proj")}


@pytest.mark.parametrize("scheme", CT_SCHEMES)
def test_compressed_tensors_checkpoint_loads_and_from_every_component_is_the_checkpoint(
        ck, base, scheme):
    """pack-quantized (group sym/asym, channel), int-quantized W8A8 dynamic and float-quantized
    FP8 static/dynamic: the weights from:PATH reads equal the library's own de-quantization in the
    loaded checkpoint, and from:PATH on every component (with the format's activation
    quantization) computes exactly what the library's forward computes."""
    path = _ct(ck, scheme)
    whole = load_model(str(path), device="cpu")
    reader = checkpoint_weights(str(path))
    mods = _linears(whole)
    assert len(mods) == 14
    for name, mod in mods.items():
        assert torch.equal(reader.tensor(f"{name}.weight"), mod.weight.float()), name
        changed = not torch.equal(mod.weight, dict(base.model.named_modules())[name].weight)
        assert changed, f"{name} was not compressed"
    pair = make_pair(base, Recipe.single(f"from:{path}", "*"))
    for ids in PROMPTS:
        a, b = _logits(whole.model, ids), _logits(pair.compressed, ids)
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max()), scheme
    groups = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]
    acts = any(g.get("input_activations") for g in groups.values())
    info = C.inspect(str(path), base=str(ck / "base"))
    assert info.kind == "compressed-tensors" and info.quantized == 14
    assert info.kept == ["lm_head"]
    assert ("reproduced in the forward pass" in info.activations) == acts


@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "sparse-bitmask", "dense"])
def test_sparse_llm_compressor_checkpoints(ck, base, fmt):
    """2:4 and unstructured sparse checkpoints in the bitmask layouts that compressed-tensors
    0.20 no longer reads (transformers would leave their weights uninitialized), and a sparse
    model stored dense: every weight is the pruned matrix, the whole checkpoint equals from:PATH
    on every component, and the description names the sparsity and the algorithm."""
    path = ck / f"sparse-{fmt}"
    pruned = W.write_ct_sparse(ck / "base", path, fmt)
    reader = checkpoint_weights(str(path))
    for mod, w in pruned.items():
        assert torch.equal(reader.tensor(f"{mod}.weight"), w), mod
    whole = load_model(str(path), device="cpu")
    for mod, w in pruned.items():
        assert torch.equal(dict(whole.model.named_modules())[mod].weight, w), mod
    pair = make_pair(base, Recipe.single(f"from:{path}", "*"))
    for ids in PROMPTS:
        assert torch.equal(_logits(whole.model, ids), _logits(pair.compressed, ids))
    info = C.inspect(str(path))
    structure = "unstructured" if fmt == "sparse-bitmask" else "2:4"
    assert f"sparsity: {structure}, stored {fmt}" in info.text()
    assert info.algorithm == "SparseGPTModifier" and info.kept == ["lm_head"]
    if fmt != "dense":
        assert info.quantized == 14 and "unpack_bitmasks" in info.loader


def test_activation_quantization_is_really_in_the_forward(ck, base):
    """W8A8 with its input quantization differs from the same weights without it."""
    path = _ct(ck, "W8A8")
    with_acts = make_pair(base, Recipe.single(f"from:{path}", "*"))
    reader = checkpoint_weights(str(path))
    ids = PROMPTS[1]
    plain = load_model(str(ck / "base"), device="cpu").model
    for name, mod in plain.named_modules():
        if name.endswith("_proj"):
            mod.weight.data = reader.tensor(f"{name}.weight")
    assert not torch.equal(_logits(with_acts.compressed, ids), _logits(plain, ids))


def test_checkpoint_pair_fdt_equals_real_greedy_divergence(ck, base):
    """Exactness on a real checkpoint pair: the references are transformers' own generate of the
    base, and FDT is where the checkpoint's own greedy text first differs."""
    pair = build_pair(base, PairRequest(model=str(ck / "base"),
                                        compressed_model=str(_ct(ck, "W4A16"))))
    assert pair.config["checkpoint"]["kind"] == "compressed-tensors"
    res = divergence(pair, prompt_ids=PROMPTS, new_tokens=N, generate_compressed=True)
    eos = eos_ids(base)
    for p, ref, fdt in zip(PROMPTS, res.references, res.table.fdt):
        dense = hf_greedy(base.model, p, N, eos)
        comp = hf_greedy(pair.compressed, p, N, eos)
        assert ref == dense
        assert fdt == greedy_fdt(dense, comp, N)
    assert res.table.fdt.tolist() == res.table.fdt_generated.tolist()


@pytest.mark.parametrize("bits,sym,act_order,v1", [(4, False, True, True), (4, True, False, False),
                                                   (3, False, False, True), (2, True, True, False),
                                                   (8, False, False, True)])
def test_gptq_weights_are_the_formats_definition(ck, bits, sym, act_order, v1):
    """GPTQModel/AutoGPTQ layout (v1 stores zero - 1; 3-bit values cross words; act-order g_idx):
    every de-quantized weight equals scales[g] * (q - zeros[g]) from the packed integers."""
    out = ck / f"gptq-{bits}-{sym}-{act_order}-{v1}"
    truth = W.write_gptq(ck / "base", out, bits=bits, sym=sym, act_order=act_order, v1=v1)
    reader = checkpoint_weights(str(out))
    for mod, (q, z, s, g) in truth.items():
        assert torch.equal(reader.tensor(f"{mod}.weight"), W.expected_weight(q, z, s, g)), mod


def test_gptq_and_awq_checkpoints_load_whole_and_from_every_component(ck, base):
    """GPTQ and AWQ load de-quantized into the base architecture (gptqmodel cannot be installed
    next to the pinned torch); AWQ through compressed-tensors' own AutoAWQ converter equals
    (q - z) * s in float16, as AutoAWQ's kernels compute it; from:PATH on every component equals
    the whole checkpoint exactly."""
    W.write_gptq(ck / "base", ck / "gptq", act_order=True)
    truth = W.write_awq(ck / "base", ck / "awq")
    reader = checkpoint_weights(str(ck / "awq"))
    for mod, (q, z, s, g) in truth.items():
        want = ((q - z[g].t()).half() * s[g].t().half()).float()
        assert torch.equal(reader.tensor(f"{mod}.weight"), want), mod
    for name in ("gptq", "awq"):
        whole = load_model(str(ck / name), device="cpu")
        info = C.inspect(str(ck / name))
        assert info.kind == name and info.quantized == 14 and info.kept == ["lm_head"]
        pair = make_pair(base, Recipe.single(f"from:{ck / name}", "*"))
        for ids in PROMPTS:
            assert torch.equal(_logits(whole.model, ids), _logits(pair.compressed, ids)), name
    assert "act-order" in C.inspect(str(ck / "gptq")).text()


def test_sweep_from_a_checkpoint_cells_weight_errors_and_the_whole(ck, base, tmp_path):
    """A from:PATH sweep: each cell equals the single-component pair, its weight error is
    ||W - W'|| / ||W|| of that component, and all components at once equal the checkpoint pair."""
    path = _ct(ck, "W4A16")
    res = sweep(base, f"from:{path}", PROMPTS, N, cache_dir=tmp_path, whole=True)
    assert len(res.table) == 14
    reader = checkpoint_weights(str(path))
    mods = dict(base.model.named_modules())
    for _, row in res.table.iterrows():
        d = divergence(make_pair(base, Recipe.single(f"from:{path}", row.component)),
                       prompt_ids=PROMPTS, new_tokens=N)
        assert row.fdt_mean == d.table.fdt.mean(), row.component
        layer, kind = row.component.split(".")
        name = next(n for n in mods if n.startswith(f"model.layers.{layer}.")
                    and n.endswith(f".{kind}_proj"))
        w = mods[name].weight.double()
        want = float((reader.tensor(f"{name}.weight").double() - w).norm() / w.norm())
        assert row.weight_error == pytest.approx(want, rel=1e-9)
    pair = build_pair(base, PairRequest(model=str(ck / "base"), compressed_model=str(path)))
    whole = divergence(pair, prompt_ids=PROMPTS, new_tokens=N)
    assert res.whole["fdt_mean"] == whole.table.fdt.mean()
    assert res.whole["kl_mean"] == pytest.approx(whole.table.kl_mean.mean(), rel=1e-3, abs=1e-7)
    add = res.additivity()
    assert add["fdt_lost_whole"] == pytest.approx(N - whole.table.fdt.mean())
    assert add["fdt_lost_sum"] == pytest.approx(float((N - res.table.fdt_mean).sum()))
    again = sweep(base, f"from:{path}", PROMPTS, N, cache_dir=tmp_path, whole=True)
    assert again.computed == 0 and again.whole == res.whole


def test_a_checkpoint_of_another_base_is_refused_with_the_difference_named(ck, base, tmp_path):
    W.base_model(tmp_path / "other", seed=2, intermediate=96)
    W.write_ct(tmp_path / "other", tmp_path / "ct-other", "W4A16")
    with pytest.raises(DTMError, match="is not a compression of .*intermediate_size 96 against "
                                       "the base's 128"):
        build_pair(base, PairRequest(compressed_model=str(tmp_path / "ct-other")))
    with pytest.raises(DTMError, match=r"is shaped \(96, 64\) but the base's is \(128, 64\)"):
        make_pair(base, Recipe.single(f"from:{tmp_path / 'ct-other'}", "0.gate"))
    W.base_model(tmp_path / "qwen", family="qwen2")
    with pytest.raises(DTMError, match="architecture qwen2 against the base's llama"):
        build_pair(base, PairRequest(compressed_model=str(tmp_path / "qwen")))


def test_missing_packages_and_kernels_are_named_in_one_sentence(ck, monkeypatch):
    real = importlib.util.find_spec
    for fmt, pkg, pip in [("compressed-tensors", "compressed_tensors", "compressed-tensors=="),
                          ("bitsandbytes", "bitsandbytes", "bitsandbytes=="),
                          ("torchao", "torchao", "torchao==")]:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, pkg=pkg: None if name == pkg else real(name, *a))
        with pytest.raises(DTMError, match=rf"needs the {pkg} package, which is not installed: "
                                           rf"pip install {pip}"):
            C.FORMATS[fmt].requirements()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    msg = str(C.explain_load_error("x", {"quantization_config": {"quant_method": "torchao"}},
                                   ImportError("Requires mslk >= 1.0.0")))
    assert msg.startswith("The torchao checkpoint 'x' needs mslk >=1.0.0")
    msg = str(C.explain_load_error("x", {"quantization_config": {"quant_method": "gptq"}},
                                   RuntimeError("GPU is required to quantize or run quantize model.")))
    assert "needs a CUDA GPU" in msg


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is a runtime requirement; this only guards odd installs")
def test_bitsandbytes_checkpoints(ck, base):
    from transformers import BitsAndBytesConfig

    nf4 = W.write_transformers_quantized(ck / "base", ck / "bnb4", BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    whole = load_model(str(nf4), device="cpu")
    info = C.inspect(str(nf4))
    assert info.kind == "bitsandbytes" and info.format == "nf4"
    # from: takes bitsandbytes' own de-quantization of each weight; its CPU matmul kernel
    # rounds differently (about 0.3 % of the largest logit here), so the whole checkpoint and
    # from: on every component agree to that, not exactly
    pair = make_pair(base, Recipe.single(f"from:{nf4}", "*"))
    mod = whole.model.model.layers[0].mlp.down_proj
    import bitsandbytes.functional as F
    assert torch.equal(checkpoint_weights(str(nf4)).tensor("model.layers.0.mlp.down_proj.weight"),
                       F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float())
    for ids in PROMPTS:
        a, b = _logits(whole.model, ids), _logits(pair.compressed, ids)
        assert torch.allclose(a, b, rtol=0, atol=1e-2 * a.abs().max())
    res = divergence(build_pair(base, PairRequest(compressed_model=str(nf4))), prompt_ids=PROMPTS,
                     new_tokens=N)
    assert res.table.kl_mean.mean() > 0
    # LLM.int8: the row scales of the loaded module de-quantize the same int8 weights
    int8 = W.write_transformers_quantized(ck / "base", ck / "bnb8",
                                          BitsAndBytesConfig(load_in_8bit=True))
    loaded = load_model(str(int8), device="cpu")
    reader = checkpoint_weights(str(int8))
    for name, mod in _linears(loaded).items():
        got = reader.tensor(f"{name}.weight")
        assert torch.equal(got, C.dequantized(mod.weight, mod)), name
        dense = dict(base.model.named_modules())[name].weight
        assert (got - dense).abs().max() <= dense.abs().amax(1).max() / 127, name
    assert "LLM.int8" in C.inspect(str(int8)).activations


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                    reason="torchao is optional at run time (requirements-dev installs it)")
def test_torchao_int8_checkpoint(ck, base):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    path = W.write_transformers_quantized(ck / "base", ck / "ao8",
                                          TorchAoConfig(Int8WeightOnlyConfig()))
    whole = load_model(str(path), device="cpu")
    pair = make_pair(base, Recipe.single(f"from:{path}", "*"))
    for ids in PROMPTS:
        a, b = _logits(whole.model, ids), _logits(pair.compressed, ids)
        assert torch.allclose(a, b, rtol=0, atol=1e-4 * a.abs().max())
    assert C.inspect(str(path)).kind == "torchao"


def test_kld_report_on_a_checkpoint_pair(ck, base):
    from dtm_core.measure.kld import score_text

    pair = build_pair(base, PairRequest(compressed_model=str(_ct(ck, "W8A8"))))
    stats, _ = score_text(pair, "the cat sat on the mat and then it ran away " * 8, ctx=32)
    assert stats["kld_mean"] > 0 and stats["positions"] > 0 and stats["same_top_p"] < 100


def test_cli_checkpoint_command(ck, capsys, tmp_path):
    from dtm_core.__main__ import main

    path = _ct(ck, "W8A8")
    assert main(["checkpoint", str(path), "--base", str(ck / "base"),
                 "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors checkpoint (int-quantized)" in out
    assert "W8A8 per channel symmetric, 14 linears" in out
    assert "int8 dynamic per-token input activations" in out
    assert "a compression of" in out
    js = json.loads((tmp_path / "c.json").read_text())
    assert js["quantized"] == 14 and js["size_bytes"] > 0 and js["base_size_bytes"] > 0
    assert main(["checkpoint", str(tmp_path / "nope")]) == 2
    assert "neither an existing path" in capsys.readouterr().err


def test_sensitivity_tab_sweeps_a_checkpoint_with_weight_errors_and_the_whole(ck, tmp_path,
                                                                             monkeypatch):
    """The Sensitivity tab's handler with from:PATH and 'also all at once': the table shows each
    component's weight error, the heatmap can show it, and the status sets the sum over cells
    against the whole checkpoint; the checkpoint line above the tabs describes it."""
    from ui import common, sensitivity

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = _ct(ck, "W4A16")
    f = tmp_path / "few.txt"
    f.write_text("1 2 3\nhello there\nthe cat sat on\n")
    heat, table, msg, csv, state, parquet = sensitivity.run_sweep(
        str(ck / "base"), f"from:{path}", str(f), "general", False, N, "", "", "weight_error",
        whole=True, progress=lambda *a, **k: None)
    assert "Done: 14 components" in msg and "All 14 components at once: mean FDT" in msg, msg
    assert "weight error ‖W−Ŵ‖/‖W‖ (%)" in table.columns
    assert table["weight error ‖W−Ŵ‖/‖W‖ (%)"].between(0.1, 50).all()
    assert heat is not None
    info = common.checkpoint_info(str(ck / "base"), common.CUSTOM, f"from:{path}", "")
    assert info.startswith("**compressed\\-tensors checkpoint") and "14 linears" in info
    assert common.checkpoint_info("default", "int8", "", "") == ""
    assert "neither an existing path" in common.checkpoint_info("default", common.CHECKPOINT, "",
                                                      str(tmp_path / "nope"))


def test_plan_and_prompt_sets_with_a_checkpoint(ck, base, tmp_path):
    """from:PATH plans like any spec (the plan's recipe reproduces its verified FDT), and a
    checkpoint pair evaluates a prompt set with the same per-prompt FDT as divergence."""
    from dtm_core.measure.evaluate import evaluate
    from dtm_core.planning.plan import make_plan
    from dtm_core.measure.prompts import PromptRecord, PromptSet

    path = _ct(ck, "W4A16")
    res = sweep(base, f"from:{path}", PROMPTS, N, cache_dir=tmp_path)
    plan = make_plan(base, res.table, f"from:{path}", PROMPTS, None, N, budget=0.5)
    assert plan.spec == f"from:{path}" and plan.fdt_mean >= 0.5 * N
    check = divergence(make_pair(base, plan.recipe), prompt_ids=PROMPTS, new_tokens=N)
    assert check.table.fdt.mean() == plan.fdt_mean
    pair = build_pair(base, PairRequest(compressed_model=str(path)))
    texts = ["1 2 3", "hello there", "the cat sat on"]
    pset = PromptSet("t", [PromptRecord(prompt=t) for t in texts])
    ev = evaluate(pair, pset, N)
    d = divergence(pair, texts, N)
    assert ev.table.fdt.tolist() == d.table.fdt.tolist()


def test_from_a_gguf_file_on_every_component_is_that_gguf(default_model, default_q4_gguf):
    """A llama.cpp checkpoint as a per-component map: from:FILE.gguf on every component of the
    default model equals the GGUF pair (the requantized file differs only in the decoder's
    matrices), and one component alone changes only from that layer on."""
    q4 = default_q4_gguf
    whole = load_model(str(q4), device="cpu")
    pair = make_pair(default_model, Recipe.single(f"from:{q4}", "*"))
    ids = default_model.tokenizer("The capital of France is").input_ids
    assert torch.equal(_logits(whole.model, ids), _logits(pair.compressed, ids))
    assert not torch.equal(_logits(whole.model, ids), _logits(default_model.model, ids))
    info = C.inspect(str(q4), base="default")
    assert info.kind == "gguf" and "Q4_0: 210 matrices" in info.groups


def test_a_hub_id_in_the_local_cache_is_a_checkpoint_like_its_folder(ck, base, tmp_path,
                                                                     monkeypatch):
    """A GPTQ checkpoint cached as a hub id (the Hugging Face cache layout, nothing downloaded)
    loads, describes and serves from: exactly as its folder does; an id that is not cached gets
    one sentence."""
    import shutil

    import huggingface_hub.constants as hc

    W.write_gptq(ck / "base", ck / "gptq-hub", act_order=True)
    repo = tmp_path / "hub" / "models--acme--tiny-gptq"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(ck / "gptq-hub", snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    whole = load_model("acme/tiny-gptq", device="cpu")
    assert whole.extra["quant_method"] == "gptq"
    assert C.inspect("acme/tiny-gptq").kind == "gptq"
    pair = make_pair(base, Recipe.single("from:acme/tiny-gptq", "*"))
    assert torch.equal(_logits(whole.model, PROMPTS[0]), _logits(pair.compressed, PROMPTS[0]))
    with pytest.raises(DTMError, match="not in the local Hugging Face cache"):
        make_pair(base, Recipe.single("from:acme/other", "0.q"))


def test_moe_checkpoints_with_experts_stored_one_module_each(tmp_path):
    """A GPTQ checkpoint of a tiny Qwen3-MoE (every expert quantized, stored one module each as
    the tools write them): the whole checkpoint loads with its experts fused as the architecture
    holds them, from:PATH on every component (experts included) equals it exactly, and one
    expert alone changes only that expert's matrix; compressed-tensors' MoE checkpoint, which
    transformers cannot load here, loads through the same path."""
    W.base_model(tmp_path / "base", family="qwen3_moe")
    truth = W.write_gptq(tmp_path / "base", tmp_path / "gptq")
    assert any(".experts.3.down_proj" in m for m in truth)
    base = load_model(str(tmp_path / "base"), device="cpu")
    whole = load_model(str(tmp_path / "gptq"), device="cpu")
    pair = make_pair(base, Recipe.single(f"from:{tmp_path / 'gptq'}", "*"))
    for ids in PROMPTS:
        assert torch.equal(_logits(whole.model, ids), _logits(pair.compressed, ids))
    one = make_pair(base, Recipe.single(f"from:{tmp_path / 'gptq'}", "1.e2.down"))
    q, z, s, g = truth["model.layers.1.mlp.experts.2.down_proj"]
    got = one.compressed.model.layers[1].mlp.experts.down_proj
    assert torch.equal(got[2], W.expected_weight(q, z, s, g))
    assert torch.equal(got[1], base.model.model.layers[1].mlp.experts.down_proj[1])
    W.write_ct(tmp_path / "base", tmp_path / "ct", "W8A16")
    ct = load_model(str(tmp_path / "ct"), device="cpu")
    pair = make_pair(base, Recipe.single(f"from:{tmp_path / 'ct'}", "*"))
    assert torch.equal(_logits(ct.model, PROMPTS[1]), _logits(pair.compressed, PROMPTS[1]))
