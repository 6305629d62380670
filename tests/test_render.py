"""What the page shows, as data: tokens keep their whitespace and show newlines as ⏎, tables show
readable numbers with units worst first, FDT/SDT cards explain themselves, and the first
divergent token is marked in the per-position plot."""
from __future__ import annotations

import pandas as pd

from ui.render import FDT_HINT, card_head, readable_table, render_sdt_map, significant, visible


class Words:
    WORDS = {1: "Hello", 2: "\n", 3: "  indented", 4: "<b>"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.WORDS[int(i)] for i in ids)


def test_tokens_keep_whitespace_and_show_newlines():
    assert visible("a\nb") == 'a<span class="nl">⏎</span>\nb'
    html = render_sdt_map(Words(), [1, 2, 3, 4], [True, False, True, True])
    assert "⏎" in html and "  indented" in html and "&lt;b&gt;" in html
    assert html.count("data-pos") == 4


def test_tables_are_readable_worst_first_with_units():
    t = pd.DataFrame({"prompt_index": [0, 1, 2], "fdt": [12, 3, 3],
                      "sdt": [0.033333333333, 0.5, 0.25], "kl_mean": [0.0034123, 19.23456, 1.5],
                      "fdt_intactkv": [12, 5, 4], "prompt": ["a", "b", "c"]})
    shown = readable_table(t, sort=["fdt", "kl_mean"], ascending=[True, False])
    assert list(shown.columns) == ["#", "FDT (tokens)", "SDT (%)", "mean KL (nats)",
                                   "FDT (tokens) · IntactKV", "prompt"]
    assert shown["#"].tolist() == [1, 2, 0]                 # lowest FDT, then highest KL
    assert shown["mean KL (nats)"].tolist() == [19.2, 1.5, 0.00341]
    assert shown["SDT (%)"].tolist() == [50.0, 25.0, 3.33]
    assert significant(96.875) == 96.9 and significant(float("nan")) != significant(1.0)
    assert t.kl_mean[0] == 0.0034123                          # the data itself is untouched


def test_fdt_card_says_what_it_is():
    head = card_head("First divergent token (FDT)", FDT_HINT)
    assert 'title="First divergent token: how many tokens' in head and "(FDT)" in head


def test_position_plot_marks_the_first_divergent_token(default_model):
    from dtm_core.compression.recipe import Recipe
    from dtm_core.compression.pair import make_pair
    from dtm_core.measure.streaming import stream_pair
    from ui.render import position_plot

    pair = make_pair(default_model, Recipe.single("int3"))
    state = None
    for state in stream_pair(pair, "Once upon a time", 12):
        pass
    assert state.fdt is not None
    fig = position_plot(state, state.fdt)
    marks = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(marks) == 1 and marks[0].x0 == state.fdt
    assert f"pos {state.fdt}" in fig.layout.annotations[0].text
