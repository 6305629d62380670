"""The job layer the app and the CLI share: one calibration policy (a wanda sweep cell opened in
Compare is the very pair the cell measured), one comparison type and suffix rule, typed requests
checked before any model work, Stop signals that do not outlive their job."""
from __future__ import annotations

import threading

import pandas as pd
import pytest
import torch

from dtm_core.compression.calibration import calibration_from, calibration_for
from dtm_core.compression.recipe import Recipe
from dtm_core.measure.divergence import divergence
from dtm_core.errors import DTMError
from dtm_core.compression.intactkv import IntactKV
from dtm_core.jobs import (CalibrationSetting, IntactKVSetting, PairRequest, build_pair,
                           compare_variants, sweep_variants)
from dtm_core.compression.pair import make_pair

from conftest import NumberTokenizer, make_tiny, random_prompts

N = 8


def quiet(*a, **k):
    return None


def test_wanda_sweep_cell_opened_in_compare_is_the_measured_pair(tmp_path, monkeypatch,
                                                                  default_model):
    """The Sensitivity tab's handler, then the Compare tab's pair for the clicked cell."""
    from ui import common, compare, sensitivity

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    common.CACHE._dense = ("default", default_model)      # the session's loaded default model
    common.CACHE._pairs.clear()
    f = tmp_path / "few.txt"
    f.write_text("The capital of France is\nWater boils at\nOnce upon a time\n")
    heat, table, msg, csv, state, parquet = sensitivity.run_sweep(
        "default", "wanda:0.5", str(f), "general", False, N, "4", "q,down", "fdt_mean",
        progress=quiet)
    assert "Done" in msg, msg
    # the page rounds what it shows; the exported cells keep full precision
    assert table["mean FDT (tokens)"].tolist() == sorted(table["mean FDT (tokens)"].tolist())
    cell = pd.read_csv(csv).set_index("component").loc["4.down"]
    opened = sensitivity._open_cell(state, "4.down")
    assert opened[3] == "4.down" and opened[4] == "The capital of France is"
    calibration = opened[7]["value"]
    req = common.pair_request("default", opened[1], opened[2], opened[3], "", opened[5],
                              calibration)
    pair = common.CACHE.open(req, [opened[4]])       # what Compare opens for that prompt
    assert "few.txt" in pair.calibration.label
    prompts = f.read_text().splitlines()
    from dtm_core.models.generation import encode_prompts
    ids = encode_prompts(default_model.tokenizer, prompts)
    assert pair.calibration is calibration_for(default_model.model, ids)   # the sweep's
    d = divergence(pair, prompts, N)
    assert cell.fdt_mean == d.table.fdt.mean()
    assert cell.kl_mean == pytest.approx(d.table.kl_mean.mean(), rel=1e-4, abs=1e-9)
    # before the fix the app calibrated on another set: a different pair (the test can fail)
    other = make_pair(default_model, Recipe.single("wanda:0.5", "4.down"),
                      calibration=[opened[4]])
    w_cell = pair.compressed.model.layers[4].mlp.down_proj.weight
    assert not torch.equal(other.compressed.model.layers[4].mlp.down_proj.weight, w_cell)
    # the Compare handler itself says what the pair was calibrated on
    outs = list(compare.compare("default", opened[1], opened[2], opened[3], "", opened[4],
                                False, 4, calibration=calibration, progress=quiet))
    assert "Calibration statistics from 'few.txt' (3 prompts)" in outs[-1][6]  # status; the strip follows


