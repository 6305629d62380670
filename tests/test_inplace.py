"""One model's memory (issue 32): a pair that compresses the dense model itself when a view runs
gives exactly the numbers of today's pair (a compressed copy beside the dense model) on every
family and method, calibrated ones included, holds no second copy of the weights while it runs,
and leaves the dense model bit for bit as it was: kept in memory, or re-read from the model's own
safetensors files."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import NumberTokenizer, make_tiny, random_prompts
from test_families import FAMILIES, MOE, make
from dtm_core.compression.pair import in_place_pair, make_pair, tensor_bytes
from dtm_core.compression.recipe import Recipe
from dtm_core.errors import DTMError
from dtm_core.measure.divergence import divergence
from dtm_core.measure.evaluate import evaluate
from dtm_core.measure.exports import sidecar_path
from dtm_core.measure.kld import score_text
from dtm_core.measure.prompts import PromptRecord, PromptSet

# every kind of method: plain weight rounding (int and float formats), pruning (unstructured and
# N:M), the calibrated ones (input norms, Hessians, AWQ's group scales; layer by layer by
# default), activation quantization (a runtime hook) and a KV-cache spec (static scales)
METHODS = ["int4:g16", "nvfp4", "mxfp4", "fp8", "magnitude:0.5", "nm:2:4", "wanda:0.5",
           "sparsegpt:0.5", "gptq:int4:g16", "awq:int4:g16", "w8a8", "kv:fp8:tensor",
           "int4:g16+kv:int8"]
N = 8


def _recipe(text: str) -> Recipe:
    if "+" in text:
        return Recipe.parse(";".join(f"{s}@*.*" for s in text.split("+")))
    return Recipe.single(text)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before: dict) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def _both(lm, method, ids, **kw):
    """Today's pair and the in-place one on the same model: their results (or their errors)."""
    recipe = _recipe(method)
    cal = ids if recipe.needs_calibration or recipe.has_cache_specs else None
    out = []
    for build in (make_pair, in_place_pair):
        try:
            pair = build(lm, recipe, calibration=cal)
            out.append((pair, divergence(pair, prompt_ids=ids, new_tokens=N, **kw)))
        except DTMError as exc:
            out.append((None, str(exc)))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"] + FAMILIES)
def test_in_place_equals_todays_pair_on_every_family_and_method(family):
    lm = make_tiny(family) if family in ("llama", "gpt2", "opt") else make(family)
    ids = random_prompts(4, seed=3)
    before = _state(lm.model)
    ran = 0
    for method in METHODS:
        (cp, a), (ip, b) = _both(lm, method, ids, free_run=True)
        if cp is None:            # a method that does not apply here refuses the same way
            assert b == a, (family, method)
            continue
        assert ip is not None, (family, method, b)
        assert ip.label == cp.label
        assert a.table.equals(b.table), (family, method)
        assert a.summary == b.summary or all(
            (a.summary[k] == b.summary[k]) or (a.summary[k] != a.summary[k]
                                                and b.summary[k] != b.summary[k])
            for k in a.summary), (family, method)
        assert ip.in_place.compressions == 1 and ip.in_place.applied is None
        assert _same_state(lm.model, before), (family, method)     # restored bit for bit
        ran += 1
    assert ran >= 10, family


@pytest.mark.parametrize("family", MOE)
def test_in_place_experts_are_compressed_in_the_model_without_overrides(family):
    lm = make(family)
    recipe = Recipe.single("int4:g8", "1.experts.down")
    copy_pair = make_pair(lm, recipe)
    pair = in_place_pair(lm, recipe)
    with pair.session():
        comp = pair.compressed_model()
        for (name, p), (_, q) in zip(comp.named_parameters(), copy_pair.compressed.named_parameters()):
            assert type(p) is torch.nn.Parameter, name        # a plain tensor, no ExpertOverrides
            assert torch.equal(p, q.full() if hasattr(q, "full") else q), name
        assert pair.applied.changed_bytes == copy_pair.applied.changed_bytes


