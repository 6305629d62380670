"""The KLD report tab: a text scored the way ``llama-perplexity --kl-divergence`` does."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr

from dtm_core import DTMError
from dtm_core.measure.exports import write_table
from dtm_core.measure.kld import format_report, score_text, statistics_table
from dtm_core.measure.prompts import read_text_file

from . import common
from .common import PairForm
from .charts import confidence_figure, confidence_rows, confidence_view, kld_figures
from .render import friendly


def run_kld(model, preset, spec, components, checkpoint, text_file, ctx, calibration=None,
            calibration_file=None, calib_ctx=None, calib_samples=None, sequential=True,
            progress=gr.Progress()):
    try:
        path = common.upload_path(text_file)
        if not path:
            raise DTMError("Upload a plain-text file to score.")
        text = read_text_file(path)
        req = common.pair_request(model, preset, spec, components, checkpoint, False,
                                  calibration, calibration_file, calib_ctx, calib_samples,
                                  sequential)
        progress(0, desc="loading the pair")
        # the evaluated prompts of a text: its first 64 non-empty lines (as the CLI's kld)
        pair = common.CACHE.open(req, [ln for ln in text.splitlines() if ln.strip()][:64],
                                 in_place="auto")      # one model's memory
        stats, values = score_text(pair, text, int(ctx), progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return friendly(exc), None, None, None, None, None, None
    kld, dp = kld_figures(values)
    conf = values.by_confidence()
    folder = Path(tempfile.mkdtemp(prefix="dtm-kld-"))
    config = {"model": pair.dense.source, "pair": pair.label, "text": Path(path).name,
              "ctx": int(ctx)}
    csv_path, json_path = folder / "kld_statistics.csv", folder / "kld_statistics.json"
    write_table(statistics_table(stats), csv_path, config)
    json_path.write_text(json.dumps({"config": config, "statistics": stats,
                                     "kl_by_confidence": conf.to_dict(orient="records")},
                                    indent=2), encoding="utf-8")
    report = (f"{pair.dense.source} vs {pair.label}, ctx {int(ctx)} (the second half of each "
              f"chunk scored)\n" + format_report(stats))
    return (report, kld, dp, str(csv_path), str(json_path), confidence_rows(conf),
            confidence_figure(conf, "same top token"))


def build(pair: PairForm) -> None:
    gr.Markdown("### llama.cpp-style KL-divergence report on a plain-text file\n"
                "The text is cut into chunks of `ctx` tokens and the second half of each chunk is "
                "scored, as `llama-perplexity --kl-divergence` does, for the pair above.")
    with gr.Row():
        text_file = gr.File(label="Text file", file_types=[".txt"], elem_id="kld-upload")
        ctx = gr.Number(value=512, precision=0, minimum=4, label="ctx", elem_id="kld-ctx")
        with gr.Column(min_width=160):
            kld_btn = gr.Button("Score text", variant="primary", elem_id="kld-run")
            example = gr.Button("Example", size="sm", elem_id="kld-example")
    kld_report = gr.Textbox(label="Report", lines=12, elem_id="kld-report", interactive=False,
                            placeholder="The llama-perplexity style report appears here after "
                                        "Score text (upload a .txt, or press Example).")
    with gr.Row():
        kld_plot = gr.Plot(label="Histogram of KL per scored position (after scoring)",
                           elem_id="kld-hist")
        dp_plot = gr.Plot(label="Histogram of Δp of the next token (after scoring)",
                          elem_id="kld-dp")
    conf_table, conf_plot = confidence_view(
        "kld-confidence", "KL by the base model's confidence in its top token (after scoring)",
        "KL by base confidence (after scoring)")
    with gr.Row():
        kld_csv = gr.File(label="Statistics CSV (after scoring)", elem_id="kld-csv")
        kld_json = gr.File(label="Statistics JSON (after scoring)", elem_id="kld-json")
    kld_btn.click(run_kld, pair.side + [text_file, ctx] + pair.calib,
                  [kld_report, kld_plot, dp_plot, kld_csv, kld_json, conf_table, conf_plot],
                  concurrency_id="model")
    example.click(example_setup, None, [text_file, ctx], queue=False)


def example_setup():
    """The shipped license texts (about 46 kB) at ctx 256: a report in well under a minute on
    the default model on 2 cores."""
    import shutil

    from dtm_core.measure.prompts import ASSETS

    folder = Path(tempfile.mkdtemp(prefix="dtm-example-"))
    path = shutil.copy(ASSETS.parent / "texts" / "licenses.txt", folder / "licenses.txt")
    return str(path), 256
