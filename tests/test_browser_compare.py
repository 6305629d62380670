"""The Compare view in a real browser: Playwright driving Debian's Chromium."""
import json
import re
import shutil

import pytest

from apphelpers import running_app
from conftest import WAIT_MS

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None,
                                reason="Debian's chromium is not installed (run.sh installs it)")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

RECORDER = """
() => {
  window.__counts = [];
  const sample = () => {
    const d = document.querySelectorAll('#dense-output [data-pos]').length;
    const c = document.querySelectorAll('#compressed-output [data-pos]').length;
    const last = window.__counts[window.__counts.length - 1];
    if (!last || last[0] !== d || last[1] !== c) window.__counts.push([d, c]);
  };
  new MutationObserver(sample).observe(document.body, {subtree: true, childList: true,
                                                        characterData: true});
}
"""


class PatientBrowser:
    """Pages whose every wait (locators, clicks, navigation) is bounded by WAIT_MS: the page waits
    on the work's own signals, however busy the machine."""

    def __init__(self, browser):
        self.browser = browser

    def new_page(self, **kw):
        page = self.browser.new_page(**kw)
        page.set_default_timeout(WAIT_MS)
        return page


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                              args=CHROMIUM_ARGS)
        yield PatientBrowser(b)
        b.close()


@pytest.fixture(scope="module")
def app_url():
    with running_app() as url:
        yield url


def shot(page, name: str) -> None:
    """A full-page screenshot for reviewers, in tests/artifacts/ (ignored by git)."""
    from conftest import ROOT

    folder = ROOT / "tests" / "artifacts"
    folder.mkdir(exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def set_tokens(page, n):
    box = page.locator("#new-tokens input[type=number]")
    box.fill(str(n))
    box.press("Enter")


def test_stream_highlight_matches_engine_and_stop(browser, app_url, default_model):
    from dtm_core.compression.recipe import Recipe
    from dtm_core.measure.divergence import divergence
    from dtm_core.compression.pair import make_pair

    page = browser.new_page()
    page.goto(app_url)
    page.locator("#prompt textarea").fill("The capital of France is")
    set_tokens(page, 40)
    page.evaluate(RECORDER)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    counts = page.evaluate("window.__counts")
    # both columns grew through at least three intermediate states before the end
    intermediate = [c for c in counts if 0 < c[0] < max(x[0] for x in counts)]
    assert len(intermediate) >= 3, counts
    assert len({c[1] for c in counts if c[1] > 0}) >= 4, counts

    shown = int(page.locator("#fdt").inner_text().strip())
    # a card: the label explains itself on hover, the line under the number says N
    card = page.locator(".metric-card").filter(has=page.locator("#fdt"))
    page.wait_for_function("[...document.querySelectorAll('.n-tokens')].every(s => "
                           "s.textContent === '40')", timeout=WAIT_MS)
    assert "of N = 40 new tokens" in card.inner_text()
    assert "First divergent token" in card.locator(".metric-head").get_attribute("title")
    engine = divergence(make_pair(default_model, Recipe.single("int8")),
                        ["The capital of France is"], 40)
    assert shown == int(engine.table.fdt[0])
    assert shown < 40, "this prompt and spec diverge inside the window"
    # the acceptance card: the engine's accept_len_k4 of the same pair and prompt
    page.wait_for_function("document.querySelector('#accept').innerText.trim() !== '–'",
                           timeout=WAIT_MS)
    assert page.locator("#accept").inner_text().strip() == \
        f"{engine.table.accept_len_k4[0]:.2f}"
    for col in ("#dense-output", "#compressed-output"):
        marked = page.locator(f"{col} .first-divergent")
        assert marked.count() == 1
        assert int(marked.get_attribute("data-pos")) == shown
        after = page.locator(f"{col} .after-divergence")
        assert all(int(after.nth(i).get_attribute("data-pos")) > shown
                   for i in range(after.count()))
    dense_pos = page.locator("#dense-output [data-pos]")
    title = dense_pos.first.get_attribute("title")
    assert "dense top-5" in title and "compressed top-5" in title
    assert page.locator("#sdt-map [data-pos]").count() == page.locator(
        "#dense-output [data-pos]").count()
    assert page.locator("#position-plot .js-plotly-plot").count() == 1
    # the first divergent token is marked in the per-position plot too
    assert f"first divergent token (pos {shown})" in page.locator("#position-plot").inner_text()
    shot(page, "compare")

    # Stop mid-stream: the page keeps what it has and stays usable
    set_tokens(page, 400)
    page.locator("#prompt textarea").fill("Once upon a time, in a small village,")
    page.locator("#generate").click()
    page.wait_for_function(
        "document.querySelector('#status').innerText.includes('Streaming') && "
        "document.querySelectorAll('#dense-output [data-pos]').length >= 5", timeout=WAIT_MS)
    page.locator("#stop").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Stopped')",
                           timeout=WAIT_MS)
    n_stopped = page.locator("#dense-output [data-pos]").count()
    assert 5 <= n_stopped < 400
    page.wait_for_timeout(1000)
    assert page.locator("#dense-output [data-pos]").count() == n_stopped
    set_tokens(page, 8)
    page.locator("#prompt textarea").fill("Water boils at")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    assert 1 <= page.locator("#dense-output [data-pos]").count() <= 8


def test_bad_spec_shows_message_and_app_keeps_serving(browser, app_url):
    page = browser.new_page()
    page.goto(app_url)
    page.locator("#preset input").click()
    page.get_by_role("option", name="custom spec").click()
    assert page.locator("#preset input").input_value() == "custom spec"
    page.locator("#spec textarea, #spec input").first.fill("int99")
    page.locator("#prompt textarea").fill("Hello")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Accepted forms')",
                           timeout=WAIT_MS)
    page.reload()
    page.locator("#prompt textarea").fill("Hello")
    set_tokens(page, 4)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)


