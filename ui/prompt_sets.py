"""The Prompt sets tab: evaluate a set on the pair (with and without IntactKV), cards, plots, the
per-prompt table, exports, and a row opening in Compare."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from dtm_core.measure.evaluate import evaluate
from dtm_core.measure.exports import write_table
from dtm_core.jobs import calibration_note, compare_variants, resolve_intactkv
from dtm_core.measure.prompts import builtin_names

from . import common
from .common import FIRST, STOPS, IntactKVForm, PairForm
from .charts import confidence_figure, confidence_rows, confidence_view, length_ratio_figure
from .render import friendly, readable_table, set_plots, significant, summary_cards

TABLE_COLUMNS = ["prompt_index", "line", "fdt", "sdt", "kl_mean", "top1_agree", "ppl_dense",
                 "ppl_compressed", "correct_dense", "correct_compressed", "choice_dense",
                 "choice_compressed", "pivots", "fdt_intactkv", "sdt_intactkv", "kl_mean_intactkv",
                 "correct_compressed_intactkv", "choice_compressed_intactkv", "answer_dense",
                 "answer_compressed", "len_ratio", "loop_compressed", "rejoin_pos", "edit_sim",
                 "prompt",
                 "dense_text", "compressed_text", "compressed_text_intactkv"]


@dataclass
class SetsTab:
    results: gr.Dataframe
    run_state: gr.State
    worst: gr.Dataframe


TABLE_HEADERS = ["#", "line", "FDT (tokens)", "SDT (%)", "mean KL (nats)", "top-1 agree (%)",
                 "PPL dense", "PPL compressed", "prompt", "dense text", "compressed text"]
WORST_HEADERS = ["#", "line", "FDT (tokens)", "mean KL (nats)", "prompt", "… text before",
                 "dense token", "compressed token", "dense goes on"]


IN_PLACE_NOTE = " (in one model's memory: the dense passes, then the model compressed in place)"


def run_set(model, preset, spec, components, checkpoint, upload, builtin, chat, new_tokens,
            ikv_text="off", ikv_cal=False, calib_steps=50, calibration=None,
            calibration_file=None, calib_ctx=None, calib_samples=None, sequential=True,
            free_run=False, thinking=None, request: gr.Request = None, progress=gr.Progress()):
    """Evaluate a prompt set on the current pair; returns table, cards, plots, files, message."""
    nothing = (None, "", None, None, None, None, None)
    thinking = None if thinking is None or not chat else bool(thinking)
    try:
        pset = common.load_set(upload, builtin)
        req = common.pair_request(model, preset, spec, components, checkpoint, chat, calibration,
                                  calibration_file, calib_ctx, calib_samples,
                                  sequential)
        setting = common.intactkv_setting(ikv_text, ikv_cal, calib_steps)
        progress(0, desc="loading the pair")
        # one model's memory (the dense passes first, then the model compressed in place)
        # unless IntactKV runs the two side by side
        pair = common.CACHE.open(req, pset.prompts,
                                 in_place=None if setting.parse() is not None else "auto")
        ikv = resolve_intactkv(setting, pair, pset.prompts, chat=bool(chat),
                               calibration=req.calibration,
                               progress=common.calib_progress(progress))
        n = int(new_tokens)
        with STOPS.running("set", request) as stop:
            res = evaluate(pair, pset, n, chat=bool(chat), stop=stop, intactkv=ikv,
                           progress=lambda f, m: progress(f, desc=m), free_run=bool(free_run),
                           thinking=thinking)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return nothing + (friendly(exc), None, None, None, None, None, None, None)
    out_dir = Path(tempfile.mkdtemp(prefix="dtm-export-"))
    csv_path, json_path = out_dir / "dtm_results.csv", out_dir / "dtm_results.json"
    parquet_path = out_dir / "dtm_results.parquet"
    write_table(res.table, csv_path)
    write_table(res.table, parquet_path)
    json_path.write_text(res.to_json(), encoding="utf-8")   # their sidecar: config, summary, rows
    table = readable_table(res.table[[c for c in TABLE_COLUMNS if c in res.table.columns]],
                           sort=["fdt", "kl_mean"], ascending=[True, False])
    msg = (f"{'Stopped: ' if res.stopped else 'Done: '}{len(res.table)} prompts of "
           f"{pset.name} on {pair.dense.source} vs {pair.label}"
           f"{f', with and without IntactKV {ikv.label}' if ikv else ''}"
           f"{IN_PLACE_NOTE if pair.in_place is not None else ''}."
           f"{common.pivot_note(pair.tokenizer, ikv, pset.prompts[0], chat, FIRST)}")
    if calibration_note(pair):
        msg += " " + calibration_note(pair)
    if res.rejected:
        msg += " ⚠️ " + "; ".join(f"line {n_}: {r}" for n_, r in res.rejected[:20])
        if len(res.rejected) > 20:
            msg += f" (and {len(res.rejected) - 20} more)"
    state = {"chat": bool(chat), "new_tokens": n,
             "prompts": [[int(i), p] for i, p in zip(res.table.prompt_index, res.table.prompt)]}
    comparison = None
    if res.comparison is not None:
        comparison = res.comparison.copy()
        if ikv.calibrated is not None:
            # the calibration's own gain: the same prompts and dense references with the
            # uncalibrated pivot KV
            base = compare_variants(pair, res.prompt_ids, n,
                                    {"uncalibrated": ikv.with_calibration(None)},
                                    references=res.references).runs["uncalibrated"]
            comparison.insert(3, "uncalibrated", comparison.key.map(base.summary))
            comparison["Δ calibration"] = comparison.intactkv - comparison.uncalibrated
            gain = base.summary["fdt_mean"]
            msg += (f" Calibrated pivot KV (loss {ikv.calibrated.loss_before:.4g} → "
                    f"{ikv.calibrated.loss_after:.4g}): mean FDT {gain:.2f} uncalibrated → "
                    f"{res.summary['fdt_mean_intactkv']:.2f} calibrated "
                    f"({res.summary['fdt_mean_intactkv'] - gain:+.2f}).")
        for col in comparison.columns:
            if comparison[col].dtype == float:
                comparison[col] = comparison[col].map(significant)
        comparison = comparison.drop(columns="key").rename(
            columns={"plain": "without IntactKV", "intactkv": f"IntactKV {ikv.label}",
                     "uncalibrated": f"IntactKV {ikv.label.replace('+cal', '')} (uncalibrated)",
                     "delta": "Δ (IntactKV − plain)"})
    worst = readable_table(res.worst(10, "fdt"))
    conf = res.confidence
    return (table, summary_cards(res), *set_plots(res, n), str(csv_path), str(json_path), msg,
            state, comparison, str(parquet_path), worst,
            None if conf is None else confidence_rows(conf),
            None if conf is None else confidence_figure(conf), length_ratio_figure(res))


def open_in_compare(run_state, evt: gr.SelectData):
    """A selected table row opens its prompt in the Compare tab with the same pair."""
    if evt is None or not run_state:
        return gr.update(), gr.update(), gr.update(), gr.update()
    prompts = dict((i, p) for i, p in run_state["prompts"])
    row = getattr(evt, "row_value", None)
    if row:  # the table's first column is prompt_index, wherever the user sorted the row to
        text = prompts.get(int(row[0]))
    else:
        text = run_state["prompts"][evt.index[0]][1]
    return (gr.Tabs(selected="compare"), text, run_state["chat"], run_state["new_tokens"])


def build(pair: PairForm, ikv: IntactKVForm) -> SetsTab:
    gr.Markdown("Evaluate a prompt set on the pair above. Upload `.txt` (one prompt per line), "
                "`.jsonl` or `.csv` (header row; prompt field `prompt`, `text`, `question`, "
                "`instruction` or `input`; optional `answer`/`answers`/`target`, `context`, "
                "`choices`), or pick a built-in set. Select a row to open it in Compare.")
    with gr.Row():
        upload = gr.File(label="Prompt file", file_types=[".txt", ".jsonl", ".csv"],
                         elem_id="set-upload", height=150)
        with gr.Column():
            builtin = gr.Dropdown(builtin_names(), value="general", label="Built-in set",
                                  elem_id="set-builtin")
            with gr.Row():
                chat = gr.Checkbox(value=False, label="Chat template", elem_id="set-chat")
                thinking = gr.Checkbox(value=True, label="Thinking (templates that take it)",
                                       elem_id="set-thinking")
                free_run = gr.Checkbox(value=False, label="Free run: compare the texts after "
                                       "the divergence too (lengths, loops, rejoin)",
                                       elem_id="set-free-run")
            new_tokens = gr.Slider(1, 2048, value=32, step=1, label="New tokens (N)",
                                   elem_id="set-new-tokens")
            with gr.Row():
                run = gr.Button("Run set", variant="primary", elem_id="set-run")
                stop = gr.Button("Stop", variant="stop", elem_id="set-stop")
                example = gr.Button("Example", size="sm", elem_id="set-example")
    status = common.StatusText("", elem_id="set-status")
    cards = gr.HTML("", elem_id="set-summary")
    comparison = gr.Dataframe(label="With and without IntactKV (after a run with IntactKV on, "
                                    "in the Settings above)",
                              headers=["metric", "without IntactKV", "IntactKV",
                                       "Δ (IntactKV − plain)"],
                              elem_id="intactkv-comparison", interactive=False)
    with gr.Row():
        hist = gr.Plot(label="FDT histogram (after a run)", elem_id="set-hist")
        surv = gr.Plot(label="Survival: prompts not yet diverged at each position (after a run)",
                       elem_id="set-survival")
        scat = gr.Plot(label="Perplexity change against FDT, one dot per prompt (after a run)",
                       elem_id="set-scatter")
    lengths = gr.Plot(label="Length ratio compressed / dense (after a run with Free run on)",
                      elem_id="set-len-ratio")
    conf_table, conf_plot = confidence_view(
        "set-confidence", "KL by the dense model's confidence in its top token (after a run): "
        "where the damage sits", "KL by dense confidence (after a run)")
    worst = gr.Dataframe(label="Worst prompts: lowest FDT first (select one to open it in "
                               "Compare)", elem_id="set-worst", headers=WORST_HEADERS, interactive=False, wrap=True,
                         max_height=360)
    results = gr.Dataframe(label="Per prompt (lowest FDT first)", headers=TABLE_HEADERS, elem_id="set-table", interactive=False,
                           wrap=True, max_height=500)
    with gr.Row():
        csv_file = gr.File(label="Export CSV", elem_id="set-csv")
        json_file = gr.File(label="Export JSON", elem_id="set-json")
        parquet_file = gr.File(label="Export Parquet", elem_id="set-parquet")
    run_state = gr.State(None)
    run.click(run_set, pair.side + [upload, builtin, chat, new_tokens] + ikv.inputs + pair.calib
              + [free_run, thinking],
              [results, cards, hist, surv, scat, csv_file, json_file, status, run_state,
               comparison, parquet_file, worst, conf_table, conf_plot, lengths],
              concurrency_id="model")
    stop.click(STOPS.stopper("set", "Stopping after the current chunk…"), None, [status],
               queue=False)
    example.click(example_setup, None, [builtin, upload, chat, new_tokens], queue=False)
    return SetsTab(results=results, run_state=run_state, worst=worst)


def example_setup():
    """The first 8 questions of the built-in factoid_qa set (with their answers), N = 16: a
    run of well under a minute on the default model on 2 cores."""
    return "factoid_qa", common.example_file("factoid_qa", 8), False, 16
