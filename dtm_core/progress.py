"""Progress lines people can plan around: done/total, elapsed, time left and rate, formatted by
tqdm's meter, so the CLI (stderr) and the app (the progress bar's text) show the same line.

    meter = Meter(210, "cell")
    note(done / 210, meter.line(done, "3.q: mean FDT 12.5"))
    # -> "12/210 cells [00:30<08:23, 2.54s/cell]  3.q: mean FDT 12.5"
"""
from __future__ import annotations

import time

FORMAT = "{n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}, {rate_fmt}]"


class Meter:
    def __init__(self, total: int, unit: str):
        self.total = max(int(total), 1)
        self.unit = unit
        self.start = time.perf_counter()

    def line(self, done: int, extra: str = "") -> str:
        from tqdm import tqdm

        text = tqdm.format_meter(done, self.total, time.perf_counter() - self.start,
                                 unit=self.unit, bar_format=FORMAT)
        return f"{text}  {extra}" if extra else text
