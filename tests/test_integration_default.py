"""Integration on the real default model (SmolLM2-135M-Instruct): FDT exactness and the CLI."""
import csv
import subprocess
import sys

import pytest

from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence, first_difference
from dtm_core.models.generation import encode_prompts
from dtm_core.models.load import eos_ids
from dtm_core.compression.pair import make_pair

from conftest import ROOT, hf_greedy, WAIT_S

PROMPTS = [
    "The capital of France is", "Once upon a time", "def fibonacci(n):",
    "The three primary colors are", "In 1492, Columbus", "Water boils at",
    "Write one word: hello.", "The quick brown fox", "To be or not to be,",
    "Machine learning is", "The largest planet in the solar system is", "How do I bake bread?",
    "Translate to French: cat", "Reply with just OK.", "List three fruits:", "2 + 2 =",
]
N = 24


@pytest.mark.parametrize("recipe,chat", [("int8", False), ("int4:g64@*.v,*.o", True),
                                         ("magnitude:0.3@*.up", False), ("wanda:0.4@0-9.*", True)])
def test_fdt_equals_real_greedy_divergence(default_model, recipe, chat):
    """For every prompt FDT equals where the compressed model's own greedy generation first
    leaves the dense model's, with padded batches, EOS endings and chat-template prompts."""
    pair = make_pair(default_model, Recipe.parse(recipe), calibration=PROMPTS, chat=chat)
    res = divergence(pair, PROMPTS, N, chat=chat, batch_size=6)
    ids = encode_prompts(default_model.tokenizer, PROMPTS, chat=chat)
    assert len({len(i) for i in ids}) > 3, "prompts of several lengths, so batches are padded"
    eos = eos_ids(default_model)
    for i, p in enumerate(ids):
        gd = hf_greedy(default_model.model, p, N, eos, pad_id=2)
        gc = hf_greedy(pair.compressed, p, N, eos, pad_id=2)
        assert res.references[i] == gd, f"prompt {i}: reference differs from real greedy"
        assert res.table.fdt[i] == first_difference(gd, gc, N), f"prompt {i}"
    assert (res.table.dense_self_agree == 1.0).all()
    if chat:
        assert res.table.ended_eos.any(), "chat prompts should include continuations ending in EOS"
    assert res.table.fdt.nunique() > 1


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dtm_core", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT_S)


def test_cli_divergence_csv(tmp_path, default_model):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join('{"prompt": "%s"}' % p for p in PROMPTS[:5]))
    out = tmp_path / "o.csv"
    r = run_cli("divergence", "--model", "default", "--compress", "int8", "--components",
                "*.q,*.k,0-3.down", "--prompts", str(prompts), "--new-tokens", "12",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "fdt_mean" in r.stdout and "sdt_mean" in r.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5
    for col in ["prompt_index", "fdt", "sdt", "kl_mean", "kl_max", "top1_agree", "n_tokens",
                "dense_text", "compressed_text"]:
        assert col in rows[0]
    pair = make_pair(default_model, Recipe.single("int8", "*.q,*.k,0-3.down"))
    res = divergence(pair, PROMPTS[:5], 12)
    assert [int(r["fdt"]) for r in rows] == list(res.table.fdt)


@pytest.mark.parametrize("args,msg", [
    (["--compress", "int9"], "Accepted forms"),
    (["--compress", "int8", "--components", "99.q"], "valid layers are 0-29"),
    (["--compress", "int8", "--components", "*.qkv"], "valid kinds are q, k, v, o, gate, up, down"),
    (["--compress", "int8", "--model", "/no/such"], "neither an existing path"),
    (["--compress", "int8", "--prompts", "/no/file.txt"], "does not exist"),
    (["--compress", "int8", "--compressed-model", "x/y"], "exactly one compressed side"),
])
def test_cli_errors_are_one_sentence(tmp_path, args, msg):
    p = tmp_path / "p.txt"
    p.write_text("hello\n")
    base = ["divergence", "--prompts", str(p), "--new-tokens", "4"]
    r = run_cli(*base, *args)
    assert r.returncode != 0
    assert msg in r.stderr
    assert "Traceback" not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("error:")]) == 1
