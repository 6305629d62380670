"""gpt-oss as OpenAI ships it: transformers' MXFP4 layout (``*_blocks`` / ``*_scales``) read on a
CPU, exactly, as the compressed side of a pair; and equal to the ``mxfp4`` spec on the same
experts (the spec's numbers are the checkpoint's)."""
from __future__ import annotations

import torch
from safetensors import safe_open

from checkpoint_writers import base_model, write_transformers_mxfp4


def test_gpt_oss_mxfp4_checkpoint_is_read_exactly_and_equals_the_spec(tmp_path):
    from transformers.integrations.mxfp4 import FP4_VALUES

    from dtm_core.compression.recipe import Recipe
    from dtm_core.compression.pair import make_pair
    from dtm_core.jobs import PairRequest, build_pair
    from dtm_core.measure.divergence import divergence
    from dtm_core.models.checkpoints import inspect
    from dtm_core.models.load import checkpoint_weights, load_model

    base = tmp_path / "base"
    base_model(base, family="gpt_oss", layers=2, hidden=64)
    ck = write_transformers_mxfp4(base, tmp_path / "mx")
    info = inspect(str(ck))
    assert info.kind == "mxfp4" and info.format == "MXFP4", info.text()
    assert info.groups[0].startswith("MXFP4 (transformers' layout") and info.quantized == 4
    assert "weights only" in info.activations
    assert "model.layers.*.self_attn" in info.kept

    # the reader's tensors, against the format's definition computed here value by value
    reader = checkpoint_weights(str(ck))
    f = safe_open(str(ck / "model.safetensors"), "pt")
    name = "model.layers.1.mlp.experts.down_proj"
    blocks, scales = f.get_tensor(name + "_blocks"), f.get_tensor(name + "_scales")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], -1).reshape(*blocks.shape[:-1], -1).long()
    want = lut[codes] * torch.pow(2.0, scales.double() - 127)[..., None]
    want = want.reshape(blocks.shape[0], blocks.shape[1], -1).transpose(1, 2).float()
    got = reader.tensor(name)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert name + "_blocks" not in reader.names() and name in reader.names()

    # the pair: the checkpoint as the compressed side equals the mxfp4 spec on every expert
    dense = load_model(str(base))
    pair = build_pair(dense, PairRequest(model=str(base), compressed_model=str(ck)))
    spec = make_pair(dense, Recipe.single("mxfp4", "*.experts.gate,*.experts.up,*.experts.down"))
    comp = dict(pair.compressed.named_parameters())
    ours = {n: p.detach() for n, p in spec.compressed.named_parameters()}
    dense_params = dict(dense.model.named_parameters())
    for n, p in comp.items():
        mine = ours[n].full() if hasattr(ours[n], "full") else ours[n]
        assert torch.equal(p.detach(), mine.detach()), n
        assert torch.equal(p, dense_params[n]) == ("experts." not in n or "bias" in n), n
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time"]
    res, again = divergence(pair, prompts, 8), divergence(spec, prompts, 8)
    assert res.table.fdt.tolist() == again.table.fdt.tolist()
    assert res.table.kl_mean.tolist() == again.table.kl_mean.tolist()
    assert (res.table.kl_mean > 0).all()
