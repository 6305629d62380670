"""The Sensitivity tab: one-component-at-a-time sweeps (plain and IntactKV), the heatmap, cells
opening in Compare as the very pair they measured, plans and level curves."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from dtm_core.measure.exports import write_table
from dtm_core.models.generation import encode_prompts
from dtm_core.compression.intactkv import IntactKV
from dtm_core.jobs import CalibrationSetting, plan_from_sweep, sweep_variants
from dtm_core.analysis.levels import DEFAULT_FORMATS, FORMATS, level_curves
from dtm_core.compression.methods import level_methods, parse_spec
from dtm_core.measure.prompts import builtin_names
from dtm_core.analysis.sweep import heatmap_metrics

from . import common
from .common import CUSTOM, EVALUATED, STOPS, PairForm
from .render import friendly, level_figure, plan_figure, readable_table, sensitivity_heatmap

SWEEP_VIEWS = ["IntactKV", "plain", "IntactKV − plain"]


@dataclass
class SensitivityTab:
    cells: gr.Dataframe
    state: gr.State
    clicked: gr.Textbox
    cell_open: gr.Button


def run_sweep(model, spec, upload, builtin, chat, new_tokens, layers, kinds, metric,
              ikv_text="off", view="IntactKV", calibration=None, calibration_file=None,
              calib_ctx=None, calib_samples=None, sequential=True, whole=False,
              request: gr.Request = None, progress=gr.Progress()):
    try:
        parse_spec(spec)
        pset = common.load_set(upload, builtin)
        setting = common.calibration_setting(calibration, calibration_file, calib_ctx,
                                             calib_samples)
        progress(0, desc="loading the model")
        dense = common.CACHE.dense(model)
        ids = encode_prompts(dense.tokenizer, pset.prompts, chat=bool(chat))
        ikv = IntactKV.parse(ikv_text)
        with STOPS.running("sweep", request) as stop:
            both = sweep_variants(dense, spec, ids, int(new_tokens), intactkv=ikv,
                                  layers=(layers or "").strip() or None,
                                  kinds=(kinds or "").strip() or None, stop=stop,
                                  calibration=setting, chat=bool(chat), whole=bool(whole),
                                  progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return None, None, friendly(exc), None, None, None
    res = both.main
    if res.table.empty:
        return None, None, "Stopped before any cell finished.", None, None, None
    out = Path(tempfile.mkdtemp(prefix="dtm-sweep-")) / "sweep.csv"
    table = both.table
    config = {"model": dense.source, "spec": str(parse_spec(spec)), "prompts": pset.name,
              "prompt_count": len(ids), "new_tokens": int(new_tokens), "chat": bool(chat),
              "intactkv": None if ikv is None else ikv.label, "cell_store": str(res.folder)}
    write_table(table, out, config)
    write_table(table, out.with_suffix(".parquet"))     # the same sidecar serves both
    # the page: most sensitive components first, readable numbers (the files keep everything)
    table = readable_table(table, sort=["fdt_mean", "kl_mean"], ascending=[True, False])
    # what a cell opened in Compare must calibrate on to be the pair the cell measured
    source = setting.source or common.upload_path(upload) or builtin
    state = {"table": res.table.to_dict("records"), "spec": str(parse_spec(spec)),
             "prompts": pset.prompts, "chat": bool(chat), "new_tokens": int(new_tokens),
             "calibration": source, "calibration_explicit": setting.source}
    calib = ""
    if parse_spec(spec).needs_calibration:
        calib = f" Calibrated on {'the sweep set' if setting.source is None else source}."
    if res.additivity_line():
        calib += f" {res.additivity_line()[0].upper()}{res.additivity_line()[1:]}."
    if both.intactkv is not None:
        msg = (f"{'Stopped' if res.stopped else 'Done'}: {len(res.table)} components with "
               f"IntactKV {ikv.label} and without ({both.computed} computed, {both.reused} "
               f"reused) for {spec} on {pset.name}; mean FDT over cells "
               f"{both.plain.table.fdt_mean.mean():.2f} → {res.table.fdt_mean.mean():.2f}. "
               "Select a row to open that single-component pair in Compare."
               f"{common.pivot_note(dense.tokenizer, ikv, pset.prompts[0], chat, common.FIRST)}"
               f"{calib}")
        state.update(plain=both.plain.table.to_dict("records"), intactkv=ikv.label)
        return (sweep_view_figure(state, metric, view), table, msg, str(out), state,
                str(out.with_suffix(".parquet")))
    msg = (f"{'Stopped' if res.stopped else 'Done'}: {len(res.table)} components "
           f"({res.computed} computed, {res.reused} reused from the store) for {spec} on "
           f"{pset.name}. Select a row to open that single-component pair in Compare.{calib}")
    return (sensitivity_heatmap(res.table, metric), table, msg, str(out), state,
            str(out.with_suffix(".parquet")))


NOTE_AFTER_S = float(os.environ.get("DTM_SWEEP_NOTE_S", 900))   # longer: offer torchrun


def torchrun_command(model, spec, prompts, chat, new_tokens, layers, kinds, calibration,
                     cache_dir) -> str:
    """The command that runs the same sweep across processes (one per GPU, else per core) into
    the app's cell store, so that the app then opens the merged result."""
    import shlex

    import torch

    procs = torch.cuda.device_count() or os.cpu_count() or 2
    args = ["torchrun", "--standalone", "--nproc-per-node", str(procs), "-m", "dtm_core", "sweep",
            "--model", model, "--compress", spec, "--prompts", prompts, "--new-tokens",
            str(int(new_tokens))]
    args += ["--chat"] if chat else []
    args += ["--layers", layers] if layers else []
    args += ["--kinds", kinds] if kinds else []
    args += ["--calibration", calibration] if calibration else []
    args += ["--cache-dir", str(cache_dir), "--out", "sweep.csv"]
    return " ".join(shlex.quote(a) for a in args)


