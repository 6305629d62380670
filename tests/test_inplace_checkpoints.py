"""One model's memory for checkpoint pairs (issue 32): a compressed checkpoint whose format allows
it is read tensor by tensor into the dense model's own structure when a view's compressed pass
runs, instead of being loaded as a second model; the numbers equal today's pair of two models on
every such format (each checkpoint written here by its own writer), the dense model is bit for
bit as it was afterwards, and formats whose forward is not the base architecture on de-quantized
tensors keep a pair of two models."""
from __future__ import annotations

import pytest
import torch

import checkpoint_writers as W
from test_checkpoints import base, ck  # noqa: F401 (the tiny base model and its folder)
from test_inplace import _same_state, _state
from dtm_core.compression.pair import checkpoint_in_place_pair, tensor_bytes
from dtm_core.compression.swap import LOADER
from dtm_core.errors import DTMError
from dtm_core.jobs import PairCache, PairRequest, build_pair
from dtm_core.measure.divergence import divergence
from dtm_core.models import checkpoints as C

N = 8
PROMPTS = [[1, 450, 3681, 29], [1, 12, 7, 9, 1000, 4000], [1, 300, 301, 302, 303, 304, 305]]


def _write(ck, name):
    out = ck / name
    if out.exists():
        return out
    if name.startswith("ct-"):
        # the FP4 presets keep their own group sizes (16 for NVFP4, 32 for MXFP4)
        W.write_ct(ck / "base", out, name[3:], group_size=None if "FP4" in name else 32)
    elif name == "sparse-24":
        W.write_ct_sparse(ck / "base", out, "sparse-24-bitmask")
    elif name == "gptq":
        W.write_gptq(ck / "base", out, act_order=True)
    elif name == "awq":
        W.write_awq(ck / "base", out)
    elif name == "modelopt-nvfp4":
        W.write_modelopt(ck / "base", out, "NVFP4")
    elif name == "plain":          # another model of the same shapes, stored unquantized
        W.base_model(out, seed=1)
    return out


def _two_and_one(dense, source, prompts=PROMPTS, new_tokens=N):
    """Today's checkpoint pair (two models) and the in-place one, with their divergences."""
    info = C.inspect(source, base=dense.source)
    two = build_pair(dense, PairRequest(model=dense.source, compressed_model=source))
    assert two.in_place is None
    one = checkpoint_in_place_pair(dense, source, C.inspect(source, base=dense.source))
    assert one is not None, source
    kw = dict(prompt_ids=prompts, new_tokens=new_tokens, free_run=True)
    a = divergence(two, **kw)
    del two
    b = divergence(one, **kw)
    return info, one, a, b


@pytest.mark.parametrize("name", ["ct-W4A16", "ct-W4A16_ASYM", "ct-W8A16", "ct-NVFP4A16",
                                  "ct-MXFP4A16",
                                  "sparse-24", "gptq", "awq", "modelopt-nvfp4", "plain"])
def test_a_checkpoint_read_into_the_dense_model_equals_the_pair_of_two_models(ck, base, name):
    """compressed-tensors weight-only schemes, integer and FP4 (through transformers, or the
    library's own decompressor where transformers fails: the asymmetric one), a legacy 2:4 bitmask, GPTQ and AWQ
    (de-quantized here), ModelOpt NVFP4 (with its static input quantization hooks) and a plain
    folder: the divergence tables, references and summaries equal today's pair exactly, the
    checkpoint is applied once, and the dense model is bit for bit as it was."""
    source = str(_write(ck, name))
    before = _state(base.model)
    info, one, a, b = _two_and_one(base, source)
    assert b.references == a.references
    assert a.table.equals(b.table), name
    assert all(a.summary[k] == b.summary[k] or (a.summary[k] != a.summary[k]
                                                 and b.summary[k] != b.summary[k])
               for k in a.summary), name
    assert b.table.kl_mean.min() > 0         # the checkpoint really changes the model
    assert one.in_place.compressions == 1 and one.in_place.applied is None
    assert one.label == source and one.compressed_source == source
    assert one.config["checkpoint"]["loader"] == LOADER
    assert one.config["checkpoint"]["kind"] == info.kind
    assert _same_state(base.model, before), name