def test_prompt_set_upload_table_plots_and_row_to_compare(browser, app_url, tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n'
                 "{broken\n"
                 '{"question": "What is the capital of Italy?", "answer": "Rome"}\n')
    page = browser.new_page()
    upload_to_tab(page, app_url, "Prompt sets", "#set-upload", f)
    page.locator("#set-new-tokens input[type=number]").fill("8")
    page.locator("#set-new-tokens input[type=number]").press("Enter")
    page.locator("#set-run").click()
    page.wait_for_function("document.querySelector('#set-status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    status = page.locator("#set-status").inner_text()
    assert "line 2" in status and "malformed JSON" in status   # told exactly what was rejected
    table_text = page.locator("#set-table").inner_text()
    assert "capital of Italy" in table_text and "correct (dense)" in table_text
    for number in re.findall(r"\d+\.\d+", table_text):     # 3 significant digits at most
        assert len(number.replace(".", "").lstrip("0")) <= 3, number
    for plot in ("#set-hist", "#set-survival", "#set-scatter"):
        page.wait_for_selector(f"{plot} .js-plotly-plot", timeout=WAIT_MS)
    summary = page.locator("#set-summary").inner_text()
    assert "Mean FDT" in summary and "McNemar p" in summary and "Flips" in summary
    assert "Accepted per step as a draft" in summary and "Jensen-Shannon" in summary
    # KL by the dense model's confidence: a table of buckets and its plot
    conf = page.locator("#set-confidence").inner_text()
    assert "0.99-1" in conf and "share of KL (%)" in conf
    page.wait_for_selector("#set-confidence-plot .js-plotly-plot", timeout=WAIT_MS)
    assert page.locator("#set-csv a, #set-csv [download]").count() >= 1
    assert page.locator("#set-parquet a, #set-parquet [download]").count() >= 1
    shot(page, "prompt-sets")
    worst = page.locator("#set-worst").inner_text()
    assert "dense token" in worst and "capital of" in worst
    # a worst prompt opens in Compare
    page.locator("#set-worst [role=gridcell]").filter(has_text="capital of").first.click()
    page.wait_for_function(
        "document.querySelector('#prompt textarea').value.includes('capital of')",
        timeout=WAIT_MS)
    page.get_by_role("tab", name="Prompt sets").click()
    # selecting a row opens its prompt in Compare
    page.locator("#set-table [role=gridcell]").filter(has_text="capital of Italy").first.click()
    page.wait_for_function(
        "document.querySelector('#prompt textarea').value.includes('capital of Italy')",
        timeout=WAIT_MS)
    assert page.locator("#prompt").is_visible()


def upload_to_tab(page, url, tab, upload_id, path):
    page.goto(url)
    page.get_by_role("tab", name=tab).click()
    page.locator(f"{upload_id} input[type=file]").set_input_files(str(path))


def test_prompt_set_bad_file_message(browser, app_url, tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("foo,bar\n1,2\n")
    page = browser.new_page()
    upload_to_tab(page, app_url, "Prompt sets", "#set-upload", f)
    page.locator("#set-run").click()
    page.wait_for_function(
        "document.querySelector('#set-status').innerText.includes('no prompt column')",
        timeout=WAIT_MS)


CELL_CENTER = """
([layer, kind]) => {
  const gd = document.querySelector('#sens-heatmap .js-plotly-plot');
  const fl = gd._fullLayout, box = gd.getBoundingClientRect();
  const x = fl.xaxis.l2p(fl.xaxis.d2l(kind)) + fl.xaxis._offset;
  const y = fl.yaxis.l2p(fl.yaxis.d2l(layer)) + fl.yaxis._offset;
  return [box.left + x, box.top + y];
}
"""


FOLDED = {"intactkv", "intactkv-cal", "calib-steps", "calibration", "calibration-file",
          "calib-ctx", "calib-samples", "sequential"}


def open_settings(page):
    """Unfold the pair's advanced settings (IntactKV, calibration) if they are folded."""
    if not page.locator("#intactkv").is_visible():
        page.locator("#advanced-settings").get_by_text("Settings:").first.click()
        page.locator("#intactkv").wait_for(state="visible", timeout=WAIT_MS)


def fill(page, elem_id, value):
    """Type into a textbox or a number/slider box and commit it."""
    if elem_id in FOLDED:
        open_settings(page)
    box = page.locator(f"#{elem_id}").locator(
        "textarea, input:not([type=range]):not([type=checkbox])").first
    box.fill(str(value))
    box.press("Enter")


def run_sensitivity(page, layers, kinds, n=8):
    fill(page, "sens-layers", layers)
    fill(page, "sens-kinds", kinds)
    fill(page, "sens-new-tokens", n)
    page.locator("#sens-run").click()
    page.wait_for_function("document.querySelector('#sens-status').innerText.includes('Done')",
                           timeout=WAIT_MS)


def test_sensitivity_heatmap_and_cell_to_compare(browser, app_url, tmp_path):
    f = tmp_path / "few.txt"
    f.write_text("The capital of France is\nWater boils at\n")
    page = browser.new_page()
    upload_to_tab(page, app_url, "Sensitivity", "#sens-upload", f)
    run_sensitivity(page, "0-1", "q,down")
    assert "4 components" in page.locator("#sens-status").inner_text()
    page.wait_for_selector("#sens-heatmap .js-plotly-plot", timeout=WAIT_MS)
    shot(page, "sensitivity")
    # a real mouse click on the heatmap cell (layer 0, kind q) opens it in Compare
    # the page marks the plot once its click handler is attached (assets/app.js)
    page.wait_for_selector("#sens-heatmap .js-plotly-plot[data-click-ready]", timeout=WAIT_MS)
    page.locator("#sens-heatmap").scroll_into_view_if_needed()   # viewport coordinates below
    x, y = page.evaluate(CELL_CENTER, [0, "q"])
    page.mouse.click(x, y)
    components = "document.querySelector('#components textarea, #components input').value"
    page.wait_for_function(f"{components} === '0.q'", timeout=WAIT_MS)
    assert page.locator("#prompt textarea").input_value() == "The capital of France is"
    assert page.locator("#preset input").first.input_value() == "custom spec"
    # and so does a row of the cells table
    page.get_by_role("tab", name="Sensitivity").click()
    page.locator("#sens-table [role=gridcell]").filter(has_text="1.down").first.click()
    page.wait_for_function(f"{components} === '1.down'", timeout=WAIT_MS)
    assert page.locator("#prompt textarea").input_value() == "The capital of France is"


def test_kld_report_from_uploaded_text(browser, app_url):
    from conftest import ROOT

    page = browser.new_page()
    upload_to_tab(page, app_url, "KLD report", "#kld-upload",
                  ROOT / "assets" / "texts" / "licenses.txt")
    page.locator("#kld-ctx input").fill("128")
    page.locator("#kld-run").click()
    page.wait_for_function(
        "document.querySelector('#kld-report textarea').value.includes('Same top p')",
        timeout=WAIT_MS)
    report = page.locator("#kld-report textarea").input_value()
    assert "Mean    KLD" in report and "ctx 128" in report
    page.wait_for_selector("#kld-hist .js-plotly-plot", timeout=WAIT_MS)
    page.wait_for_selector("#kld-dp .js-plotly-plot", timeout=WAIT_MS)
    # the statistics as CSV and JSON downloads, read back as they are served
    import json
    import urllib.request

    import pandas as pd

    for box in ("#kld-csv", "#kld-json"):
        link = page.locator(f"{box} a").first
        link.wait_for(timeout=WAIT_MS)
        href = link.get_attribute("href")
        data = urllib.request.urlopen(href if href.startswith("http") else app_url.rstrip("/")
                                      + href).read().decode("utf-8")
        if box == "#kld-csv":
            import io
            stats = pd.read_csv(io.StringIO(data)).set_index("statistic").value
        else:
            doc = json.loads(data)
    assert doc["config"]["ctx"] == 128
    buckets = doc["kl_by_confidence"]
    assert sum(b["positions"] for b in buckets) == doc["statistics"]["positions"]
    assert "0.99-1" in page.locator("#kld-confidence").inner_text()
    page.wait_for_selector("#kld-confidence-plot .js-plotly-plot", timeout=WAIT_MS)
    shot(page, "kld-report")
    page.set_viewport_size({"width": 1280, "height": 800})
    assert_readable(page)
    screen(page, "layout-kld-run")
    assert stats["kld_mean"] == doc["statistics"]["kld_mean"]


def choose(page, elem_id, value):
    if elem_id in FOLDED:
        open_settings(page)
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=value, exact=True).click()
    assert page.locator(f"#{elem_id} input").first.input_value() == value


def test_intactkv_compare_names_pivots_matches_engine_and_shows_sinks(browser, app_url,
                                                                      default_model):
    from dtm_core.compression.recipe import Recipe
    from dtm_core.measure.divergence import divergence
    from dtm_core.compression.pair import make_pair

    page = browser.new_page()
    page.goto(app_url)
    choose(page, "preset", "int4:g128")
    choose(page, "intactkv", "prefix")
    page.locator("#chat input").check()
    page.locator("#prompt textarea").fill("Name a large city in Japan.")
    set_tokens(page, 16)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    status = page.locator("#status").inner_text()
    assert "with IntactKV prefix" in status and "keeps the dense KV of the first" in status
    assert "Without IntactKV: FDT" in status
    engine = divergence(make_pair(default_model, Recipe.single("int4:g128")),
                        ["Name a large city in Japan."], 16, chat=True, intactkv="prefix")
    assert int(page.locator("#fdt").inner_text().strip()) == int(engine.table.fdt[0])
    # the attention-sink view of the same prompt
    page.locator("#sinks-panel").get_by_text("Attention sinks and massive activations").click()
    page.locator("#sinks-run").click()
    page.wait_for_function(
        "document.querySelector('#sinks-status').innerText.includes('Mean share')",
        timeout=WAIT_MS)
    page.wait_for_selector("#sink-heatmap .js-plotly-plot", timeout=WAIT_MS)
    page.wait_for_selector("#massive-plot .js-plotly-plot", timeout=WAIT_MS)
    assert_readable(page)
    # a number of first tokens on a tokenizer without BOS: the page says which tokens they are
    page.locator("#chat input").uncheck()
    fill(page, "intactkv", 2)
    page.locator("#prompt textarea").fill("The capital of France is")
    set_tokens(page, 8)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done') && "
                           "document.querySelector('#status').innerText.includes('IntactKV 2')",
                           timeout=WAIT_MS)
    status = page.locator("#status").inner_text()
    assert "first 2 tokens: 'The', ' capital'" in status and "no BOS" in status
    # a bad setting is a message, and the page keeps working
    fill(page, "intactkv", "lots")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('IntactKV "
                           "must be off')", timeout=WAIT_MS)


