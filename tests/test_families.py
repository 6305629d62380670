"""Every supported family on a tiny random-weight model built from its config, with a sliding
window (8 tokens) shorter than the prompts and soft-capping on where the family has it: teacher-
forced FDT equals real greedy divergence, sweep cells equal single-component pairs, the stream equals
the engine, IntactKV on an identical pair never diverges (also past the window), IntactKV K = whole
prompt equals continuing from the dense prompt cache; fused slices and experts compress as matrices
of their own."""
from __future__ import annotations

import pytest
import torch

from dtm_core.models.components import all_components, family_of, parse_selection, resolve
from dtm_core.compression.recipe import Recipe, apply_recipe, parse_spec
from dtm_core.measure.divergence import divergence
from dtm_core.errors import DTMError
from dtm_core.models.generation import greedy_generate
from dtm_core.models.load import LoadedModel, eos_ids
from dtm_core.compression.pair import make_pair, shared_copy, tensor_bytes
from dtm_core.measure.streaming import stream_pair
from dtm_core.analysis.sweep import sweep

from conftest import VOCAB, ChatNumberTokenizer, TinyTokenizer, greedy_fdt, hf_greedy
from test_intactkv import _greedy_from_dense_cache

N = 10
WINDOW = 8
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def config(family: str):
    import transformers as tf

    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=WINDOW)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                              max_window_layers=1)
    if family == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True,
                              sliding_window=WINDOW, max_window_layers=1)
    if family == "gemma2":
        return tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW,
                               final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
                               query_pre_attn_scalar=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention"],
                                   final_logit_softcapping=5.0, query_pre_attn_scalar=16)
    if family == "phi3":
        return tf.Phi3Config(**COMMON, sliding_window=WINDOW)
    if family == "gpt_neox":
        c = {k: v for k, v in COMMON.items() if k not in ("num_key_value_heads",)}
        return tf.GPTNeoXConfig(**c, rotary_pct=0.5)
    if family == "mixtral":
        return tf.MixtralConfig(**{**COMMON, "intermediate_size": 32}, num_local_experts=4,
                                num_experts_per_tok=2, sliding_window=WINDOW)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, decoder_sparse_step=1,
                                 mlp_only_layers=[0], norm_topk_prob=True)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                 decoder_sparse_step=1)
    if family == "gpt_oss":
        return tf.GptOssConfig(**{**COMMON, "intermediate_size": 32}, head_dim=16,
                               num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                               layer_types=["sliding_attention", "full_attention",
                                            "sliding_attention"],
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(family)


FAMILIES = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "mixtral",
            "qwen3_moe", "qwen2_moe", "gpt_oss"]
