"""Tables as files any tool reads: a plain CSV whose first line is its header (pandas, the csv
module, spreadsheets read it with default settings), or Parquet for tables that can be large
(sweeps, per-prompt tables); the run's configuration goes into a sidecar ``NAME.json`` beside it.

    write_table(df, "results.csv", config)   # results.csv + results.json
    write_table(df, "cells.parquet", config)  # cells.parquet + cells.json
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dtm_core.errors import DTMError

FORMATS = (".csv", ".parquet")


def sidecar_path(path) -> Path:
    """``NAME.json`` beside ``NAME.csv`` / ``NAME.parquet``."""
    p = Path(path)
    return p.with_suffix(".json") if p.suffix.lower() in FORMATS else p.with_name(p.name + ".json")


def write_table(table: pd.DataFrame, path, config: dict | None = None) -> list[Path]:
    """Write ``table`` as CSV (any name but ``.parquet``) or Parquet, and the configuration to the
    sidecar JSON; returns the paths written."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise DTMError("Parquet export needs the pyarrow package: pip install "
                               "pyarrow (or write a .csv).") from None
            table.to_parquet(path, index=False)
        else:
            table.to_csv(path, index=False, encoding="utf-8")
        written = [path]
        if config is not None:
            side = sidecar_path(path)
            side.write_text(json.dumps({"config": config, "table": path.name,
                                        "columns": list(map(str, table.columns)),
                                        "rows": len(table)}, indent=2, default=str),
                            encoding="utf-8")
            written.append(side)
    except OSError as exc:
        raise DTMError(f"Could not write '{path}': {exc.strerror or exc}.") from exc
    return written


def read_table(path) -> pd.DataFrame:
    """A table written by :func:`write_table` (CSV or Parquet), with pandas' defaults."""
    path = Path(path)
    return pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