def test_intactkv_prompt_set_comparison_and_sweep_views(browser, app_url, tmp_path):
    f = tmp_path / "few.txt"
    f.write_text("The capital of France is\nWater boils at\nOnce upon a time\n")
    page = browser.new_page()
    upload_to_tab(page, app_url, "Prompt sets", "#set-upload", f)
    fill(page, "intactkv", 1)
    fill(page, "set-new-tokens", 8)
    page.locator("#set-run").click()
    page.wait_for_function("document.querySelector('#set-status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    assert "with and without IntactKV 1" in page.locator("#set-status").inner_text()
    comp = page.locator("#intactkv-comparison").inner_text()
    assert "mean FDT" in comp and "IntactKV 1" in comp and "without IntactKV" in comp
    assert "FDT (tokens) · IntactKV" in page.locator("#set-table").inner_text()
    # calibrated pivot KV on the set in use (chat prefix), with a bounded number of steps
    choose(page, "intactkv", "prefix")
    page.locator("#set-chat input").check()
    page.locator("#intactkv-cal input").check()
    fill(page, "calib-steps", 3)
    page.locator("#set-run").click()
    page.wait_for_function("document.querySelector('#set-status').innerText.includes("
                           "'Calibrated pivot KV')", timeout=WAIT_MS)
    assert "with and without IntactKV prefix+cal" in page.locator("#set-status").inner_text()
    assert "(uncalibrated)" in page.locator("#intactkv-comparison").inner_text()

    page.get_by_role("tab", name="Sensitivity").click()
    page.locator("#sens-upload input[type=file]").set_input_files(str(f))
    fill(page, "intactkv", 1)
    run_sensitivity(page, "0", "v,down")
    assert "with IntactKV 1 and without" in page.locator("#sens-status").inner_text()
    page.wait_for_selector("#sens-heatmap .js-plotly-plot", timeout=WAIT_MS)
    assert "IntactKV 1" in page.locator("#sens-heatmap .gtitle").text_content()
    assert "mean FDT (tokens) · plain" in page.locator("#sens-table").inner_text()
    page.locator("#sens-view").get_by_text("IntactKV − plain").click()
    page.wait_for_function(
        "document.querySelector('#sens-heatmap .gtitle').textContent.includes('− plain')",
        timeout=WAIT_MS)


def test_awq_with_chunked_calibration_text_in_compare(browser, app_url):
    """The pair row's calibration controls reach the engine: a custom AWQ spec calibrated on a
    built-in set cut into 32-token chunks, the first 4, and the status says so."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(app_url)
    page.locator("#preset input").click()
    page.get_by_role("option", name="custom spec").click()
    page.locator("#spec textarea, #spec input").first.fill("awq:int3:g64")
    page.locator("#components textarea, #components input").first.fill("0-2.*")
    open_settings(page)
    page.locator("#calibration input").click()
    page.get_by_role("option", name="instructions").click()
    for box, value in (("#calib-ctx", 32), ("#calib-samples", 4)):
        page.locator(f"{box} input[type=number]").fill(str(value))
    page.locator("#prompt textarea").fill("The capital of France is")
    set_tokens(page, 8)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    status = page.locator("#status").inner_text()
    assert "chunks of 32 tokens, the first 4" in status, status
    shot(page, "compare-awq-calibration")


def test_status_is_text_and_selections_people_type(browser, app_url):
    """A selection with spaces and '*' reaches the engine and the status shows it as typed (not
    as Markdown emphasis)."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(app_url)
    page.locator("#components textarea, #components input").first.fill("*.q, *.k")
    page.locator("#prompt textarea").fill("Water boils at")
    set_tokens(page, 4)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    status = page.locator("#status").inner_text()
    assert "int8@*.q, *.k" in status, status
    assert page.locator("#status em, #status strong").count() == 0
    # the Components help (kinds of the model's family, from its config) is text too
    info = page.locator("#components").inner_text()
    assert "llama kinds: q, k, v" in info and "\\" not in info, info


def test_empty_states_and_newline_tokens(browser, app_url, default_model):
    """Before a run, tables show their real headers (no 1 2 3 placeholder) and plots say what
    will appear; a newline the model writes is visible as ⏎ in both token columns."""
    from dtm_core.compression.recipe import Recipe
    from dtm_core.measure.divergence import divergence
    from dtm_core.compression.pair import make_pair

    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(app_url)
    page.get_by_role("tab", name="Prompt sets").click()
    table = page.locator("#set-table").inner_text()
    assert "FDT (tokens)" in table and not re.search(r"(^|\n)1\s*\n2\s*\n3", table)
    assert "after a run" in page.locator("#set-hist").inner_text()
    assert "dense token" in page.locator("#set-worst").inner_text()
    page.get_by_role("tab", name="Sensitivity").click()
    assert "mean FDT (tokens)" in page.locator("#sens-table").inner_text()
    shot(page, "empty-sensitivity")
    page.get_by_role("tab", name="Compare").click()
    prompt = NEWLINE_PROMPT
    ref = divergence(make_pair(default_model, Recipe.single("int8")), [prompt], 24)
    assert "\n" in ref.table.dense_text[0], "the prompt makes the model write a newline"
    page.locator("#prompt textarea").fill(prompt)
    set_tokens(page, 24)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    for col in ("#dense-output", "#compressed-output"):
        assert page.locator(f"{col} .nl").count() >= 1
        assert "⏎" in page.locator(col).inner_text()


NEWLINE_PROMPT = "A list of three fruits, one per line:\n1."


def test_second_checkpoint_is_described_and_compared(browser, app_url, tmp_path_factory):
    """A compressed-tensors W8A8 checkpoint of the default model, written with the library, as
    the second checkpoint: the page says what it is (format, scheme, activations, size against
    the base) before any run, and Compare runs on the pair."""
    import checkpoint_writers as W

    root = tmp_path_factory.mktemp("app-checkpoint")
    ckpt = W.write_ct(W.default_model_folder(root / "base"), root / "smollm2-w8a8", "W8A8")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(app_url)
    page.locator("#preset input").click()
    page.get_by_role("option", name="second checkpoint").click()
    box = page.locator("#checkpoint textarea, #checkpoint input").first
    box.fill(str(ckpt))
    box.press("Enter")
    page.wait_for_function(
        "document.querySelector('#checkpoint-info').innerText.includes('int-quantized')",
        timeout=WAIT_MS)
    info = page.locator("#checkpoint-info").inner_text()
    assert "W8A8 per channel symmetric, 210 linears" in info, info
    assert "int8 dynamic per-token input activations" in info and "for the base" in info, info
    for sel in ("#prompt", "#generate"):      # the description does not push them down
        on_first_screen(page, sel)
    page.locator("#prompt textarea").fill("The capital of France is")
    set_tokens(page, 12)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    assert page.locator("#dense-output [data-pos]").count() >= 1
    assert page.locator("#compressed-output [data-pos]").count() >= 1
    page.evaluate("window.scrollTo(0, 0)")
    for sel in ("#dense-output [data-pos]", "#compressed-output [data-pos]"):
        on_first_screen(page, sel)
    screen(page, "layout-compare-checkpoint")
    page.wait_for_selector("#position-plot .js-plotly-plot", timeout=WAIT_MS)
    shot(page, "compare-checkpoint")


def test_explain_the_first_divergent_token_and_a_clicked_one(browser, app_url):
    """Compare, then 'Explain the first divergent token': the ranking sentence, the logit lens
    with the flip layer marked, the restoring-power heatmap and the table; clicking a token of
    the compressed column explains that position instead."""
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    page.goto(app_url)
    page.locator("#preset input").click()
    page.get_by_role("option", name="custom spec").click()
    page.locator("#spec textarea, #spec input").first.fill("int4:g64")
    page.locator("#prompt textarea").fill("The capital of France is")
    set_tokens(page, 16)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    fdt = int(page.locator("#fdt").inner_text())
    page.locator("#explain-run").click()
    page.wait_for_function(
        "document.querySelector('#explain-status').innerText.includes('is carried by')",
        timeout=WAIT_MS)
    status = page.locator("#explain-status").inner_text()
    assert f"The divergence at token {fdt} " in status, status
    page.wait_for_selector("#explain-lens .js-plotly-plot", timeout=WAIT_MS)
    page.wait_for_selector("#explain-heatmap .js-plotly-plot", timeout=WAIT_MS)
    assert "Logit lens at position" in page.locator("#explain-lens").inner_text()
    first = status.split("carried by: ")[1].split(" (")[0]
    table = page.locator("#explain-table").inner_text()
    assert "KL after the patch" in table and "restored (%)" in table, table[:300]
    assert page.locator("#explain-table [role=gridcell]").filter(has_text=first).count() >= 1
    shot(page, "compare-explain")
    assert_readable(page)
    # a click on a token before the divergence explains that position
    page.locator("#compressed-output [data-pos='0']").click()
    page.wait_for_function(
        "document.querySelector('#explain-status').innerText.includes('position 0 ')",
        timeout=WAIT_MS)
    assert page.locator("#explain-position input").input_value() == "0"


def test_mixed_plan_pareto_chart_holdout_table_and_exports(browser, app_url, tmp_path):
    f = tmp_path / "six.txt"
    f.write_text("The capital of France is\nWater boils at\nThe largest planet is\n"
                 "Once upon a time\nTo make bread you need\nThe speed of light is\n")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    upload_to_tab(page, app_url, "Sensitivity", "#sens-upload", f)
    fill(page, "sens-layers", "0-1")
    fill(page, "sens-kinds", "q,down")
    fill(page, "sens-new-tokens", 8)
    page.get_by_role("tab", name="Mixed plan").click()      # a sub-tab of Sensitivity
    fill(page, "mplan-budget", 5)
    page.locator("#mplan-run").scroll_into_view_if_needed()
    page.locator("#mplan-run").click()
    page.wait_for_function("document.querySelector('#mplan-status').innerText"
                           ".includes('the plan keeps')", timeout=WAIT_MS)
    status = page.locator("#mplan-status").inner_text()
    assert "bits per weight" in status and "held-out prompts" in status, status
    page.wait_for_selector("#mplan-chart .js-plotly-plot", timeout=WAIT_MS)
    # one point per row: the plan, the DTM planner, KL-ranked, random and three uniform specs
    names = page.evaluate("Array.from(document.querySelector('#mplan-chart .js-plotly-plot')"
                          ".data).map(t => t.name)")
    assert names[0] == "plan" and names[3] == "random"      # plan, the two other planners
    assert len({"fdt planner", "dtm planner", "KL-ranked"} & set(names[1:3])) == 2
    assert "uniform int4:g64 (closest)" in names and len(names) == 7     # dense: table only
    kinds = page.evaluate("Array.from(document.querySelector('#mplan-cells .js-plotly-plot')"
                          ".data).map(t => t.name)")
    assert kinds == ["q", "down"]
    cells = page.locator("#mplan-table").inner_text()
    assert "bits per weight" in cells and "uniform int3:g64" in cells
    page.locator("#mplan-chart").scroll_into_view_if_needed()
    shot(page, "mixed_plan")
    assert_readable(page)
    # exports: llama.cpp files for download, then a bad one (pruning has no llama.cpp type) is
    # one sentence on a plan made of pruning specs
    page.locator("#mplan-export").click()
    page.wait_for_function("document.querySelector('#mplan-export-status').innerText"
                           ".includes('llama_cpp_tensor_types.txt')", timeout=WAIT_MS)
    links = page.locator("#mplan-files a")
    assert links.count() == 2
    fill(page, "mplan-specs", "magnitude:0.5,magnitude:0.9")
    choose(page, "mplan-budget-kind", "sparsity (share of weights)")
    fill(page, "mplan-budget", 0.6)
    page.locator("#mplan-run").click()
    page.wait_for_function("document.querySelector('#mplan-status').innerText.includes('within 60% sparsity')",
                           timeout=WAIT_MS)
    page.locator("#mplan-export").click()
    page.wait_for_function("document.querySelector('#mplan-export-status').innerText"
                           ".includes('no tensor type')", timeout=WAIT_MS)
    assert "Traceback" not in page.locator("#mplan-export-status").inner_text()
    choose(page, "mplan-export-kind", "llmcompressor")
    page.locator("#mplan-export").click()
    page.wait_for_function("document.querySelector('#mplan-export-status').innerText"
                           ".includes('recipe.yaml')", timeout=WAIT_MS)
    href = page.locator("#mplan-files a").first.get_attribute("href")
    assert href and "recipe.yaml" in href
    # a draft plan: the same cells, acceptance at K = 4 as the objective, the speed-up
    fill(page, "mplan-specs", "int8,int4:g64,int3:g64")
    choose(page, "mplan-budget-kind", "bits per weight")
    fill(page, "mplan-budget", 5)
    choose(page, "mplan-objective", "draft acceptance, K = 4")
    page.locator("#mplan-run").click()
    page.wait_for_function("document.querySelector('#mplan-status').innerText"
                           ".includes('expected speed-up')", timeout=WAIT_MS)
    status = page.locator("#mplan-status").inner_text()
    assert "Draft plan" in status and "accepted per step drafting 4" in status, status
    assert "speedup" in page.locator("#mplan-table").inner_text()
    page.locator("#mplan-status").scroll_into_view_if_needed()
    shot(page, "draft_plan")
    assert_readable(page)
    # a shortlist (specs not swept yet): every cell estimated, one per spec measured exactly,
    # the plan still verified by a real evaluation
    fill(page, "mplan-specs", "int4:g128,int2:g64")
    choose(page, "mplan-objective", "first divergent token (FDT)")
    fill(page, "mplan-shortlist", 1)
    page.locator("#mplan-run").click()
    done = r"/others estimated\); \d+ real evaluation/"     # the final line, not the progress
    page.wait_for_function(f"{done}.test(document.querySelector('#mplan-status').innerText)",
                           timeout=WAIT_MS)
    status = page.locator("#mplan-status").inner_text()
    # one exact cell per spec (more where an earlier run of the app stored others)
    exact = re.search(r"shortlist: (\d+) of 8 cells exact, the others estimated", status)
    assert exact and int(exact.group(1)) >= 2, status
    assert "uniform int2:g64" in page.locator("#mplan-table").inner_text()
    page.locator("#mplan-shortlist").scroll_into_view_if_needed()
    shot(page, "mixed_plan_shortlist")
    # a bad shortlist is one sentence, and the plan on the page stays
    fill(page, "mplan-shortlist", -1)
    page.locator("#mplan-run").click()
    page.wait_for_function("document.querySelector('#mplan-status').innerText"
                           ".includes('1 or more, or 0')", timeout=WAIT_MS)
    assert "uniform int2:g64" in page.locator("#mplan-table").inner_text()
    page.wait_for_selector("#mplan-chart .js-plotly-plot", timeout=WAIT_MS)


def test_level_curves_across_formats_and_format_presets(browser, app_url, tmp_path):
    """The deployed formats in the page: fp8, nvfp4 and mxfp4 among the presets, the Custom
    spec's help listing every format, and level curves across formats (each spec a point at its
    bits per weight, labelled)."""
    f = tmp_path / "two.txt"
    f.write_text("The capital of France is\nWater boils at\n")
    page = browser.new_page()
    page.goto(app_url)
    page.locator("#preset input").first.click()
    for preset in ("fp8", "nvfp4", "mxfp4"):
        assert page.get_by_role("option", name=preset, exact=True).count() == 1
    page.keyboard.press("Escape")
    assert "nvfp4:a" in page.locator("#spec").inner_text() and "w4afp8" in \
        page.locator("#spec").inner_text()
    page.get_by_role("tab", name="Sensitivity").click()
    page.locator("#sens-upload input[type=file]").set_input_files(str(f))
    fill(page, "sens-new-tokens", 6)
    page.get_by_role("tab", name="Level curves").click()    # a sub-tab of Sensitivity
    page.locator("#lvl-method input").first.click()
    page.get_by_role("option", name="formats", exact=True).click()
    fill(page, "lvl-levels", "fp8,nvfp4,mxfp4")
    fill(page, "lvl-kinds", "q")
    page.locator("#lvl-run").click()
    page.wait_for_function("document.querySelector('#lvl-status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    page.wait_for_selector("#lvl-plot .js-plotly-plot", timeout=WAIT_MS)
    # the plot as drawn (plotly's decoded full data)
    traces = page.evaluate("""() => document.querySelector('#lvl-plot .js-plotly-plot')._fullData
                              .map(t => ({x: Array.from(t.x), text: Array.from(t.text || [])}))""")
    assert len(traces) == 1, traces
    pts = dict(zip(traces[0]["text"], traces[0]["x"]))
    assert set(pts) == {"fp8", "nvfp4", "mxfp4"}
    assert pts["mxfp4"] == pytest.approx(4.25) and pts["nvfp4"] == pytest.approx(4.5, abs=1e-3)
    assert "bits per weight" in page.evaluate(
        "() => document.querySelector('#lvl-plot .js-plotly-plot')._fullLayout.xaxis.title.text")
    page.locator("#lvl-plot").scroll_into_view_if_needed()
    shot(page, "level_curves_formats")
    assert_readable(page)


def test_kv_grid_fills_both_heatmaps_with_the_engines_cells(browser, app_url, tmp_path,
                                                           default_model):
    """Sensitivity > KV grid: key bits 2,8 x value bits 4,8 on two prompts; both heatmaps hold
    four values, the FDT and KL of each cell are the engine's kv_grid for that (K, V)."""
    from dtm_core.analysis.kvgrid import kv_grid
    from dtm_core.models.generation import encode_prompts

    texts = ["The capital of France is", "Water boils at"]
    f = tmp_path / "two.txt"
    f.write_text("\n".join(texts) + "\n")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(app_url)
    page.get_by_role("tab", name="Sensitivity").click()
    page.locator("#sens-upload input[type=file]").set_input_files(str(f))
    fill(page, "sens-new-tokens", 6)
    page.get_by_role("tab", name="KV grid").click()
    fill(page, "kvg-k-bits", "2,8")
    fill(page, "kvg-v-bits", "4,8")
    page.locator("#kvg-run").click()
    page.wait_for_function("document.querySelector('#kvg-status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    page.wait_for_selector("#kvg-kl .js-plotly-plot", timeout=WAIT_MS)
    drawn = {}
    for plot in ("kvg-fdt", "kvg-kl"):
        t = page.evaluate(f"""() => {{const d = document.querySelector('#{plot} .js-plotly-plot')
                                      ._fullData[0];
                                      return {{x: Array.from(d.x), y: Array.from(d.y),
                                               z: Array.from(d.z, r => Array.from(r))}}; }}""")
        assert t["x"] == ["4", "8"] and t["y"] == ["2", "8"], t
        drawn[plot] = t["z"]
    ids = encode_prompts(default_model.tokenizer, texts)
    want = kv_grid(default_model, ids, 6, k_bits="2,8", v_bits="4,8")
    for r in want.itertuples():
        i, j = [2, 8].index(r.k_bits), [4, 8].index(r.v_bits)
        assert drawn["kvg-fdt"][i][j] == pytest.approx(r.fdt_mean, abs=1e-9)
        assert drawn["kvg-kl"][i][j] == pytest.approx(r.kl_mean, rel=1e-6)
    table = page.locator("#kvg-table").inner_text()
    assert "bits per cached value" in table and "8.25" in table and "3.25" in table
    page.locator("#kvg-fdt").scroll_into_view_if_needed()
    shot(page, "kv_grid")
    assert_readable(page)


def test_kv_cache_pair_streams_in_compare_and_explain_patches_a_cache(browser, app_url,
                                                                     default_model):
    """Compare with kv:int4 on every cache: the streamed first divergence is the engine's (the
    compressed side decodes with its quantized cache), and Explain ranks the layers' caches,
    the first one being the engine's own explanation's."""
    from dtm_core.analysis.explain import explain
    from dtm_core.compression.pair import make_pair
    from dtm_core.compression.recipe import Recipe
    from dtm_core.measure.divergence import divergence
    from dtm_core.models.generation import encode_prompts

    prompt = "The capital of France is"
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    page.goto(app_url)
    page.locator("#preset input").click()
    page.get_by_role("option", name="custom spec").click()
    page.locator("#spec textarea, #spec input").first.fill("kv:int4")
    page.locator("#components textarea, #components input").first.fill("*")
    page.locator("#prompt textarea").fill(prompt)
    set_tokens(page, 16)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    shown = int(page.locator("#fdt").inner_text())
    pair = make_pair(default_model, Recipe.single("kv:int4", "*"))
    engine = divergence(pair, [prompt], 16, generate_compressed=True)
    assert shown == int(engine.table.fdt[0]) == int(engine.table.fdt_generated[0]) < 16
    assert page.locator("#compressed-output .first-divergent").count() == 1
    page.locator("#explain-run").click()
    page.wait_for_function(
        "document.querySelector('#explain-status').innerText.includes('is carried by')",
        timeout=WAIT_MS)
    status = page.locator("#explain-status").inner_text()
    e = explain(pair, encode_prompts(default_model.tokenizer, [prompt])[0], 16)
    top = e.ranked().component.iloc[0]
    assert top.endswith("cache") and f"carried by: {top} (" in status, status
    table = page.locator("#explain-table").inner_text()
    assert "cache" in table and "patched by" in table
    page.wait_for_selector("#explain-heatmap .js-plotly-plot", timeout=WAIT_MS)
    kinds = page.evaluate("() => Array.from(document.querySelector("
                          "'#explain-heatmap .js-plotly-plot')._fullData[0].x)")
    assert {"kcache", "vcache"} <= set(kinds), kinds
    page.locator("#explain-heatmap").scroll_into_view_if_needed()
    shot(page, "compare_kv_explain")
    assert_readable(page)


# ---- the page's layout at 1280x800: first screens, Examples, Ctrl+Enter, readability ----

READABLE = """() => {
  const visible = (el) => el.offsetParent !== null && el.getClientRects().length > 0;
  const bare = Array.from(document.querySelectorAll('th')).filter(visible)
    .map((th) => th.innerText.trim()).filter((t) => /^\\d+$/.test(t));
  const clashes = [];
  document.querySelectorAll('.js-plotly-plot').forEach((gd) => {
    const legend = gd.querySelector('g.legend');
    if (!visible(gd) || !legend) return;
    const l = legend.getBoundingClientRect();
    if (!l.width || !l.height) return;
    gd.querySelectorAll('.gtitle, .xtitle, .ytitle, .y2title').forEach((t) => {
      const r = t.getBoundingClientRect();
      if (r.width && l.left < r.right && r.left < l.right && l.top < r.bottom && r.top < l.bottom)
        clashes.push([gd.closest('[id]').id, t.getAttribute('class'), t.textContent]);
    });
  });
  return {bare, clashes};
}"""


def assert_readable(page):
    """No visible table header is a bare number (an empty table's placeholder), and no plot
    legend's box intersects its plot's title or an axis title."""
    found = page.evaluate(READABLE)
    assert not found["bare"], f"placeholder headers: {found['bare']}"
    assert not found["clashes"], f"legends over titles: {found['clashes']}"


def screen(page, name: str) -> None:
    """The first screen only (what a visitor sees without scrolling), in tests/artifacts/."""
    from conftest import ROOT

    folder = ROOT / "tests" / "artifacts"
    folder.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(folder / f"{name}.png"))


def on_first_screen(page, selector, height=800):
    box = page.locator(selector).first.bounding_box()
    assert box is not None and box["y"] + min(box["height"], 24) <= height, (selector, box)


def run_example(page, tab: str, file_stem: str, done_js: str) -> None:
    """Press the tab's Example, wait for its file to be in the upload box, run it with
    Ctrl+Enter and wait until ``done_js`` holds."""
    page.locator(f"#{tab}-example").click()
    page.wait_for_function(f"document.querySelector('#{tab}-upload').innerText"
                           f".includes('{file_stem}')", timeout=WAIT_MS)
    page.keyboard.press("Control+Enter")
    page.wait_for_function(done_js, timeout=WAIT_MS)


def open_tab(page, tab: str, name: str, heights: dict) -> None:
    """Open a tab: its first screen is readable and saved, its page height noted."""
    page.get_by_role("tab", name=tab).click()
    assert_readable(page)
    screen(page, name)
    heights[tab] = page_height(page)


def after_run(page, plot: str, name: str) -> None:
    """Once ``plot`` is drawn: the page is readable and its first screen saved."""
    page.wait_for_selector(f"{plot} .js-plotly-plot", timeout=WAIT_MS)
    assert_readable(page)
    screen(page, name)


def page_height(page) -> int:
    return page.evaluate("document.documentElement.scrollHeight")


def test_every_tab_first_screen_example_and_ctrl_enter(browser, app_url):
    """At 1280x800: each tab's first screen before and after a run of its Example, started with
    Ctrl+Enter (the KLD report's Example fills its setup; its report after a run is checked by
    test_kld_report_from_uploaded_text); Compare's prompt, Generate and the first tokens of both columns on the first
    screen; the folded settings' header follows them; tables never show placeholder headers, no
    legend covers a title, the heatmap's layer axis counts whole layers, and each Sensitivity
    sub-tab fits in about two screens, its results kept when switching."""
    from ui.compare import EXAMPLE_PROMPT

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(app_url)
    heights = {}
    # Compare
    assert "IntactKV off · calibration: prompts in use · chunk 0" in \
        page.locator("#advanced-settings").inner_text()
    for sel in ("#prompt", "#generate"):
        on_first_screen(page, sel)
    assert_readable(page)
    screen(page, "layout-compare-first")
    heights["Compare"] = page_height(page)
    page.locator("#compare-example").click()
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === "
                           f"'{EXAMPLE_PROMPT}'", timeout=WAIT_MS)
    assert page.locator("#spec textarea, #spec input").first.input_value() == "int4:g64"
    page.locator("#prompt textarea").press("Control+Enter")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    page.evaluate("window.scrollTo(0, 0)")
    for sel in ("#dense-output [data-pos]", "#compressed-output [data-pos]"):
        on_first_screen(page, sel)
    page.wait_for_selector("#position-plot .js-plotly-plot", timeout=WAIT_MS)
    assert_readable(page)
    screen(page, "layout-compare-run")
    # the folded settings say what they hold once changed
    fill(page, "calib-ctx", 32)
    page.wait_for_function("document.querySelector('#advanced-settings').innerText"
                           ".includes('chunk 32')", timeout=WAIT_MS)
    fill(page, "calib-ctx", 0)
    page.locator("#advanced-settings").get_by_text("Settings:").first.click()   # fold again
    # Prompt sets
    open_tab(page, "Prompt sets", "layout-prompt-sets-first", heights)
    run_example(page, "set", "factoid_qa-first8",
                "document.querySelector('#set-status').innerText.includes('Done')")
    assert "8 prompts" in page.locator("#set-status").inner_text()
    after_run(page, "#set-confidence-plot", "layout-prompt-sets-run")
    # Sensitivity: the shared setup, then one sub-tab per tool
    open_tab(page, "Sensitivity", "layout-sensitivity-first", heights)
    for sub in ("Why: patching", "Plan", "Mixed plan", "Level curves", "Heatmap"):
        page.get_by_role("tab", name=sub, exact=True).click()
        heights[f"Sensitivity / {sub}"] = page_height(page)
        below = page.evaluate("document.documentElement.scrollHeight - window.scrollY - "
                              "document.querySelector('#sens-tabs').getBoundingClientRect().top")
        assert below <= 2 * 800, (sub, below)       # the sub-tab itself: two screens at most
    run_example(page, "sens", "general-first8",
                "document.querySelector('#sens-status').innerText.includes('Done')")
    assert "28 components" in page.locator("#sens-status").inner_text()
    page.wait_for_selector("#sens-heatmap .js-plotly-plot", timeout=WAIT_MS)
    ticks = page.evaluate("Array.from(document.querySelectorAll('#sens-heatmap .ytick text'))"
                          ".map((t) => t.textContent)")
    assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks), ticks
    assert_readable(page)
    screen(page, "layout-sensitivity-run")
    heights["Sensitivity / Heatmap, after the Example"] = page_height(page)
    page.get_by_role("tab", name="Mixed plan").click()
    page.get_by_role("tab", name="Heatmap").click()
    assert page.locator("#sens-heatmap .js-plotly-plot").is_visible()     # results stay
    # KLD report
    open_tab(page, "KLD report", "layout-kld-first", heights)
    # (the report after a run: test_kld_report_from_uploaded_text, at this size too)
    page.locator("#kld-example").click()
    page.wait_for_function("document.querySelector('#kld-upload').innerText"
                           ".includes('licenses')", timeout=WAIT_MS)
    assert page.locator("#kld-ctx input").input_value() == "256"
    print("page heights at 1280x800 (px):", heights)


