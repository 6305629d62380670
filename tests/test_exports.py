"""Every table the CLI and the app write reads back with ``pandas.read_csv(path)`` and default
arguments: header first, no comment line, texts with '#', commas, quotes, newlines and non-ASCII
intact; the configuration is in ``NAME.json`` beside the file; Parquet alike."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from dtm_core.compression.recipe import Recipe
from dtm_core.measure.evaluate import evaluate
from dtm_core.measure.exports import read_table, sidecar_path, write_table
from dtm_core.jobs import PairCache
from dtm_core.compression.pair import make_pair
from dtm_core.measure.prompts import load_prompts

from conftest import NumberTokenizer, make_tiny

TRICKY = ["use # for comments", "a, b", 'say "hi"', "\n", "é ü 漢字", "x\r\ny", "#", " ,\"",
          "NaN-free", "tab\there"]


class TrickyTokenizer(NumberTokenizer):
    """Numbers in the text are the token ids (other words are ignored); every id decodes to one
    of the texts that break naive CSV handling."""

    def __call__(self, text, add_special_tokens=True):
        class Encoded:
            input_ids = [int(w) for w in text.split() if w.isdigit()]
        return Encoded()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(TRICKY[int(i) % len(TRICKY)] for i in ids) or "∅"


PROMPTS = ['12 use # for comments, 40 "quoted" 17', "9 line one\nline two 33 é 漢字",
           "5 a,b,c 21 # not a comment 8", "30 plain 31 32"]


@pytest.fixture(scope="module")
def tricky(tmp_path_factory):
    lm = make_tiny("llama", scale=4.0)
    lm.tokenizer = TrickyTokenizer()
    folder = tmp_path_factory.mktemp("p")
    f = folder / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p, "answer": "a, \"b\" # c"}) for p in PROMPTS)
                 + "\n", encoding="utf-8")
    return lm, str(f)


def same(back: pd.DataFrame, table: pd.DataFrame):
    assert list(back.columns) == list(map(str, table.columns))
    assert len(back) == len(table)
    for col in table.columns:
        if table[col].dtype == object:
            assert back[col].astype(str).tolist() == table[col].astype(str).tolist(), col
        else:
            assert back[col].tolist() == pytest.approx(table[col].tolist(), nan_ok=True), col


def test_evaluate_tables_round_trip_through_pandas_defaults(tricky, tmp_path):
    lm, path = tricky
    res = evaluate(make_pair(lm, Recipe.single("int4")), load_prompts(path), 6)
    assert any("#" in t for t in res.table.prompt) and any("\n" in t for t in res.table.prompt)
    assert any(set(t) & set("#,\"\n") for t in res.table.compressed_text)
    for name in ("run.csv", "run.parquet"):
        written = res.write(tmp_path / name)
        assert [p.name for p in written] == [name, "run.json"]
        back = pd.read_csv(tmp_path / name) if name.endswith(".csv") else \
            pd.read_parquet(tmp_path / name)
        same(back, res.table)
        assert json.loads((tmp_path / "run.json").read_text())["config"] == \
            json.loads(json.dumps(res.config, default=str))
    first = (tmp_path / "run.csv").read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("prompt_index,") and not first.startswith("#")


def test_cli_tables_round_trip(tricky, tmp_path, monkeypatch, capsys):
    import dtm_core.cli as cli
    import dtm_core.cli.options as options

    lm, path = tricky
    cache = PairCache()
    cache._dense = ("tiny", lm)
    monkeypatch.setattr(options, "pair_cache", lambda args: cache)
    out = tmp_path / "ev.csv"
    js = tmp_path / "ev-full.json"
    assert cli.main(["evaluate", "--model", "tiny", "--compress", "int4", "--prompts", path,
                     "--new-tokens", "6", "--out", str(out), "--json", str(js)]) == 0
    rows = pd.DataFrame(json.loads(js.read_text(encoding="utf-8"))["rows"])
    same(pd.read_csv(out), rows)
    printed = capsys.readouterr().out
    assert "worst prompts by lowest FDT" in printed and "worst prompts by highest mean KL" in printed
    assert "flips_correct_to_wrong" in printed and "accuracy_mcnemar_p" in printed
    assert json.loads(sidecar_path(out).read_text())["config"]["new_tokens"] == 6
    out = tmp_path / "div.csv"
    assert cli.main(["divergence", "--model", "tiny", "--compress", "int4", "--prompts", path,
                     "--new-tokens", "6", "--generate-compressed", "--out", str(out)]) == 0
    back = pd.read_csv(out)
    assert len(back) == len(PROMPTS) and back.compressed_text.str.contains("#").any()
    assert json.loads(sidecar_path(out).read_text())["config"]["command"] == "divergence"
    text = tmp_path / "t.txt"
    text.write_text(" ".join(str(3 + i % 90) for i in range(120)), encoding="utf-8")
    out = tmp_path / "kld.csv"
    assert cli.main(["kld", "--model", "tiny", "--compress", "int4", "--text", str(text),
                     "--ctx", "32", "--out", str(out), "--json", str(tmp_path / "k.json")]) == 0
    back = pd.read_csv(out).set_index("statistic").value
    assert back["kld_mean"] == pytest.approx(
        json.loads((tmp_path / "k.json").read_text())["kld_mean"], rel=1e-12)
    assert json.loads(sidecar_path(out).read_text())["config"]["ctx"] == 32
    for name in ("sw.csv", "sw.parquet"):
        out = tmp_path / name
        assert cli.main(["sweep", "--model", "tiny", "--compress", "int4", "--prompts", path,
                         "--new-tokens", "4", "--layers", "1", "--cache-dir",
                         str(tmp_path / "c"), "--out", str(out)]) == 0
        back = read_table(out)
        assert back.component.tolist() == ["1.q", "1.k", "1.v", "1.o", "1.gate", "1.up", "1.down"]
        assert json.loads(sidecar_path(out).read_text())["config"]["spec"] == "int4"


def test_app_tables_round_trip(tricky, tmp_path, monkeypatch):
    from ui import common, prompt_sets, sensitivity

    lm, path = tricky
    monkeypatch.setattr(common, "CACHE", PairCache())
    common.CACHE._dense = ("tiny", lm)
    out = prompt_sets.run_set("tiny", "int4", "", "*.*", "", path, "general", False, 6,
                              progress=lambda *a, **k: None)
    csv_path, json_path, parquet_path = out[5], out[6], out[10]
    data = json.loads(open(json_path, encoding="utf-8").read())
    rows = pd.DataFrame(data["rows"])
    same(pd.read_csv(csv_path), rows)
    same(pd.read_parquet(parquet_path), rows)
    assert "config" in data
    heat, table, msg, csv, state, parquet = sensitivity.run_sweep(
        "tiny", "int4", path, "general", False, 4, "1", "q,down", "fdt_mean",
        progress=lambda *a, **k: None)
    assert "Done" in msg, msg
    same(pd.read_csv(csv), pd.read_parquet(parquet))
    assert json.loads(sidecar_path(csv).read_text())["config"]["spec"] == "int4"


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name == "pyarrow":
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    from dtm_core.errors import DTMError
    with pytest.raises(DTMError, match="pip install pyarrow"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.parquet")