def test_calibration_is_gathered_once_and_shared(tmp_path):
    tiny = make_tiny("llama", scale=4.0)
    prompts = random_prompts(5, seed=1)
    cal = calibration_for(tiny.model, prompts)
    assert calibration_from(tiny, prompts) is cal
    make_pair(tiny, Recipe.single("wanda:0.5", "0.*"), calibration=prompts)
    passes = cal.passes
    make_pair(tiny, Recipe.single("wanda:0.3", "0.q,0.k"), calibration=prompts)   # subset
    sweep_variants(tiny, "wanda:0.5", prompts, N, cache_dir=tmp_path, layers="0")
    assert cal.passes == passes == 1
    hess = cal.get("input_hessian", ["model.layers.0.mlp.down_proj"])
    x = []
    mod = tiny.model.model.layers[0].mlp.down_proj
    h = mod.register_forward_pre_hook(lambda m, a: x.append(a[0][0].double()))
    for p in prompts:
        tiny.model(input_ids=torch.tensor([p]))
    h.remove()
    xs = torch.cat(x)
    want = 2 / len(xs) * xs.t() @ xs
    torch.testing.assert_close(hess["model.layers.0.mlp.down_proj"].double(), want, rtol=1e-4,
                               atol=1e-4)
    assert cal.passes == 2


def test_requests_fail_before_any_model_work():
    with pytest.raises(DTMError, match="exactly one compressed side"):
        PairRequest(compress="int4", compressed_model="x").validate()
    with pytest.raises(DTMError, match="Accepted forms"):
        PairRequest(compress="int99").validate()
    with pytest.raises(DTMError, match="IntactKV must be off"):
        IntactKVSetting(pivots="lots").parse()
    with pytest.raises(DTMError, match="needs pivot tokens"):
        IntactKVSetting(pivots="off", calibrated=True).parse()
    with pytest.raises(DTMError, match="does not exist"):
        CalibrationSetting("no/such/file.txt").texts(["a"])
    assert CalibrationSetting.of("prompts in use") == CalibrationSetting()
    texts, label = CalibrationSetting().texts(["a b", "c"])
    assert texts == ["a b", "c"] and "2 prompts" in label


def test_build_pair_uses_the_evaluated_prompts_or_the_file(tmp_path):
    tiny = make_tiny("llama", scale=4.0)
    tiny.tokenizer = NumberTokenizer()
    texts = [" ".join(map(str, p)) for p in random_prompts(4, seed=2)]
    f = tmp_path / "cal.txt"
    f.write_text("\n".join(" ".join(map(str, p)) for p in random_prompts(6, seed=9)) + "\n")
    a = build_pair(tiny, PairRequest(compress="wanda:0.5", components="1.up"), texts)
    b = build_pair(tiny, PairRequest(compress="wanda:0.5", components="1.up",
                                     calibration=CalibrationSetting(str(f))), texts)
    assert "evaluated" in a.calibration.label and "cal.txt" in b.calibration.label
    wa = a.compressed.model.layers[1].mlp.up_proj.weight
    wb = b.compressed.model.layers[1].mlp.up_proj.weight
    assert not torch.equal(wa, wb)
    assert build_pair(tiny, PairRequest(compress="int4"), []).calibration is None


def test_variant_comparison_one_type_one_suffix_rule():
    tiny = make_tiny("llama", scale=4.0)
    prompts = [[1] + p for p in random_prompts(4, seed=5)]
    pair = make_pair(tiny, Recipe.single("int3", "*.*"))
    cmp = compare_variants(pair, prompts, N, {"plain": None, "intactkv": IntactKV(k=2)})
    plain, intact = cmp.runs["plain"], cmp.runs["intactkv"]
    assert intact.references == plain.references
    wide = cmp.wide("plain", ["fdt", "kl_mean"])
    assert wide.fdt_intactkv.tolist() == intact.table.fdt.tolist()
    assert wide.fdt.tolist() == plain.table.fdt.tolist()
    other = cmp.wide("intactkv", ["fdt"])
    assert other.fdt_plain.tolist() == plain.table.fdt.tolist()
    summary = cmp.summary_table()
    assert list(summary.variant) == ["plain", "intactkv"]
    assert summary.fdt_mean.tolist() == [plain.summary["fdt_mean"], intact.summary["fdt_mean"]]