def sweep_note(model, spec, upload, builtin, chat, new_tokens, layers, kinds,
               calibration=None, calibration_file=None, calib_ctx=None, calib_samples=None,
               sequential=True):
    """A note when the sweep is larger than this machine does in reasonable time: the estimate
    and the exact torchrun command (after which Run sweep opens the merged cells from the
    store)."""
    from dtm_core.models.load import cache_root
    from dtm_core.analysis.sweep import estimate_seconds, select_components

    hidden = (gr.update(value="", visible=False), gr.update(value="", visible=False))
    try:
        parse_spec(spec)
        pset = common.load_set(upload, builtin)
        dense = common.CACHE.dense(model)
        ids = encode_prompts(dense.tokenizer, pset.prompts, chat=bool(chat))
        cells = len(select_components(dense.model, (layers or "").strip() or None,
                                      (kinds or "").strip() or None, spec))
        est = estimate_seconds(dense, ids, int(new_tokens), cells)
    except Exception:  # noqa: BLE001 - the sweep itself reports what is wrong
        return hidden
    if est <= NOTE_AFTER_S:
        return hidden
    setting = common.calibration_setting(calibration, calibration_file, calib_ctx,
                                         calib_samples)
    prompts = common.upload_path(upload) or builtin
    cmd = torchrun_command((model or "default").strip(), str(parse_spec(spec)), prompts, chat,
                           new_tokens, (layers or "").strip(), (kinds or "").strip(),
                           setting.source, cache_root())
    msg = (f"This sweep has {cells} cells: about {est / 60:.0f} min on this machine. To run it "
           "across processes (GPUs, or nodes with torchrun's rendezvous options), use the command "
           "below; then press Run sweep again with the same settings: the merged cells open "
           "from the store.")
    return gr.update(value=cmd, visible=True), gr.update(value=msg, visible=True)


