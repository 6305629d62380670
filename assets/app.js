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
  // Long outputs: the two Compare columns scroll together (same share of their height), a
  // click on a mark of the divergence strip scrolls both to that position, and the "Jump to
  // the first divergent token" button to the first divergent token.
  const COLS = ['#dense-output .tokens', '#compressed-output .tokens'];
  let syncing = false;
  document.addEventListener('scroll', (ev) => {
    const t = ev.target;
    if (syncing || !t.matches || !COLS.some((c) => t.matches(c))) return;
    const other = document.querySelector(COLS.find((c) => !t.matches(c)));
    if (!other) return;
    const share = t.scrollTop / Math.max(1, t.scrollHeight - t.clientHeight);
    syncing = true;
    other.scrollTop = share * Math.max(0, other.scrollHeight - other.clientHeight);
    requestAnimationFrame(() => { syncing = false; });
  }, true);
  const jump = (pos) => {
    syncing = true;
    COLS.forEach((c) => {
      const box = document.querySelector(c);
      const tok = box && box.querySelector(`[data-pos="${pos}"]`);
      if (!box || !tok) return;
      box.scrollTop = Math.max(0, tok.offsetTop - box.clientHeight / 3);
      tok.classList.add('jumped');
      setTimeout(() => tok.classList.remove('jumped'), 1500);
    });
    requestAnimationFrame(() => { syncing = false; });
  };
  window.dtmJumpFdt = () => {
    const tok = document.querySelector('#dense-output .first-divergent');
    if (tok) jump(tok.dataset.pos);
  };
  document.addEventListener('click', (ev) => {
    const tick = ev.target.closest && ev.target.closest('.diff-strip .tick');
    if (tick) jump(tick.dataset.pos);
    if (ev.target.closest && ev.target.closest('#jump-fdt')) window.dtmJumpFdt();
  });
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