def test_stop_signals_do_not_outlive_their_job():
    from ui.common import Stops

    stops = Stops()

    class Req:
        session_hash = "s1"

    with stops.running("sweep", Req()) as ev:
        assert len(stops) == 1
        assert stops.stopper("sweep", "ok")(Req()) == "ok" and ev.is_set()
    assert len(stops) == 0
    with pytest.raises(RuntimeError):
        with stops.running("set", Req()):
            raise RuntimeError("boom")
    assert len(stops) == 0
    assert isinstance(threading.Event(), type(ev))


def test_calibration_text_cut_into_chunks_and_samples(tmp_path):
    """--calib-ctx cuts the calibration text (joined lines) into chunks of that many tokens,
    --calib-samples keeps the first M sequences; the pair says so and is calibrated on them."""
    tiny = make_tiny("llama", scale=4.0)
    tiny.tokenizer = NumberTokenizer()
    f = tmp_path / "text.txt"
    lines = [" ".join(str(3 + (7 * i + j) % 90) for j in range(i % 5 + 3)) for i in range(20)]
    f.write_text("\n".join(lines) + "\n")
    flat = [int(w) for line in lines for w in line.split()]
    seqs, label = CalibrationSetting(str(f), ctx=16).sequences(tiny.tokenizer, ["x"])
    assert seqs == [flat[i:i + 16] for i in range(0, len(flat) // 16 * 16, 16)]
    assert f"cut into {len(flat) // 16} chunks of 16 tokens" in label
    seqs, label = CalibrationSetting(str(f), ctx=16, samples=3).sequences(tiny.tokenizer, ["x"])
    assert seqs == [flat[:16], flat[16:32], flat[32:48]] and "the first 3" in label
    seqs, _ = CalibrationSetting(str(f), samples=2).sequences(tiny.tokenizer, ["x"])
    assert seqs == [[int(w) for w in lines[0].split()], [int(w) for w in lines[1].split()]]
    # evaluated token ids are chunked too
    seqs, _ = CalibrationSetting(ctx=4).sequences(tiny.tokenizer, [[5, 6, 7], [8, 9, 10, 11, 12]])
    assert seqs == [[5, 6, 7, 8], [9, 10, 11, 12]]
    pair = build_pair(tiny, PairRequest(compress="gptq:int3", components="1.up",
                                        calibration=CalibrationSetting(str(f), 16, 3)), ["1 2"])
    assert "chunks of 16 tokens, the first 3" in pair.calibration.label
    assert pair.calibration.seqs == [flat[:16], flat[16:32], flat[32:48]]
    for bad in (dict(ctx=1), dict(samples=0)):
        with pytest.raises(DTMError, match="calibration"):
            CalibrationSetting(str(f), **bad)
    long = tmp_path / "long.txt"
    long.write_text(" ".join(str(3 + i % 90) for i in range(600)))
    with pytest.raises(DTMError, match="calib-ctx"):    # 300-token chunks > 256 positions
        build_pair(tiny, PairRequest(compress="gptq:int3", components="1.up",
                                     calibration=CalibrationSetting(str(long), 300)), ["1 2"])


def test_every_command_with_compress_takes_the_calibration_options():
    from dtm_core.cli import build_parser
    from dtm_core.cli.options import calibration_setting as _calibration

    parser = build_parser()
    base = {"divergence": ["--prompts", "p"], "evaluate": ["--prompts", "p"],
            "kld": ["--text", "t"], "sweep": ["--prompts", "p"], "plan": ["--prompts", "p"],
            "intactkv-calibrate": ["--prompts", "p"]}
    for cmd, extra in base.items():
        args = parser.parse_args([cmd, "--compress", "awq:int4", *extra, "--calibration",
                                  "c.txt", "--calib-ctx", "128", "--calib-samples", "8"])
        assert _calibration(args) == CalibrationSetting("c.txt", 128, 8), cmd