def sweep_view_figure(state, metric, view):
    if state.get("estimated"):         # a refinement that ended with estimated cells left
        from .charts import estimated_heatmap
        return estimated_heatmap(pd.DataFrame(state["estimated"]), metric)
    table = pd.DataFrame(state["table"])
    if not state.get("plain"):
        return sensitivity_heatmap(table, metric)
    plain = pd.DataFrame(state["plain"])
    if view == "plain":
        return sensitivity_heatmap(plain, metric, " (plain)")
    if view == "IntactKV − plain":
        diff = table.copy()
        merged = table.set_index("component")[metric] - plain.set_index("component")[metric]
        diff[metric] = diff.component.map(merged)
        return sensitivity_heatmap(diff, metric, f" : IntactKV {state['intactkv']} − plain",
                                   diverging=True)
    return sensitivity_heatmap(table, metric, f" (IntactKV {state['intactkv']})")


def rerender_heatmap(state, metric, view="IntactKV"):
    if not state:
        return None
    return sweep_view_figure(state, metric, view)


def _open_cell(state, name):
    """Compare-tab updates that open the single-component pair ``name`` of a sweep: the same
    spec, prompt, N, chat setting and calibration prompts as the cell."""
    calib = state.get("calibration") or EVALUATED
    return (gr.Tabs(selected="compare"), CUSTOM, state["spec"], name, state["prompts"][0],
            state["chat"], state["new_tokens"], gr.update(value=calib))


def cell_to_compare(state, evt: gr.SelectData):
    """A selected sweep row opens that single-component pair in Compare."""
    if evt is None or not state:
        return (gr.update(),) * 8
    row = getattr(evt, "row_value", None)
    comp = row[2] if row else state["table"][evt.index[0]]["component"]
    return _open_cell(state, comp)


def heatmap_cell_to_compare(state, name):
    """A clicked heatmap cell ("LAYER.KIND") opens that single-component pair in Compare."""
    names = {r["component"] for r in (state or {}).get("table", [])}
    if not state or (name or "").strip() not in names:
        return (gr.update(),) * 8
    return _open_cell(state, name.strip())