def test_while_compressed_the_pair_holds_one_model(tmp_path):
    lm = make_tiny("llama")
    dense_bytes = tensor_bytes(lm.model)
    copy_pair = make_pair(lm, Recipe.single("int4:g16"))
    # today: the dense model plus a copy of every changed weight
    assert tensor_bytes(lm.model, copy_pair.compressed) == \
        dense_bytes + copy_pair.applied.changed_bytes > 1.5 * dense_bytes
    del copy_pair
    pair = in_place_pair(lm, Recipe.single("int4:g16"), keep="none")
    with pair.session():
        model = pair.compressed_model()
        assert model is lm.model
        assert tensor_bytes(model) == dense_bytes           # no copy, nothing kept aside
        assert pair.applied.keeper.dropped > 0
        assert pair.applied.keeper.kept_bytes == 0
    # a run that ended with "none" dropped the dense weights for good: said in one sentence
    with pytest.raises(DTMError, match="dense weights are gone"):
        divergence(pair, prompt_ids=random_prompts(2), new_tokens=4)


def test_restore_from_the_models_own_files_is_bit_exact(tmp_path, default_model):
    from dtm_core.models.load import load_model

    tiny = make_tiny("llama")
    tiny.model.save_pretrained(tmp_path / "m")
    default_model.tokenizer.save_pretrained(tmp_path / "m")    # any tokenizer: ids are given
    lm = load_model(str(tmp_path / "m"))
    bf = load_model(str(tmp_path / "m"), dtype="bfloat16")      # converted: in its own memory
    bf_before = _state(bf.model)
    assert lm.extra["files"] == str(tmp_path / "m")
    before = _state(lm.model)
    ids = random_prompts(3)
    ref = divergence(make_pair(lm, Recipe.single("gptq:int4:g16"), calibration=ids),
                     prompt_ids=ids, new_tokens=N)
    pair = in_place_pair(lm, Recipe.single("gptq:int4:g16"), calibration=ids, keep="auto")
    assert pair.in_place.keep == "auto"
    seen = {}
    with pair.session():
        res = divergence(pair, prompt_ids=ids, new_tokens=N)
        pair.compressed_model()
        seen["mode"] = pair.applied.keeper.mode
        seen["dropped"] = pair.applied.keeper.dropped
        seen["kept"] = pair.applied.keeper.kept_bytes
        seen["bytes"] = tensor_bytes(lm.model)
    assert seen["mode"] == "files"
    layers = len(lm.model.model.layers)
    assert seen["dropped"] == 7 * layers and seen["kept"] == 0     # every linear of every layer
    assert seen["bytes"] == tensor_bytes(lm.model)
    assert res.table.equals(ref.table)
    assert _same_state(lm.model, before)
    # the file replaced since the load (as a cache or a checkpoint is rewritten: a new file
    # renamed into place): a memory-mapped model still comes back from the mapping it holds
    import os
    from safetensors.torch import load_file, save_file
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.down_proj.weight"] += 1
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata={"format": "pt"})
    os.replace(tmp_path / "new.safetensors", f)
    pair = in_place_pair(lm, Recipe.single("int4:g16"), keep="files")
    with pair.session():
        pair.compressed_model()
    assert _same_state(lm.model, before)
    # a model held in its own memory (another dtype than the file's) is re-read from the files,
    # bit for bit, and a tensor the files no longer reproduce is never trusted: kept in memory
    pair = in_place_pair(bf, Recipe.single("int4:g16"), keep="files")
    with pair.session():
        pair.compressed_model()
        keeper = pair.applied.keeper
        kept, dropped = keeper.kept_bytes, keeper.dropped
    assert kept == before["model.layers.0.mlp.down_proj.weight"].numel() * 2
    assert dropped == 7 * layers - 1
    assert _same_state(bf.model, bf_before)


