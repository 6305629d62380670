"""The page's layout rules, checked on the built app without a browser (the browser tests in
test_browser_compare.py look at the same page at 1280x800): every table and plot says what will
appear before a run, the folded settings' header says what they hold, and figures keep legends
off titles."""
import re

import gradio as gr
import plotly.graph_objects as go

import app
from ui import common
from ui.figstyle import tidy


_BUILT = []


def _blocks():
    """The built page's blocks (built once for the module)."""
    if not _BUILT:
        _BUILT.append(list(app.build_app().blocks.values()))
    return _BUILT[0]


def test_every_table_has_real_headers_and_every_plot_says_when_it_appears():
    blocks = _blocks()
    tables = [b for b in blocks if isinstance(b, gr.Dataframe)]
    plots = [b for b in blocks if isinstance(b, gr.Plot)]
    assert len(tables) >= 8 and len(plots) >= 16
    for t in tables:
        value = t.value or {}
        headers = value.get("headers") if isinstance(value, dict) else None
        assert headers and not any(re.fullmatch(r"\d+", str(h)) for h in headers), \
            (t.elem_id, headers)
    for p in plots:
        assert "after" in (p.label or ""), (p.elem_id, p.label)


def test_advanced_settings_fold_under_a_header_that_summarizes_them():
    blocks = _blocks()
    accordion = next(b for b in blocks if getattr(b, "elem_id", None) == "advanced-settings")
    assert isinstance(accordion, gr.Accordion) and accordion.open is False
    assert accordion.label == "Settings: IntactKV off · calibration: prompts in use · chunk 0"
    assert common.settings_summary("prefix", True, "instructions", None, 32, 4, False) == (
        "Settings: IntactKV prefix +Cal · calibration: instructions · chunk 32 · first 4 "
        "samples · not sequential")
    assert "calibration: calib.txt" in common.settings_summary("off", False, "general",
                                                               "/tmp/x/calib.txt", 0, 0, True)


def test_every_tab_has_an_example_and_one_primary_run_button_per_view():
    ids = {getattr(b, "elem_id", None) for b in _blocks()}
    assert {"compare-example", "set-example", "sens-example", "kld-example"} <= ids
    primaries = {b.elem_id for b in _blocks() if isinstance(b, gr.Button)
                 and b.variant == "primary"}
    # Ctrl+Enter presses the first visible one: one per tab and Sensitivity sub-tab
    assert {"generate", "set-run", "sens-run", "explain-set-run", "plan-run", "mplan-run",
            "lvl-run", "kvg-run", "kld-run"} <= primaries


def test_examples_fill_setups_that_exist():
    from ui import compare, kld, prompt_sets, sensitivity

    prompt, chat, n, preset, spec, components = compare.example_setup()
    assert prompt and preset == common.CUSTOM and spec == "int4:g64" and components == "*.*"
    builtin, path, _, n = prompt_sets.example_setup()
    assert builtin == "factoid_qa" and common.load_set(path, None).prompts == \
        common.load_set(None, "factoid_qa").prompts[:8]
    spec, path, _, n, layers, kinds = sensitivity.example_setup()
    assert len(common.load_set(path, None).prompts) == 8 and layers == "0-3"
    path, ctx = kld.example_setup()
    assert path.endswith("licenses.txt") and ctx == 256


def test_legends_go_beside_or_below_never_on_the_title():
    from plotly.subplots import make_subplots

    two = make_subplots(specs=[[{"secondary_y": True}]])
    two.add_bar(x=[1, 2], y=[1, 2], name="a")
    two.add_scatter(x=[1, 2], y=[1, 2], name="b", secondary_y=True)
    two.update_layout(title="t", height=300, legend=dict(orientation="h", y=1.15))
    tidy(two)
    # a second y axis takes the right side: the legend goes below the x-axis title
    assert two.layout.legend.yanchor == "top" and two.layout.legend.y < -0.2
    assert two.layout.margin.b >= 80
    one = go.Figure([go.Scatter(x=[0, 1], y=[0, 1], name="a"),
                     go.Scatter(x=[0, 1], y=[1, 0], name="b")])
    one.update_layout(title="t")
    tidy(one)
    assert one.layout.legend.x >= 1 and one.layout.legend.yanchor == "top"
    layers = go.Figure(go.Heatmap(z=[[1]] * 30, y=list(range(30)), x=["q"]))
    tidy(layers, ("yaxis",))
    assert layers.layout.yaxis.tickformat == "d" and layers.layout.yaxis.dtick == 2


def test_the_sdt_map_and_columns_wrap_long_tokens():
    css = (app.ASSETS / "app.css").read_text()
    assert re.search(r"\.tokens, \.sdt-map \{ overflow-wrap: anywhere; \}", css)
    assert "ev.ctrlKey || ev.metaKey" in (app.ASSETS / "app.js").read_text()
