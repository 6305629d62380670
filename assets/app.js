() => {
  // Clicking a cell of the sensitivity heatmap opens that single-component pair in Compare:
  // the cell's "LAYER.KIND" goes into a hidden textbox and a hidden button sends it to the server.
  // Plots are re-rendered on every run, so the click handler is (re)attached periodically.
  const open = (ev) => {
    const pt = ev && ev.points && ev.points[0];
    if (!pt) return;
    const box = document.querySelector('#sens-clicked textarea, #sens-clicked input');
    const btn = document.querySelector('#sens-open');
    if (!box || !btn) return;
    box.value = `${pt.y}.${pt.x}`;
    box.dispatchEvent(new Event('input', {bubbles: true}));
    setTimeout(() => btn.click(), 100);
  };
  // The FDT / SDT cards say N: the Compare tab's "Max new tokens" setting.
  setInterval(() => {
    const n = document.querySelector('#new-tokens input[type=number]');
    document.querySelectorAll('.n-tokens').forEach((s) => {
      if (n && s.textContent !== n.value) s.textContent = n.value;
    });
  }, 300);
  // Clicking a token of either Compare column explains that position (the dense
  // continuation's index): its data-pos goes into a hidden box and a hidden button sends it.
  document.addEventListener('click', (ev) => {
    const tok = ev.target.closest && ev.target.closest(
      '#compressed-output [data-pos], #dense-output [data-pos]');
    if (!tok) return;
    const box = document.querySelector('#explain-clicked textarea, #explain-clicked input');
    const btn = document.querySelector('#explain-open');
    if (!box || !btn) return;
    box.value = tok.dataset.pos;
    box.dispatchEvent(new Event('input', {bubbles: true}));
    setTimeout(() => btn.click(), 100);
  });
  setInterval(() => {
    document.querySelectorAll('#sens-heatmap .js-plotly-plot').forEach((gd) => {
      if (!gd.on) return;
      if (gd.removeListener) gd.removeListener('plotly_click', open);
      gd.on('plotly_click', open);
      gd.dataset.clickReady = '1';   // tests wait on this, not on a fixed delay
    });
  }, 500);
  // Ctrl+Enter (Cmd+Enter) runs the tab in view: the first visible primary button (Generate,
  // Run set, Run sweep, Make mixed plan, Score text, ... of the selected tab and sub-tab).
  document.addEventListener('keydown', (ev) => {
    if (ev.key !== 'Enter' || !(ev.ctrlKey || ev.metaKey)) return;
    const btn = Array.from(document.querySelectorAll('button.primary')).find(
      (b) => b.offsetParent !== null && !b.disabled);
    if (!btn) return;
    ev.preventDefault();
    btn.click();
  }, true);
}
