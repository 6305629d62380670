"""Compare's divergence strip: a thin bar above the two columns with a tick at every position where
the compressed model's argmax on the dense prefix differs from the dense token (the SDT map's red
tokens), the first divergent token in its own colour; a tick click scrolls both columns there
(assets/app.js). Long outputs stay navigable: the columns scroll together."""
from __future__ import annotations

import html


def render_strip(differs: list[bool], n: int, fdt: int | None) -> str:
    """The strip for per-position disagreement flags (position i of N new tokens)."""
    n = max(int(n), len(differs), 1)
    ticks = []
    for pos, bad in enumerate(differs):
        if not bad:
            continue
        cls = "tick fdt" if pos == fdt else "tick"
        ticks.append(f'<span class="{cls}" data-pos="{pos}" style="left:{100 * pos / n:.3f}%" '
                     f'title="{html.escape(f"position {pos}: the argmaxes differ")}"></span>')
    label = (f"{sum(differs)} of {len(differs)} positions differ"
             if differs else "no positions yet")
    return (f'<div class="strip-row"><div class="diff-strip" data-n="{n}" '
            f'data-count="{sum(differs)}" title="{label}; click a mark to scroll both columns '
            f'there">{"".join(ticks)}</div><button type="button" id="jump-fdt" '
            f'title="Scroll both columns to the first divergent token">Jump to FDT</button></div>')


def stream_differs(state) -> list[bool]:
    """Per dense position of a live stream: the forced argmax differs from the dense token."""
    return [s.forced_token != s.dense_token for s in state.steps if s.dense_token is not None]


def free_run_note(state, eos) -> str:
    """The free-running comparison of the two streamed texts, as a clause of the status line:
    lengths, edit similarity, loops and where the compressed text rejoins the dense one."""
    from dtm_core.measure.freerun import free_run_row

    r = free_run_row(state.dense_tokens, state.comp_tokens, eos)
    loops = "/".join(side for side in ("dense", "compressed") if r[f"loop_{side}"])
    j = r["rejoin_pos"]
    return (f"; free run {r['len_dense']}/{r['len_compressed']} tokens, edit sim "
            f"{r['edit_sim']:.0%}" + (f", loops: {loops}" if loops else "")
            + ("" if r["edit_sim"] == 1 else
               ", no rejoin" if j != j else f", rejoins at {int(j)}"))
