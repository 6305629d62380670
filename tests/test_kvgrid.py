"""The K-bits x V-bits grid (issue 26): each cell is the pair of kv:intK on every layer's keys and
kv:intV on every layer's values, measured against the same dense references; the CLI prints the
two matrices and writes them; bad bit ranges are one sentence."""
from __future__ import annotations

import json

import pytest

from dtm_core.analysis.kvgrid import grid_matrix, kv_grid, parse_bits
from dtm_core.compression.pair import make_pair
from dtm_core.compression.recipe import Recipe
from dtm_core.errors import DTMError
from dtm_core.measure.divergence import divergence
from test_families import make, prompts

N = 8


def test_grid_cells_are_the_pairs_of_their_key_and_value_specs():
    lm = make("mistral")
    ps = prompts(5, seed=4)
    t = kv_grid(lm, ps, N, k_bits="2,8", v_bits=[3, 8], group=8)
    assert list(zip(t.k_bits, t.v_bits)) == [(2, 3), (2, 8), (8, 3), (8, 8)]
    for r in t.itertuples():
        d = divergence(make_pair(lm, Recipe.parse(f"kv:int{r.k_bits}:g8@*.kcache;"
                                                  f"kv:int{r.v_bits}:g8@*.vcache")),
                       prompt_ids=ps, new_tokens=N)
        assert r.fdt_mean == d.summary["fdt_mean"]
        assert r.kl_mean == pytest.approx(d.summary["kl_mean"], rel=1e-9)
        assert r.cache_bits == pytest.approx((r.k_bits + r.v_bits) / 2 + 16 / 8)
    m = grid_matrix(t, "kl_mean")
    assert list(m.index) == [2, 8] and list(m.columns) == [3, 8]
    assert m.loc[8, 8] < m.loc[2, 3]


def test_bits_ranges_and_bad_ones():
    assert parse_bits("2-8") == [2, 3, 4, 5, 6, 7, 8]
    assert parse_bits("2,4, 8") == [2, 4, 8] and parse_bits(None) == list(range(2, 9))
    for bad in ("1-4", "x", "9"):
        with pytest.raises(DTMError, match="Bits"):
            parse_bits(bad)


def test_cli_kvgrid_prints_and_writes_both_matrices(tmp_path, capsys):
    from dtm_core.cli import main

    f = tmp_path / "two.txt"
    f.write_text("The capital of France is\nWater boils at\n")
    out, js = tmp_path / "grid.csv", tmp_path / "grid.json"
    rc = main(["kvgrid", "--model", "default", "--prompts", str(f), "--new-tokens", "4",
               "--k-bits", "4,8", "--v-bits", "8", "--out", str(out), "--json", str(js)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean FDT (rows: key bits, columns: value bits)" in text and "mean KL" in text
    data = json.loads(js.read_text())
    assert data["kl_mean"]["k_bits"] == [4, 8] and data["kl_mean"]["v_bits"] == [8]
    import pandas as pd
    rows = pd.read_csv(out)
    assert rows.recipe.tolist() == ["kv:int4@*.kcache;kv:int8@*.vcache",
                                    "kv:int8@*.kcache;kv:int8@*.vcache"]
    assert [r[0] for r in data["kl_mean"]["values"]] == pytest.approx(rows.kl_mean.tolist())