def test_while_the_checkpoint_is_in_the_dense_model_it_holds_one_model(ck, base):
    """While compressed, the model's tensors total one model's bytes (the replaced ones went back
    to their files: the base was loaded memory-mapped from its safetensors) and every changed
    weight is the checkpoint's own de-quantized tensor; restored afterwards, hooks included."""
    source = str(_write(ck, "modelopt-nvfp4"))
    dense_bytes = tensor_bytes(base.model)
    before = _state(base.model)
    hooks = sum(len(m._forward_pre_hooks) for m in base.model.modules())
    pair = checkpoint_in_place_pair(base, source)
    from dtm_core.models.load import checkpoint_weights

    weights = checkpoint_weights(source)
    with pair.session():
        model = pair.compressed_model()
        assert model is base.model
        assert tensor_bytes(model) == dense_bytes
        assert pair.applied.keeper.mode == "files" and pair.applied.keeper.kept_bytes == 0
        changed = 0
        for n, p in model.named_parameters():
            t = weights.tensor(n)
            assert torch.equal(p, t.to(p.dtype)), n
            changed += not torch.equal(p, before[n])
        assert changed == pair.applied.changed_params == 14
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks + 14
    assert _same_state(base.model, before)
    assert sum(len(m._forward_pre_hooks) for m in base.model.modules()) == hooks


def test_formats_run_by_their_own_kernels_keep_a_pair_of_two_models(ck, base):
    """compressed-tensors with activation quantization (the library's forward rounds unlike a
    per-module hook in the last bits) is loaded as a model of its own, so its numbers stay the
    library's; the job layer falls back to that pair by itself."""
    source = str(_write(ck, "ct-W8A8"))
    assert checkpoint_in_place_pair(base, source) is None
    cache = PairCache()
    cache._dense = (str(ck / "base"), base)
    pair = cache.open(PairRequest(model=str(ck / "base"), compressed_model=source),
                      in_place="auto")
    assert pair.in_place is None and pair.compressed is not base.model


def test_another_base_is_refused_in_the_same_words(ck, base, tmp_path):
    """A checkpoint of another shape is refused before anything is read into the model."""
    W.base_model(tmp_path / "wide", hidden=96)
    before = _state(base.model)
    with pytest.raises(DTMError, match="is not a compression of"):
        checkpoint_in_place_pair(base, str(tmp_path / "wide"))
    assert _same_state(base.model, before)


def test_a_gguf_checkpoint_of_the_default_model_runs_in_its_memory(default_model, tmp_path,
                                                                  default_q4_gguf, capsys):
    """A re-quantized GGUF of the default model as the compressed side: read into the default
    model (its tied embeddings stay tied) with today's numbers, and the CLI's divergence runs it
    in place by itself with the summary of the pair of two models."""
    import json

    from dtm_core.__main__ import main
    from dtm_core.measure.exports import sidecar_path
    from dtm_core.models.generation import encode_prompts
    q4 = default_q4_gguf
    texts = ["The capital of France is", "def add(a, b):"]
    ids = encode_prompts(default_model.tokenizer, texts)
    before = _state(default_model.model)
    info, one, a, b = _two_and_one(default_model, str(q4), ids, new_tokens=6)
    assert a.table.equals(b.table) and b.references == a.references
    assert info.kind == "gguf" and b.table.kl_mean.min() > 0
    m = default_model.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert _same_state(m, before)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(texts) + "\n")
    j = tmp_path / "summary.json"
    assert main(["divergence", "--model", "default", "--compressed-model", str(q4),
                 "--prompts", str(prompts), "--new-tokens", "6", "--json", str(j),
                 "--out", str(tmp_path / "d.csv")]) == 0
    capsys.readouterr()
    assert json.loads(sidecar_path(tmp_path / "d.csv").read_text())["config"]["in_place"]
    got = json.loads(j.read_text())
    same = [k for k in got if k in a.summary]
    assert "fdt_mean" in same and len(same) > 10
    assert all(got[k] == a.summary[k] or got[k] != got[k] and a.summary[k] != a.summary[k]
               for k in same)


def test_a_gpt_oss_mxfp4_checkpoint_fills_the_experts_parameters_in_place(tmp_path):
    """gpt-oss's MXFP4 experts (transformers' ``*_blocks`` / ``*_scales`` layout, one 3-D
    parameter per projection): read into the dense model's experts parameters, the numbers of
    the pair of two models, the dense model restored bit for bit."""
    from dtm_core.models.load import load_model

    W.base_model(tmp_path / "base", family="gpt_oss", layers=2, hidden=64)
    ck = W.write_transformers_mxfp4(tmp_path / "base", tmp_path / "mx")
    dense = load_model(str(tmp_path / "base"))
    before = _state(dense.model)
    info, one, a, b = _two_and_one(dense, str(ck))
    assert a.table.equals(b.table) and b.references == a.references
    assert b.table.kl_mean.min() > 0
    assert _same_state(dense.model, before)