SLIDING = {"mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "gpt_oss"}


def make(family: str, seed: int = 0, scale: float = 4.0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config(family)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():   # bigger weights give peaked, non-degenerate distributions
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(scale)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=TinyTokenizer(), source=f"tiny-{family}",
                       description=f"tiny random {family}", fingerprint=f"tiny-{family}-{seed}")


def prompts(n: int, seed: int, lo: int = 3, hi: int = 20) -> list[list[int]]:
    """Prompts from a few tokens to over twice the window, each starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, VOCAB, (L,), generator=g).tolist() for L in lens]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    return make(request.param)


def first_kind(lm) -> str:
    return next(k for k in family_of(lm.model).kinds if k not in ("router",))


def test_family_is_recognized_with_its_kinds(fam):
    f = family_of(fam.model)
    assert f.name == fam.source.removeprefix("tiny-")
    comps = all_components(fam.model)
    assert comps and {c.kind for c in comps} <= set(f.kinds)
    if fam.source.removeprefix("tiny-") in SLIDING:
        assert f.sliding_window_layers(fam.model), "the config's sliding layers are known"


def test_fdt_equals_real_greedy_divergence(fam):
    """Padded batches, EOS, prompts longer than the window; the dense references are what
    transformers' own generate produces, and the compressed model's own greedy text first
    differs exactly at FDT."""
    pair = make_pair(fam, Recipe.single("int4", "1.*"))
    ps = prompts(8, seed=3)
    res = divergence(pair, prompt_ids=ps, new_tokens=N, generate_compressed=True, batch_size=3)
    eos = eos_ids(fam)
    for p, ref in zip(ps, res.references):
        assert ref == hf_greedy(fam.model, p, N, eos)
    assert res.table.fdt.tolist() == res.table.fdt_generated.tolist()
    assert res.table.fdt.min() < N, "the compression must show a divergence somewhere"
    ident = divergence(make_pair(fam, Recipe.single("none")), prompt_ids=ps, new_tokens=N)
    assert (ident.table.fdt == N).all() and (ident.table.kl_mean == 0).all()


def test_fdt_equals_real_greedy_divergence_through_a_chat_template(fam):
    """Prompt texts through a chat template (user turn and generation prompt around them), in
    padded batches: FDT is where the two models' own greedy texts first differ."""
    from dtm_core.models.generation import encode_prompts

    lm = LoadedModel(model=fam.model, tokenizer=ChatNumberTokenizer(), source=fam.source,
                     description=fam.description, fingerprint=fam.fingerprint + "-chat")
    texts = [" ".join(map(str, p[1:])) for p in prompts(6, seed=8)]
    pair = make_pair(lm, Recipe.single("int4", "1.*"))
    res = divergence(pair, texts, N, chat=True, generate_compressed=True, batch_size=4)
    ids = encode_prompts(lm.tokenizer, texts, chat=True)
    assert all(i[:2] == [1, 5] and i[-2:] == [6, 7] for i in ids)
    assert res.prompt_ids == ids
    eos = eos_ids(lm)
    for p, ref, fdt in zip(ids, res.references, res.table.fdt):
        dense = hf_greedy(fam.model, p, N, eos)
        comp = hf_greedy(pair.compressed, p, N, eos)
        assert ref == dense
        assert fdt == greedy_fdt(dense, comp, N)
    assert res.table.fdt.min() < N


def test_sweep_cells_equal_single_component_pairs(fam, tmp_path):
    ps = prompts(5, seed=11)
    res = sweep(fam, "int4", ps, N, cache_dir=tmp_path, layers="1")
    assert len(res.table) == len(family_of(fam.model).kinds_in(
        family_of(fam.model).decoder_layers(fam.model)[1]))
    for _, row in res.table.iterrows():
        d = divergence(make_pair(fam, Recipe.single("int4", row.component)), prompt_ids=ps,
                       new_tokens=N)
        assert row.fdt_mean == d.table.fdt.mean(), row.component
        assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)


def test_stream_equals_engine(fam):
    pair = make_pair(fam, Recipe.single("int4", "*.*"))
    for ids in prompts(2, seed=7, lo=10):
        st = list(stream_pair(pair, prompt_ids=ids, new_tokens=N))[-1]
        res = divergence(pair, prompt_ids=[ids], new_tokens=N)
        assert st.dense_tokens == res.references[0]
        assert st.fdt == res.table.fdt[0]
        assert [s.forced_token for s in st.steps if s.dense_token is not None] == \
            res.tokens[0].comp_argmax.tolist()
        own = greedy_generate(pair.compressed, [ids], N, 0, eos_ids(fam))[0]
        assert st.comp_tokens == own


@pytest.mark.parametrize("k", [1, 3])
def test_intactkv_on_an_identical_pair_never_diverges(fam, k):
    """Also for prompts longer than the sliding window, where the window's cache no longer holds
    the pivots."""
    pair = make_pair(fam, Recipe.single("none"))
    ps = prompts(6, seed=5, lo=WINDOW + 4, hi=3 * WINDOW)
    res = divergence(pair, prompt_ids=ps, new_tokens=N, intactkv=k, generate_compressed=True,
                     batch_size=4)
    assert (res.table.fdt == N).all() and (res.table.fdt_generated == N).all()
    assert (res.table.kl_mean == 0).all()


def test_intactkv_whole_prompt_is_continuing_from_the_dense_prompt_cache(fam):
    pair = make_pair(fam, Recipe.single("int3", "*.*"))
    ps = prompts(4, seed=13, lo=WINDOW, hi=2 * WINDOW)
    res = divergence(pair, prompt_ids=ps, new_tokens=N, intactkv=1000, generate_compressed=True)
    eos = eos_ids(fam)
    for i, p in enumerate(ps):
        own = _greedy_from_dense_cache(pair, p, N, eos)
        assert res.table.compressed_text[i] == " ".join(map(str, own))
        assert res.table.fdt_generated[i] == res.table.fdt[i]


