"""The Sensitivity tab's mixed plan: one candidate spec per component under a budget (bits per
weight, sparsity or bytes), verified on the fit prompts, compared on held-out prompts (a Pareto
chart and a table) and exported for llama.cpp, llm-compressor, torchao or as our recipe."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from dtm_core.planning.allocation import KV_BYTES, Budget
from dtm_core.planning.budget_plan import HOLDOUT_COLUMNS, BudgetPlan
from dtm_core.planning.draft_plan import draft_length
from dtm_core.errors import DTMError
from dtm_core.jobs import plan_under_budget
from dtm_core.planning.plan_exports import EXPORTS, export_plan

from . import common
from .charts import cells_figure
from .render import friendly, pareto_figure, readable_headers, readable_table

BUDGET_KINDS = {"bits per weight": "bits", "sparsity (share of weights)": "sparsity",
                "size (GiB)": "bytes"}


def budget_of(kind: str, value) -> Budget | None:
    if value in (None, "") or float(value) <= 0:
        return None
    key = BUDGET_KINDS.get(kind, kind)
    v = float(value)
    return Budget(key, v * 2 ** 30 if key == "bytes" else v)


def run_budget_plan(model, upload, builtin, chat, new_tokens, layers, kinds, specs, kind, value,
                    target, holdout, planner, calibration=None, calibration_file=None,
                    calib_ctx=None, calib_samples=None, sequential=True, objective="fdt",
                    draft_cost=0, shortlist=None, request: gr.Request = None,
                    progress=gr.Progress()):
    """Status, Pareto chart, held-out table, plan JSON, the state the exports read and the
    per-kind curves of the cells."""
    last = [0.0]

    def tell(f, m):
        last[0] = last[0] if f is None else f
        progress(last[0], desc=m)
    try:
        pset = common.load_set(upload, builtin)
        setting = common.calibration_setting(calibration, calibration_file, calib_ctx,
                                             calib_samples)
        budget = budget_of(kind, value)
        tgt = float(target) if target not in (None, "") and float(target) > 0 else None
        draft = (objective or "fdt") != "fdt"
        if budget is None and tgt is None:
            raise DTMError("Give a budget above 0 or a target above 0.")
        cost = float(draft_cost) if draft_cost not in (None, "") and float(draft_cost) > 0 \
            else None
        k = int(shortlist) if shortlist not in (None, "") and int(shortlist) != 0 else None
        if k is not None and k < 0:
            raise DTMError("The shortlist is a number of exact cells per spec: 1 or more, or 0 "
                           "for every cell exact.")
        progress(0, desc="loading the model")
        dense = common.CACHE.dense(model)
        with common.STOPS.running("mixed-plan", request) as stop:
            plan = plan_under_budget(dense, specs, pset, int(new_tokens), budget=budget,
                                     target_fdt=None if draft else tgt,
                                     target_accept=tgt if draft else None,
                                     objective=objective or "fdt", draft_cost=cost,
                                     holdout=float(holdout), planner=planner,
                                     chat=bool(chat), calibration=setting,
                                     layers=(layers or "").strip() or None,
                                     kinds=(kinds or "").strip() or None, progress=tell,
                                     stop=stop, shortlist=k)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        # the last plan's chart, table, file and cells stay on the page
        return friendly(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    path = Path(tempfile.mkdtemp(prefix="dtm-mixed-plan-")) / "plan.json"
    plan.save(str(path))
    msg = (f"{plan.summary_line()[0].upper()}{plan.summary_line()[1:]}; "
           f"{len(plan.evaluations)} real evaluation{'s' * (len(plan.evaluations) != 1)}.")
    if plan.holdout is None:
        return (msg + " No prompts were held out.", None, None, str(path), plan.to_json(),
                cells_figure(plan.cells))
    held = plan.holdout.dropna(axis=1, how="all").astype({"bytes": float})   # shown in MiB
    if KV_BYTES in held:      # a KV plan: the weights are untouched; the cache's size instead
        held = held.drop(columns=["sparsity", "bytes"]).astype({KV_BYTES: float}).rename(
            columns={"avg_bits": "bits_per_cached_value"})
    msg += (f" On the {len(plan.holdout_prompts)} held-out prompts the plan keeps mean FDT "
            f"{plan.holdout.fdt_mean.iloc[0]:.2f}; FDT − plan below is each row minus the plan, "
            "with its paired 95 % interval.")
    if plan.objective != "fdt":
        r = plan.holdout.iloc[0]
        msg += (f" As a draft drafting {draft_length(plan.objective)} tokens: "
                f"{r.accept_len:.2f} accepted per step on the held-out prompts, expected "
                f"speed-up {r.speedup:.2f}x at a draft cost of {r.draft_cost:.3g} of a dense "
                "forward.")
    fig = pareto_figure(plan.holdout, plan.new_tokens,
                        plan.budget.value if plan.budget and plan.budget.kind == "bits" else None)
    return msg, fig, readable_table(held), str(path), plan.to_json(), cells_figure(plan.cells)


def run_export(model, state, kind):
    """The export's files (for download) and a status line."""
    if not state:
        return None, "Make a plan first."
    try:
        plan = BudgetPlan.from_json(state)
        dense = common.CACHE.dense(model)
        folder = Path(tempfile.mkdtemp(prefix=f"dtm-export-{kind.replace('.', '')}-"))
        files = export_plan(plan, kind, folder, dense.model,
                            bf16=str(dense.dtype).endswith("bfloat16"))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        return None, friendly(exc)
    return [str(f) for f in files], f"{kind}: " + ", ".join(f.name for f in files)