def run_plan(model, state, budget, progress=gr.Progress()):
    if not state:
        return "Run a sweep first.", None, None
    try:
        dense = common.CACHE.dense(model)
        ids = encode_prompts(dense.tokenizer, state["prompts"], chat=state["chat"])
        # the sweep's calibration: its explicit setting, else its own prompts
        plan = plan_from_sweep(dense, pd.DataFrame(state["table"]), state["spec"], ids,
                               state["new_tokens"], float(budget), chat=state["chat"],
                               calibration=CalibrationSetting(state.get("calibration_explicit")),
                               progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return friendly(exc), None, None
    path = Path(tempfile.mkdtemp(prefix="dtm-plan-")) / "plan.json"
    plan.save(str(path))
    msg = (f"Plan: {len(plan.components)} components ({plan.share_params:.1%} of component "
           f"parameters) compressed with {plan.spec}; mean FDT {plan.fdt_mean:.2f} "
           f"(budget {plan.budget_fdt:.2f}), verified with {len(plan.curve) - 1} evaluations. "
           "Load the JSON with `--recipe` in the CLI.")
    return msg, str(path), plan_figure(plan)


def run_levels(model, upload, builtin, chat, new_tokens, method, levels, kinds,
               progress=gr.Progress()):
    try:
        pset = common.load_set(upload, builtin)
        dense = common.CACHE.dense(model)
        table = level_curves(dense, method, levels, kinds, pset.prompts, int(new_tokens),
                             chat=bool(chat), progress=lambda f, m: progress(f, desc=m))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return None, friendly(exc)
    return level_figure(table, method), f"Done: {len(table)} points."


def build(pair: PairForm, intactkv: gr.Dropdown) -> SensitivityTab:
    """The tab: the set, spec and selection every tool here uses, then one sub-tab per tool."""
    model = pair.model
    gr.Markdown("Compress each `LAYER.KIND` alone with one spec and measure the divergence on a "
                "prompt set. The spec, set, N, layers and kinds below serve every sub-tab. "
                "Finished cells are stored on disk: a stopped sweep resumes, a finished one "
                "reopens instantly.")
    with gr.Row():
        spec = gr.Textbox(value="int4:g128", label="Spec", elem_id="sens-spec")
        builtin = gr.Dropdown(builtin_names(), value="general", label="Built-in set",
                              elem_id="sens-builtin")
        upload = gr.File(label="or a prompt file", file_types=[".txt", ".jsonl", ".csv"],
                         elem_id="sens-upload", height=110)
    with gr.Row():
        chat = gr.Checkbox(value=False, label="Chat template", elem_id="sens-chat")
        new_tokens = gr.Slider(1, 128, value=32, step=1, label="N", elem_id="sens-new-tokens")
        layers = gr.Textbox(label="Layers (optional)", placeholder="0-3", elem_id="sens-layers")
        kinds = gr.Textbox(label="Kinds (optional)", placeholder="q,k", elem_id="sens-kinds")
        example = gr.Button("Example", elem_id="sens-example", size="sm", scale=0,
                            min_width=90)
    with gr.Tabs(elem_id="sens-tabs"):
        with gr.Tab("Heatmap", id="sens-tab-heatmap"):
            tab = _heatmap(pair, intactkv, spec, upload, builtin, chat, new_tokens, layers,
                           kinds)
        with gr.Tab("Why: patching", id="sens-tab-why"):
            from . import explain as explain_ui
            explain_ui.build_set(model, spec, upload, builtin, chat, new_tokens, layers, kinds)
        with gr.Tab("Plan", id="sens-tab-plan"):
            _plan(model, tab.state)
        with gr.Tab("Mixed plan", id="sens-tab-mixed"):
            from . import budget_plan as budget_ui
            budget_ui.build(model, upload, builtin, chat, new_tokens, layers, kinds, pair.calib)
        with gr.Tab("Level curves", id="sens-tab-levels"):
            _levels(model, upload, builtin, chat, new_tokens)
        with gr.Tab("KV grid", id="sens-tab-kvgrid"):
            from . import kvgrid as kvgrid_ui
            kvgrid_ui.build(model, upload, builtin, chat, new_tokens)
    example.click(example_setup, None, [spec, upload, chat, new_tokens, layers, kinds],
                  queue=False)
    return tab


def example_setup():
    """A sweep that runs on the default model in under a minute on 2 cores: int4:g128 on
    layers 0-3, every kind, the first 8 prompts of the built-in general set, N = 16."""
    return ("int4:g128", common.example_file("general", 8), False, 16, "0-3", "")


def _heatmap(pair, intactkv, spec, upload, builtin, chat, new_tokens, layers, kinds
             ) -> SensitivityTab:
    model = pair.model
    with gr.Row():
        labels = heatmap_metrics()
        metric = gr.Dropdown([(v, k) for k, v in labels.items()], value="fdt_mean",
                             label="Heatmap metric", elem_id="sens-metric")
        view = gr.Radio(SWEEP_VIEWS, value="IntactKV", label="With IntactKV on, show",
                        elem_id="sens-view")
        estimate = gr.Checkbox(value=True, label="Estimate first", elem_id="sens-estimate",
                               info="every cell estimated at once (≈), then exact cells "
                                    "replace them, most sensitive first (not with IntactKV)")
        settle = gr.Number(value=0, precision=0, minimum=0, label="Stop when the top-K is "
                           "settled", info="0: measure every cell", elem_id="sens-settle")
        whole = gr.Checkbox(value=False, label="Also all at once",
                            info="measure every selected component compressed together and set "
                                 "the sum over cells against it (with from:PATH: the whole "
                                 "checkpoint)", elem_id="sens-whole")
        with gr.Column(min_width=160):
            run = gr.Button("Run sweep", variant="primary", elem_id="sens-run")
            stop = gr.Button("Stop", variant="stop", elem_id="sens-stop")
    status = common.StatusText("", elem_id="sens-status")
    note = common.StatusText("", elem_id="sens-note", visible=False)
    torchrun = gr.Code("", language="shell", label="Run it across processes (copy)",
                       visible=False, elem_id="sens-torchrun", interactive=False)
    heat = gr.Plot(label="Heatmap of the cells (after Run sweep): click a cell to open that "
                         "single-component pair in Compare", elem_id="sens-heatmap")
    with gr.Row(elem_classes="dtm-hidden"):
        clicked = gr.Textbox(elem_id="sens-clicked", show_label=False, container=False)
        cell_open = gr.Button("open cell", elem_id="sens-open")
    cells = gr.Dataframe(label="Cells, most sensitive first (after Run sweep; select a row to "
                               "open it in Compare)",
                         headers=["layer", "kind", "component", "params", "mean FDT (tokens)",
                                  "median FDT (tokens)", "mean SDT (%)", "mean KL (nats)"],
                         interactive=False,
                         elem_id="sens-table", max_height=400)
    with gr.Row():
        csv_file = gr.File(label="Sweep CSV (after a sweep)", elem_id="sens-csv")
        parquet_file = gr.File(label="Sweep Parquet (after a sweep)", elem_id="sens-parquet")
    state = gr.State(None)
    from .estimate import sweep_handler

    run.click(sweep_handler(run_sweep), [model, spec, upload, builtin, chat, new_tokens, layers, kinds,
                            metric, intactkv, view] + pair.calib + [whole, estimate, settle],
              [heat, cells, status, csv_file, state, parquet_file], concurrency_id="model",
              api_name="run_sweep")
    stop.click(STOPS.stopper("sweep", "Stopping after the current cell…"), None, [status],
               queue=False)
    run.click(sweep_note, [model, spec, upload, builtin, chat, new_tokens, layers, kinds]
              + pair.calib, [torchrun, note], concurrency_id="estimate")
    metric.change(rerender_heatmap, [state, metric, view], [heat])
    view.change(rerender_heatmap, [state, metric, view], [heat])
    return SensitivityTab(cells=cells, state=state, clicked=clicked, cell_open=cell_open)


def _plan(model, state) -> None:
    gr.Markdown("The largest least-sensitive set of the Heatmap's cells within a budget, "
                "verified by real evaluations (run a sweep first).")
    with gr.Row():
        budget = gr.Slider(0.1, 1.0, value=0.9, step=0.01, label="Budget: mean FDT >= budget x N",
                           elem_id="plan-budget")
        plan_btn = gr.Button("Make plan", variant="primary", elem_id="plan-run")
    plan_status = common.StatusText("", elem_id="plan-status")
    with gr.Row():
        plan_file = gr.File(label="Plan JSON (recipe; after Make plan)", elem_id="plan-json")
        plan_plot = gr.Plot(label="Mean FDT as components are added, least sensitive first "
                                  "(after Make plan)", elem_id="plan-curve")
    plan_btn.click(run_plan, [model, state, budget], [plan_status, plan_file, plan_plot],
                   concurrency_id="model")


def _levels(model, upload, builtin, chat, new_tokens) -> None:
    gr.Markdown("A metric against sparsity or bit width, one line per kind, on the set and N "
                "above.")
    with gr.Row():
        methods = level_methods() + [FORMATS]
        method = gr.Dropdown(methods, value=methods[0], label="Method", elem_id="lvl-method",
                             info=f"'{FORMATS}': the levels are specs, placed at their bits, "
                                  f"e.g. {DEFAULT_FORMATS}")
        levels = gr.Textbox(value="0.1,0.3,0.5,0.7,0.9", label="Levels (sparsities or bits)",
                            elem_id="lvl-levels")
        lvl_kinds = gr.Textbox(value="q,down", label="Kinds", elem_id="lvl-kinds")
        lvl_btn = gr.Button("Draw level curves", variant="primary", elem_id="lvl-run")
    lvl_status = common.StatusText("", elem_id="lvl-status")
    lvl_plot = gr.Plot(label="The metric against sparsity or bit width, one line per kind (after "
                             "Draw level curves)", elem_id="lvl-plot")
    lvl_btn.click(run_levels, [model, upload, builtin, chat, new_tokens, method, levels,
                               lvl_kinds], [lvl_plot, lvl_status], concurrency_id="model")
