"""Model sources, devices, dtypes and the de-quantized GGUF cache."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from dtm_core import DTMError
from dtm_core.models.load import (cache_root, default_gguf_path, load_model, resolve_dtype,
                                  validate_source)


def test_source_validation(tmp_path):
    assert validate_source("default") == "default"
    assert validate_source("someone/some-model") == "hub"
    (tmp_path / "m").mkdir()
    with pytest.raises(DTMError, match="no config.json"):
        validate_source(str(tmp_path / "m"))
    with pytest.raises(DTMError, match="does not exist"):
        validate_source(str(tmp_path / "x.gguf"))
    with pytest.raises(DTMError, match="neither an existing path"):
        validate_source("/no/such/folder")
    with pytest.raises(DTMError, match="No model"):
        validate_source("  ")


def test_hub_id_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DTMError, match="not in the local Hugging Face cache"):
        load_model("nobody-at-all/not-a-model", device="cpu")


def test_dtype_defaults():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(DTMError):
        resolve_dtype("int3", torch.device("cpu"))


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "dtm-inspector"
    assert cache_root("/x/y") == Path("/x/y")


def test_local_folder_round_trip(tmp_path):
    """A saved transformers folder loads back through the folder path with equal weights."""
    from conftest import make_tiny
    from transformers import AutoTokenizer

    lm = make_tiny("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    # reuse the default model's tokenizer files: the loader needs a real tokenizer in the folder
    tok_src = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(tok_src.parent), gguf_file=tok_src.name)
    tok.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"), device="cpu")
    for (n, a), (_, b) in zip(lm.model.named_parameters(), loaded.model.named_parameters()):
        assert torch.equal(a, b), n


def test_gguf_cache_is_reused_and_rebuilt_after_a_crash(tmp_path):
    """First load builds the cache; the second reads it with identical weights; a half-written
    cache (no completion marker, as a crash mid-write leaves) is never trusted."""
    first = load_model("default", cache_dir=str(tmp_path))
    assert not first.from_cache
    folders = list((tmp_path / "gguf").iterdir())
    assert len(folders) == 1 and (folders[0] / "complete.json").is_file()
    assert not [p for p in (tmp_path / "gguf").iterdir() if p.name.startswith(".tmp")]
    second = load_model("default", cache_dir=str(tmp_path))
    assert second.from_cache
    for (n, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), n
    ids = first.tokenizer("The capital of France is").input_ids
    assert ids == second.tokenizer("The capital of France is").input_ids
    # simulate a crash mid-write: the weights file is cut short and the marker is missing
    folder = folders[0]
    os.remove(folder / "complete.json")
    # the loaded models map their cache's files: what they hold is cloned before a file is cut
    head = first.model.lm_head.weight.detach().clone()
    del first, second
    weights = sorted(folder.glob("*.safetensors"))[0]     # the cache is sharded since issue 32
    with open(weights, "r+b") as fh:
        fh.truncate(1000)
    third = load_model("default", cache_dir=str(tmp_path))
    assert not third.from_cache
    assert (folder / "complete.json").is_file()
    assert torch.equal(third.model.lm_head.weight, head)
    shutil.rmtree(tmp_path / "gguf")