def build(model, upload, builtin, chat, new_tokens, layers, kinds, calib) -> None:
    gr.Markdown("### Mixed plan: one spec per component under a budget, proven on held-out "
                "prompts")
    gr.Markdown("Every selected component is swept under every candidate spec on the fit "
                "prompts (cells are stored, as for a sweep), a planner picks one spec per "
                "component within the budget, the whole plan is verified by a real evaluation, "
                "and the plan is compared on held-out prompts with the other planner, the "
                "KL-ranked plan, a random plan and each uniform spec. Uses the set, N, layers "
                "and kinds above.")
    with gr.Row():
        specs = gr.Textbox(value="int8,int4:g64,int3:g64", label="Candidate specs",
                           elem_id="mplan-specs",
                           info="or kv: specs (kv:int8,kv:int4,kv:int2): a KV-cache plan, "
                                "its budget in bits per cached value")
        kind = gr.Dropdown(list(BUDGET_KINDS), value="bits per weight", label="Budget",
                           elem_id="mplan-budget-kind")
        value = gr.Number(value=4.5, label="Budget value", elem_id="mplan-budget")
        target = gr.Number(value=0, label="Target (FDT: share of N; draft: accepted per "
                                          "step; 0: none)", elem_id="mplan-target")
    with gr.Row():
        holdout = gr.Slider(0, 0.5, value=0.3, step=0.05, label="Held-out share",
                            elem_id="mplan-holdout")
        planner = gr.Radio([("best, verified", "auto"), ("FDT knapsack", "fdt"),
                            ("DTM threshold", "dtm")], value="auto", label="Planner",
                           elem_id="mplan-planner")
        objective = gr.Dropdown([("first divergent token (FDT)", "fdt")]
                                + [(f"draft acceptance, K = {k}", f"accept_len_k{k}")
                                   for k in (2, 4, 8)], value="fdt", label="Objective",
                                elem_id="mplan-objective",
                                info="a draft plan: the compressed model as a self-speculative "
                                     "draft, the mean drafted tokens accepted per step")
        draft_cost = gr.Number(value=0, label="Draft cost (0: its bits over the dense "
                                              "model's)", elem_id="mplan-draft-cost")
        shortlist = gr.Number(value=0, precision=0, label="Shortlist: exact cells per spec",
                              elem_id="mplan-shortlist",
                              info="0: every cell exact; K: every cell estimated first (one "
                                   "forward and backward), only the K most sensitive measured "
                                   "exactly; the plan is still verified")
    with gr.Row():
        run = gr.Button("Make mixed plan", variant="primary", elem_id="mplan-run")
        stop = gr.Button("Stop", variant="stop", elem_id="mplan-stop")
    status = common.StatusText("", elem_id="mplan-status")
    chart = gr.Plot(label="Held-out mean FDT against bits per weight (after a plan)",
                    elem_id="mplan-chart")
    table = gr.Dataframe(label="Held-out comparison (after Make mixed plan)", interactive=False,
                         elem_id="mplan-table", max_height=360,
                         headers=readable_headers(HOLDOUT_COLUMNS))
    curves = gr.Plot(label="Each kind under each candidate, alone (the cells the plan was made "
                           "from; after Make mixed plan)", elem_id="mplan-cells")
    with gr.Row():
        plan_file = gr.File(label="Plan JSON (assignments, recipe, held-out table)",
                            elem_id="mplan-json")
        export_kind = gr.Dropdown(list(EXPORTS), value="llama.cpp", label="Export for",
                                  elem_id="mplan-export-kind")
        export_btn = gr.Button("Export", elem_id="mplan-export")
        export_files = gr.File(label="Exported files", file_count="multiple",
                               elem_id="mplan-files")
    export_status = common.StatusText("", elem_id="mplan-export-status")
    state = gr.State(None)
    run.click(run_budget_plan, [model, upload, builtin, chat, new_tokens, layers, kinds, specs,
                                kind, value, target, holdout, planner] + calib
              + [objective, draft_cost, shortlist],
              [status, chart, table, plan_file, state, curves], concurrency_id="model")
    stop.click(common.STOPS.stopper("mixed-plan", "Stopping after the current cell…"), None,
               [status], queue=False)
    export_btn.click(run_export, [model, state, export_kind], [export_files, export_status],
                     concurrency_id="model")