MARKS = "Array.from(document.querySelectorAll('#sens-heatmap text'))" \
        ".filter(t => t.textContent.trim() === '≈').length"


def test_sensitivity_estimates_first_then_exact_cells(browser, app_url, default_model, tmp_path):
    """Run sweep with Estimate first (the default): every cell's estimate on the heatmap at once,
    marked ≈, then exact cells replace estimates, most sensitive first, until the top 2 settle;
    the estimate drawn is the engine's, and the page says how estimate and exact agree."""
    from dtm_core.analysis.sweep.estimate import estimate_sweep
    from dtm_core.measure.prompts import load_prompts
    from dtm_core.models.generation import encode_prompts

    import uuid

    f = tmp_path / "few.txt"       # a prompt of its own: no stored cell settles it early
    f.write_text("The capital of France is\nWater boils at\nOnce upon a time\n"
                 f"Note {uuid.uuid4().hex[:6]} says\n")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    upload_to_tab(page, app_url, "Sensitivity", "#sens-upload", f)
    assert page.locator("#sens-estimate input").is_checked()
    fill(page, "sens-layers", "0-2")
    fill(page, "sens-new-tokens", 8)
    fill(page, "sens-settle", 2)
    choose(page, "sens-metric", "KL")
    page.locator("#sens-run").click()
    page.wait_for_function(f"{MARKS} > 0", timeout=WAIT_MS)         # the estimated view
    assert page.evaluate(MARKS) >= 15
    page.wait_for_function("document.querySelector('#sens-status').innerText.includes('Settled')",
                           timeout=WAIT_MS)
    status = page.locator("#sens-status").inner_text()
    m = re.search(r"(\d+) of 21 cells exact", status)
    assert m and 5 <= int(m.group(1)) < 21, status
    exact = int(m.group(1))
    assert "Spearman" in status and "on KL" in status
    page.wait_for_function(f"{MARKS} === {21 - exact}", timeout=WAIT_MS)
    title = page.locator("#sens-heatmap .gtitle").text_content()
    assert f"{exact} of 21 cells exact" in title
    table = page.locator("#sens-table").inner_text()
    assert "≈ mean KL (nats)" in table and "exact" in table
    assert_readable(page)
    shot(page, "sensitivity-estimated")
    # an estimated cell shows the engine's estimate for the same prompts
    dense = default_model
    ids = encode_prompts(dense.tokenizer, load_prompts(str(f)).prompts)
    est = estimate_sweep(dense, "int4:g128", ids, 8, layers="0-2", cache_dir=tmp_path / "c")
    cells = page.evaluate("""() => {
      const d = document.querySelector('#sens-heatmap .js-plotly-plot').data[0];
      const out = {};
      d.y.forEach((layer, i) => d.x.forEach((kind, j) => {
        out[layer + '.' + kind] = [d.z[i][j], d.text[i][j]]; }));
      return out; }""")
    estimated = {k: v[0] for k, v in cells.items() if v[1] == "≈"}
    assert len(estimated) == 21 - exact
    want = est.table.set_index("component").kl_estimate
    for name, value in estimated.items():
        assert value == pytest.approx(float(want[name]), rel=1e-3), name


