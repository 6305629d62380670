"""LAYER.KIND names across architecture families, selections, and pairs of two checkpoints."""
import pytest

from dtm_core import DTMError
from dtm_core.models.components import all_components, family_of, parse_selection, resolve
from dtm_core.compression.pair import checkpoint_pair

from conftest import TinyTokenizer, make_tiny

KINDS = {"llama": ["q", "k", "v", "o", "gate", "up", "down"], "gpt2": ["qkv", "o", "up", "down"],
         "opt": ["q", "k", "v", "o", "up", "down"]}
MODULES = {"llama": "model.layers.1.mlp.down_proj", "gpt2": "transformer.h.1.mlp.c_proj",
           "opt": "model.decoder.layers.1.fc2"}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_names_per_family(family):
    lm = make_tiny(family)
    comps = all_components(lm.model)
    assert family_of(lm.model).name == family
    assert [c.name for c in comps] == [f"{l}.{k}" for l in range(3) for k in KINDS[family]]
    assert resolve(lm.model, "1.down")[0].path == MODULES[family]
    assert all(c.transposed == (family == "gpt2") for c in comps)


def test_selection_grammar():
    lm = make_tiny("llama")
    assert parse_selection("*.q,*.k,0-1.down", lm.model) == [
        "0.q", "0.k", "0.down", "1.q", "1.k", "1.down", "2.q", "2.k"]
    assert parse_selection("2.*", lm.model) == [f"2.{k}" for k in KINDS["llama"]]
    assert parse_selection(" 1.up , 1.up ", lm.model) == ["1.up"]
    assert len(parse_selection("*.*", lm.model)) == 21
    # what people type: * and all for everything, all as layers or kind, spaces after commas
    for every in ("*", "all", " ALL ", "all.all", "all.*"):
        assert parse_selection(every, lm.model) == parse_selection("*.*", lm.model), every
    assert parse_selection("all.q, 1.down", lm.model) == ["0.q", "1.q", "1.down", "2.q"]
    assert parse_selection("1.all", lm.model) == parse_selection("1.*", lm.model)


@pytest.mark.parametrize("bad,msg", [("5.q", "out of range"), ("0-7.q", "out of range"),
                                     ("2-1.q", "out of range"), ("*.qkv", "Unknown kind 'qkv'"),
                                     ("q", "not of the form"), ("", "Empty"),
                                     ("1.q;2.k", "not of the form")])
def test_selection_errors_list_valid_names(bad, msg):
    lm = make_tiny("llama")
    with pytest.raises(DTMError, match=msg) as e:
        parse_selection(bad, lm.model)
    assert "valid layers are 0-2" in str(e.value)
    assert "q, k, v, o, gate, up, down" in str(e.value)


def test_checkpoint_pair_refuses_other_tokenizer():
    a, b = make_tiny("llama", seed=0), make_tiny("llama", seed=1)
    pair = checkpoint_pair(a, b)
    assert pair.compressed is b.model and pair.label == b.source

    class Other(TinyTokenizer):
        def get_vocab(self):
            v = super().get_vocab()
            v["extra"] = v.pop("7")
            return v

    b.tokenizer = Other()
    with pytest.raises(DTMError, match="tokenizers .* differ"):
        checkpoint_pair(a, b)


def test_gguf_file_path_loads_like_default():
    from dtm_core.models.load import default_gguf_path, load_model

    m = load_model(str(default_gguf_path()))
    assert type(m.model).__name__ == "LlamaForCausalLM"
    assert len(all_components(m.model)) == 210