def test_slices_of_fused_weights_compress_as_their_own_matrices():
    for family, fused, parts in (("phi3", "qkv", ("q", "k", "v")), ("gpt_neox", "qkv",
                                                                   ("q", "k", "v")),
                                 ("phi3", "gate_up", ("gate", "up"))):
        lm = make(family)
        whole = resolve(lm.model, f"1.{fused}")[0]
        before = whole.weight.detach().clone()
        rows = [resolve(lm.model, f"1.{p}")[0].rows for p in parts]
        assert torch.equal(torch.sort(torch.cat(rows)).values, torch.arange(before.shape[0]))
        for p, r in zip(parts, rows):
            with apply_recipe(lm.model, Recipe.single("magnitude:0.5", f"1.{p}")):
                after = resolve(lm.model, f"1.{fused}")[0].weight
                other = torch.ones(before.shape[0], dtype=torch.bool)
                other[r] = False
                assert torch.equal(after[other], before[other]), (family, p)
                want = parse_spec("magnitude:0.5").apply(before[r].float(), {})
                assert torch.equal(after[r], want), (family, p)
            assert torch.equal(whole.weight, before)
    # the slices are addressable but not part of "*"
    lm = make("phi3")
    assert "1.q" not in parse_selection("1.*", lm.model)
    assert parse_selection("1.q,1.v", lm.model) == ["1.q", "1.v"]
    with pytest.raises(DTMError, match="slices of fused weights: q, k, v, gate, up"):
        parse_selection("1.x", lm.model)


def test_gpt2_qkv_slices_follow_conv1d_orientation():
    from conftest import make_tiny

    lm = make_tiny("gpt2")
    q = resolve(lm.model, "0.q")[0]
    w = q.weight.detach().clone()                       # (in, out)
    with apply_recipe(lm.model, Recipe.single("nm:2:4", "0.q")):
        new = q.module.weight
        assert torch.equal(new[:, 64:], w[:, 64:])      # k and v columns untouched
        blocks = (new[:, :64].t() != 0).reshape(64, -1, 4).sum(-1)
        assert bool((blocks == 2).all())


MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


@pytest.mark.parametrize("family", MOE)
def test_one_expert_compresses_only_its_own_matrix(family):
    lm = make(family)
    layer = 1
    comp = resolve(lm.model, f"{layer}.e0.down")[0]
    before = comp.weight.detach().clone()             # (experts, out, in)
    with apply_recipe(lm.model, Recipe.single("int2", f"{layer}.e0.down")) as applied:
        after = comp.module.down_proj
        assert torch.equal(after[1:], before[1:])
        assert torch.equal(after[0], parse_spec("int2").apply(before[0].float(), {}))
        assert applied.changed_bytes == before[0].numel() * 4    # that expert's matrix only
    assert torch.equal(comp.module.down_proj, before)
    # "experts.down" compresses every expert's matrix on its own, group by group along its input
    with apply_recipe(lm.model, Recipe.single("int4:g8", f"{layer}.experts.down")):
        after = comp.module.down_proj
        for e in range(before.shape[0]):
            assert torch.equal(after[e], parse_spec("int4:g8").apply(before[e].float(), {}))
    names = parse_selection(f"{layer}.e*.gate", lm.model)
    assert names == [f"{layer}.e{e}.gate" for e in range(4)]


@pytest.mark.parametrize("family", MOE)
def test_compressing_experts_hard_changes_the_routers_choices(family):
    lm = make(family)
    pair = make_pair(lm, Recipe.single("magnitude:0.9", "0-1.experts.up,0-1.experts.gate,"
                                       "0-1.experts.down"))
    picks = {}
    for name, model in (("dense", lm.model), ("compressed", pair.compressed)):
        store = []
        fam = family_of(model)
        layers = fam.decoder_layers(model)
        router = layers[2].mlp.gate
        h = router.register_forward_hook(lambda m, a, o: store.append(o[2] if isinstance(o, tuple)
                                                                       else o.topk(2).indices))
        with torch.no_grad():
            model(input_ids=torch.tensor(prompts(4, seed=1, lo=12, hi=13)))
        h.remove()
        picks[name] = store[0]
    assert not torch.equal(picks["dense"], picks["compressed"])