def test_prompt_set_free_run_lengths_loops_and_final_answers(browser, app_url, tmp_path):
    """Free run on a numeric set: the cards say loop rates, length ratios, rejoins and final
    answer agreement, the table has the free-run and answer columns, the length-ratio plot
    draws."""
    f = tmp_path / "sums.jsonl"
    f.write_text("\n".join(json.dumps({"question": q, "answer": a, "answer_type": "number"})
                           for q, a in [("What is 12 + 30?", "42"), ("What is 7 times 6?", "42"),
                                        ("What is 100 minus 1?", "99")]), encoding="utf-8")
    page = browser.new_page()
    upload_to_tab(page, app_url, "Prompt sets", "#set-upload", f)
    page.locator("#set-new-tokens input[type=number]").fill("24")
    page.locator("#set-new-tokens input[type=number]").press("Enter")
    page.locator("#set-free-run input[type=checkbox]").check()
    page.locator("#set-chat input[type=checkbox]").check()
    page.locator("#set-run").click()
    page.wait_for_function("document.querySelector('#set-status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    summary = page.locator("#set-summary").inner_text()
    for card in ("Loop rate dense → compressed", "Length ratio compressed / dense",
                 "Rejoin the dense text", "Final answers agree", "Accuracy dense → compressed"):
        assert card in summary, card
    table = page.locator("#set-table").inner_text()
    for head in ("answer d", "answer c", "len c/d", "loop c", "rejoins at", "edit sim (%)"):
        assert head in table, head
    page.wait_for_selector("#set-len-ratio .js-plotly-plot", timeout=WAIT_MS)
    shot(page, "prompt-sets-free-run")
    assert_readable(page)


def test_long_compare_strip_scrolls_columns_together_and_jumps(browser, app_url):
    """A long answer: the columns scroll (together), the strip marks exactly the SDT map's red
    positions, a mark and the jump button bring those tokens into view in both columns."""
    page = browser.new_page()
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(app_url)
    page.locator("#spec textarea, #spec input").first.fill("int4:g64")
    page.locator("#prompt textarea").fill("Write a long story about a dragon who learns to read.")
    page.locator("#chat input[type=checkbox]").check()
    set_tokens(page, 240)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                           timeout=WAIT_MS)
    red = page.evaluate("[...document.querySelectorAll('#sdt-map .tok.disagree')]"
                        ".map(t => +t.dataset.pos)")
    ticks = page.evaluate("[...document.querySelectorAll('#diff-strip .tick')]"
                          ".map(t => +t.dataset.pos)")
    assert ticks == red and len(ticks) >= 2, (ticks, red)
    fdt = int(page.locator("#fdt").inner_text().strip())
    status = page.locator("#status").inner_text()
    assert re.search(r"free run \d+/\d+ tokens, edit sim \d+%", status), status
    assert ticks[0] == fdt and "fdt" in page.locator("#diff-strip .tick").first.get_attribute(
        "class")
    boxes = ["#dense-output .tokens", "#compressed-output .tokens"]
    heights = page.evaluate(f"{boxes}.map(s => [document.querySelector(s).scrollHeight, "
                            "document.querySelector(s).clientHeight])")
    assert all(h > c for h, c in heights), f"long outputs scroll inside their columns: {heights}"
    # scrolling one column scrolls the other to the same share of its height
    page.evaluate(f"document.querySelector('{boxes[0]}').scrollTop = 1e6")
    page.wait_for_function(f"document.querySelector('{boxes[1]}').scrollTop > 0",
                           timeout=WAIT_MS)

    def visible(pos):
        return page.evaluate(
            "(pos) => " + str(boxes) + ".map(s => { const b = document.querySelector(s); "
            "const t = b.querySelector(`[data-pos=\"${pos}\"]`); if (!t) return null; "
            "const r = t.getBoundingClientRect(), q = b.getBoundingClientRect(); "
            "return r.top >= q.top - 1 && r.bottom <= q.bottom + 1; })", pos)

    page.locator("#jump-fdt").click()     # inside the strip, over the dense column
    page.wait_for_function("document.querySelector('#dense-output .jumped') !== null",
                           timeout=WAIT_MS)
    assert visible(fdt)[0] and visible(fdt)[1] in (True, None), visible(fdt)
    last = ticks[-1]
    page.locator(f'#diff-strip .tick[data-pos="{last}"]').click()
    page.wait_for_function(f"document.querySelector('#dense-output [data-pos=\"{last}\"]')"
                           ".classList.contains('jumped')", timeout=WAIT_MS)
    assert visible(last)[0], visible(last)
    shot(page, "compare-long-strip")
    assert_readable(page)