def test_evaluate_in_place_compresses_once_and_equals_todays_pair():
    lm = make_tiny("llama")
    lm.tokenizer = NumberTokenizer()
    ids = random_prompts(7, seed=5)
    recs = [PromptRecord(prompt=" ".join(map(str, s)), answers=(str(s[-1]),), line=i + 1)
            for i, s in enumerate(ids)]
    pset = PromptSet(name="tiny", records=recs)
    before = _state(lm.model)
    a = evaluate(make_pair(lm, Recipe.single("wanda:0.5"), calibration=pset.prompts), pset, N,
                 chunk=3, free_run=True)
    pair = in_place_pair(lm, Recipe.single("wanda:0.5"), calibration=pset.prompts)
    notes = []
    b = evaluate(pair, pset, N, chunk=3, free_run=True, progress=lambda f, m: notes.append(m))
    assert pair.in_place.compressions == 1          # three chunks, one compression
    assert b.table.equals(a.table)
    assert b.config["in_place"] and not a.config["in_place"]
    assert any(m.startswith("dense model") for m in notes)
    assert any(m.startswith("compressed model") for m in notes)
    assert _same_state(lm.model, before)
    with pytest.raises(DTMError, match="IntactKV"):
        evaluate(pair, pset, N, intactkv="1")


def test_kld_in_place_equals_todays_pair_on_the_default_model(default_model):
    text = ("The quick brown fox jumps over the lazy dog. " * 3
            + "Compression changes the model's numbers a little everywhere. ") * 12
    before = _state(default_model.model)
    s1, v1 = score_text(make_pair(default_model, Recipe.single("int4:g128")), text, ctx=64)
    pair = in_place_pair(default_model, Recipe.single("int4:g128"))
    s2, v2 = score_text(pair, text, ctx=64)
    assert s1 == s2
    assert pair.in_place.compressions == 1
    assert _same_state(default_model.model, before)
    # the default model's GGUF cache is where its tensors come back from
    assert pair.in_place.keep == "auto" and "files" in default_model.extra


def test_cli_runs_in_one_models_memory_with_the_same_numbers(tmp_path, capsys):
    from dtm_core.__main__ import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("The capital of France is\nWrite a haiku about rain.\n")
    out = {}
    for flag in ([], ["--two-models"]):
        j = tmp_path / f"summary{len(flag)}.json"
        assert main(["divergence", "--model", "default", "--compress", "int4:g128",
                     "--prompts", str(prompts), "--new-tokens", "6", "--json", str(j),
                     "--out", str(tmp_path / f"d{len(flag)}.csv")] + flag) == 0
        out[bool(flag)] = json.loads(j.read_text())
        side = json.loads(sidecar_path(tmp_path / f"d{len(flag)}.csv").read_text())
        assert side["config"]["in_place"] is (not flag)
    assert out[False] == out[True] and out[False]["fdt_mean"] >= 0


def test_compare_refuses_a_copy_that_does_not_fit_and_names_the_views_that_do(monkeypatch):
    import dtm_core.models.load as load
    from dtm_core.jobs import PairCache, PairRequest

    cache = PairCache()
    lm = make_tiny("llama")
    cache._dense = ("tiny", lm)
    monkeypatch.setattr(load, "_available_bytes", lambda device: 1000)
    req = PairRequest(model="tiny", compress="int4:g16")
    with pytest.raises(DTMError) as err:
        cache.open(req, ["a"])
    msg = str(err.value)
    assert msg.count(". ") == 0 and "GiB are free" in msg and "one model's memory" in msg
    assert "Prompt sets, KLD" in msg
    pair = cache.open(req, ["a"], in_place="auto")         # the one-model views still run
    assert pair.in_place is not None
    res = divergence(pair, prompt_ids=random_prompts(2), new_tokens=4)
    assert len(res.table) == 2