def test_moe_pair_copies_only_the_compressed_parameters():
    lm = make("mixtral")
    dense = tensor_bytes(lm.model)
    down = lm.model.model.layers[1].mlp.experts.down_proj
    for sel, matrices in (("1.e2.down", 1), ("1.e0.down,1.e3.down", 2), ("1.experts.down", 4)):
        pair = make_pair(lm, Recipe.single("int4", sel))
        extra = tensor_bytes(lm.model, pair.compressed) - dense
        assert extra == pair.applied.changed_bytes == matrices * down[0].numel() * 4, sel
    # gate and up of one expert are rows of one matrix: one copy
    pair = make_pair(lm, Recipe.single("int4", "1.e1.gate,1.e1.up"))
    gate_up = lm.model.model.layers[1].mlp.experts.gate_up_proj
    assert tensor_bytes(lm.model, pair.compressed) - dense == gate_up[0].numel() * 4


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_one_experts_copy_computes_what_a_full_copy_computes(family):
    """The overridden experts parameter gives the same logits, bit for bit, as a full copy of
    the 3-D parameter with the same experts compressed, and restores to the dense model."""
    from dtm_core.compression.expert_overrides import ExpertOverrides

    lm = make(family)
    ps = prompts(4, seed=2)
    recipe = Recipe.single("int3", "1.e1.down,1.e3.gate,2.e0.up")
    pair = make_pair(lm, recipe)
    assert isinstance(pair.compressed.model.layers[1].mlp.experts.down_proj, ExpertOverrides)
    full = shared_copy(lm.model)
    with torch.no_grad():
        for layer, e, param, rows in ((1, 1, "down_proj", None), (1, 3, "gate_up_proj", 0),
                                      (2, 0, "gate_up_proj", 1)):
            experts = full.model.layers[layer].mlp.experts
            w = getattr(experts, param).detach().clone()
            m = w[e] if rows is None else w[e].view(2, -1, w.shape[-1])[rows]
            m.copy_(parse_spec("int3").apply(m.float().contiguous(), {}))
            setattr(experts, param, torch.nn.Parameter(w, requires_grad=False))
    for p in ps:
        x = torch.tensor([p])
        assert torch.equal(pair.compressed(x).logits, full(x).logits)
    d = divergence(pair, prompt_ids=ps, new_tokens=N)
    assert d.table.kl_mean.max() > 0
    pair.applied.restore()
    for p in ps:
        x = torch.tensor([p])
        assert torch.equal(pair.compressed(x).logits, lm.model(x).logits)


def test_parts_refuse_activation_quantization_with_a_sentence():
    with pytest.raises(DTMError, match="cannot apply to the part 1.q alone"):
        make_pair(make("phi3"), Recipe.single("w8a8", "1.q"))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_statistics_are_each_experts_own_routed_inputs(family):
    """Each expert's statistics come from the tokens the router sends to it: prompt by prompt
    without padding, the routed hidden states (gate_up) and act(gate) * up of them (down)."""
    from dtm_core.compression.calibration import Calibration, expert_key

    lm = make(family)
    seqs = prompts(5, 3)
    mod = lm.model.model.layers[1].mlp.experts
    keys = [expert_key("model.layers.1.mlp.experts", p, e)
            for p in ("gate_up_proj", "down_proj") for e in range(4)]
    got = Calibration(lm.model, seqs).many(["input_hessian", "input_norms"], keys)
    sums = {k: 0 for k in keys}
    n = {k: 0 for k in keys}
    seen = []
    h = mod.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach(), a[1])))
    for s in seqs:
        lm.model(torch.tensor([s]))
    h.remove()
    for x, idx in seen:
        for e in range(4):
            xe = x[(idx == e).any(-1)]
            g, u = torch.nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
            for k, inp in ((keys[e], xe), (keys[4 + e], mod.act_fn(g) * u)):
                sums[k] = sums[k] + inp.t() @ inp
                n[k] += len(inp)
    for k in keys:
        assert n[k] > 0
        torch.testing.assert_close(got[k]["input_hessian"], sums[k] * 2 / n[k], rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(got[k]["input_norms"], torch.diag(sums[k]).sqrt(), rtol=1e-4,
                                   atol=1e-5)


def test_calibrated_methods_on_experts_pairs_and_sweep_cells(tmp_path):
    lm = make("mixtral")
    seqs = prompts(6, 4)
    res = sweep(lm, "gptq:int3", seqs, N, cache_dir=tmp_path, layers="1", kinds="e*.down")
    assert len(res.table) == 4
    for _, row in res.table.iloc[:2].iterrows():
        pair = make_pair(lm, Recipe.single("gptq:int3", row.component), calibration=seqs)
        d = divergence(pair, prompt_ids=seqs, new_tokens=N)
        assert row.fdt_mean == d.table.fdt.mean()
    a = make_pair(lm, Recipe.single("wanda:0.5", "1.e0.down"), calibration=seqs)
    b = make_pair(lm, Recipe.single("magnitude:0.5", "1.e0.down"))
    wa = a.compressed.model.layers[1].mlp.experts.down_proj
    wb = b.compressed.model.layers[1].mlp.experts.down_proj
    assert not torch.equal(wa[0], wb[0]) and torch.equal(wa[1], wb[1])
    # a single one-token prompt reaches 2 of the 4 experts: the others have no statistics
    with pytest.raises(DTMError, match="received no calibration token"):
        make_pair(lm, Recipe.single("gptq:int4", "1.experts.down"), calibration=[[5]])


def test_an_unsupported_family_is_refused_in_one_sentence():
    from transformers import AutoModelForCausalLM, BloomConfig

    m = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1,
                                                     n_head=4))
    with pytest.raises(DTMError) as e:
        family_of(m)
    msg = str(e.value)
    assert "model_type 'bloom'" in msg and "Mixtral" in msg and "docs/architecture.md" in msg