def says(page, selector: str, text: str) -> None:
    """Wait until the element's text says ``text``."""
    page.wait_for_function(f"document.querySelector({selector!r}).innerText.includes({text!r})",
                           timeout=WAIT_MS)


def test_compare_refuses_a_pair_that_does_not_fit_and_prompt_sets_run_in_one_model(browser,
                                                                                   tmp_path):
    """With room for the dense model but not a compressed copy beside it (--memory-limit 0.8
    GiB; the default model holds 0.5 GiB, an int4 copy of every linear 0.39 GiB more), Compare
    says so in one sentence with the memory it needs and the views that fit, and those views
    run (the model compressed in place, restored after)."""
    with running_app("--memory-limit", "0.8") as url:
        page = browser.new_page()
        page.goto(url)
        page.locator("#prompt textarea").fill("The capital of France is")
        set_tokens(page, 4)
        page.locator("#generate").click()
        says(page, "#status", "GiB are free")
        status = page.locator("#status").inner_text()
        assert "side-by-side stream" in status and "GiB more" in status
        assert "Prompt sets, KLD" in status and "one model's memory" in status
        shot(page, "compare-memory-refusal")
        f = tmp_path / "two.jsonl"
        f.write_text('{"question": "What is the capital of France?", "answer": "Paris"}\n'
                     '{"question": "Name a primary colour.", "answer": "red"}\n')
        upload_to_tab(page, url, "Prompt sets", "#set-upload", f)
        page.locator("#set-new-tokens input[type=number]").fill("4")
        page.locator("#set-new-tokens input[type=number]").press("Enter")
        page.locator("#set-run").click()
        says(page, "#set-status", "Done")
        assert "Mean FDT" in page.locator("#set-summary").inner_text()
        assert "in one model's memory" in page.locator("#set-status").inner_text()
        shot(page, "prompt-sets-one-model")
        # and the stream still refuses the same way: nothing was lost
        page.get_by_role("tab", name="Compare").click()
        page.locator("#prompt textarea").fill("The capital of France is")
        page.locator("#generate").click()
        says(page, "#status", "GiB are free")