@pytest.mark.parametrize("family", ["mistral", "gemma3", "qwen2"])
@pytest.mark.parametrize("k", [1, 3])
def test_intactkv_past_the_window_is_the_dense_pivot_cache_continued(family, k):
    """What IntactKV means for a sliding-window layer: the compressed model continues from the
    dense model's cache of the K pivot tokens, so a sliding layer attends to the dense pivot K/V
    while they are inside its window and, like the model itself, not once the window has moved
    past them. The obviously-correct reference computes exactly that: a dense prefill of the
    pivots, then the compressed model on the rest of the sequence on that cache."""
    from dtm_core.compression.intactkv import IntactKV, teacher_forced_pair

    lm = make(family)
    pair = make_pair(lm, Recipe.single("int3", "*.*"))
    seq = prompts(1, seed=21, lo=3 * WINDOW, hi=3 * WINDOW + 1)[0]
    _, c_logits = teacher_forced_pair(lm.model, pair.compressed, [seq], 0, [k], IntactKV(k=k))
    with torch.no_grad():
        cache = lm.model(input_ids=torch.tensor([seq[:k]]), use_cache=True).past_key_values
        ref = pair.compressed(input_ids=torch.tensor([seq[k:]]), past_key_values=cache,
                              use_cache=True).logits[0]
    torch.testing.assert_close(c_logits[0, k:], ref, rtol=1e-4, atol=1e-4)
    plain = pair.compressed(input_ids=torch.tensor([seq])).logits[0, k:]
    assert not torch.allclose(plain, ref, atol=1e-3)      # the pivots do matter


def test_expert_view_sweep_is_layer_by_expert(tmp_path):
    from dtm_core.analysis.sweep import heatmap_frame

    lm = make("mixtral")
    ps = prompts(4, seed=2)
    res = sweep(lm, "int2", ps, N, cache_dir=tmp_path, kinds="e*.down")
    view = heatmap_frame(res.table, "kl_mean")
    assert view.shape == (3, 4) and list(view.columns) == [f"e{e}.down" for e in range(4)]
    row = res.table.iloc[5]
    d = divergence(make_pair(lm, Recipe.single("int2", row.component)), prompt_ids=ps,
                   new_tokens=N)
    assert row.fdt_mean == d.table.fdt.mean()
    assert row.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-3, abs=1e-6)


def test_component_help_follows_the_family():
    from dtm_core.models.families import family_for_type, kinds_help

    assert "slices: q, k, v, gate, up" in kinds_help(family_for_type("phi3"))
    assert "one expert: eN.down" in kinds_help(family_for_type("mixtral"))
    assert "kinds: q, k, v, o, gate, up, down" in kinds_help(family_for_type("llama"))


def test_attention_sink_view_on_every_family(fam):
    from dtm_core.analysis.sinks import sink_tables

    ids = prompts(1, seed=4, lo=12, hi=13)[0]
    shares, acts = sink_tables(fam.model, ids, k=2)
    n_layers = len(family_of(fam.model).decoder_layers(fam.model))
    assert shares.layer.nunique() == len(acts) == n_layers
    assert ((shares.share >= 0) & (shares.share <= 1 + 1e-6)).all()
