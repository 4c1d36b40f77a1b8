"""The results table: one pyarrow schema, atomic per-cell parquet files, loading.

A run directory holds ``spec.toml``, ``manifest.json``, ``cells/<cell>.parquet`` (one per finished
cell) and ``errors/<cell>.txt`` (one per failed cell). Files are written to a temporary name in the
same directory and renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from estbench.errors import EstbenchError

__all__ = [
    "SCHEMA",
    "PHASES",
    "validate",
    "write_cell",
    "load_results",
    "atomic_write_text",
    "cell_path",
    "error_path",
    "checkpoint_path",
]

PHASES = ("gradient", "train", "eval", "throughput")

SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("cell", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("task_version", pa.string(), nullable=False),
        pa.field("task_params", pa.string(), nullable=False),
        pa.field("estimator", pa.string(), nullable=False),
        pa.field("estimator_params", pa.string(), nullable=False),
        pa.field("estimator_label", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("phase", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64(), nullable=True),
        pa.field("ci_high", pa.float64(), nullable=True),
        pa.field("package_version", pa.string(), nullable=False),
        pa.field("git_sha", pa.string(), nullable=False),
        pa.field("torch_version", pa.string(), nullable=False),
        pa.field("device_name", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def validate(rows: pd.DataFrame) -> pa.Table:
    """Check ``rows`` against :data:`SCHEMA` and return it as an arrow table."""
    missing = [name for name in SCHEMA.names if name not in rows.columns]
    extra = [name for name in rows.columns if name not in SCHEMA.names]
    if missing or extra:
        raise EstbenchError(f"results rows do not match the schema: missing {missing}, extra {extra}")
    bad_phase = set(rows["phase"]) - set(PHASES)
    if bad_phase:
        raise EstbenchError(f"results rows have unknown phases {sorted(bad_phase)}; known: {PHASES}")
    for field in SCHEMA:
        if pa.types.is_floating(field.type) or field.nullable:
            continue  # NaN is a legitimate float value (an undefined metric)
        name = field.name
        if rows[name].isna().any():
            raise EstbenchError(f"results column '{name}' has missing values")
    try:
        table = pa.Table.from_pandas(rows[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    except (pa.ArrowException, ValueError, TypeError) as err:
        raise EstbenchError(f"results rows do not fit the schema: {err}") from None
    table.validate(full=True)
    return table


def _atomic_replace(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    _atomic_replace(Path(path), lambda handle: handle.write(text.encode()))


def cell_path(run_dir: Path, cell_id: str) -> Path:
    return Path(run_dir) / "cells" / f"{cell_id}.parquet"


def error_path(run_dir: Path, cell_id: str) -> Path:
    return Path(run_dir) / "errors" / f"{cell_id}.txt"


def checkpoint_path(run_dir: Path, cell_id: str) -> Path:
    """Where a running cell keeps its state between steps (removed once the cell is written)."""
    return Path(run_dir) / "checkpoints" / f"{cell_id}.pt"


def write_cell(rows: pd.DataFrame, path: Path) -> None:
    """Validate ``rows`` and write them atomically as one parquet file."""
    table = validate(rows)
    _atomic_replace(Path(path), lambda handle: pq.write_table(table, handle))


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """The whole results table of a run directory (every finished cell) as a DataFrame."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file() and not (run_dir / "cells").is_dir():
        raise EstbenchError(
            f"'{run_dir}' is not a run directory (no manifest.json); pass the directory that "
            f"`estbench run` wrote, e.g. runs/quick"
        )
    files = sorted((run_dir / "cells").glob("*.parquet"))
    if not files:
        return SCHEMA.empty_table().to_pandas()
    tables = [pq.read_table(f, schema=SCHEMA) for f in files]
    return pa.concat_tables(tables).to_pandas()


def to_rows(records: Iterable[dict[str, Any]], common: dict[str, Any]) -> pd.DataFrame:
    """Build a schema-ordered frame from per-observation records plus shared columns."""
    frame = pd.DataFrame([{**common, **r} for r in records], columns=SCHEMA.names)
    for column in ("ci_low", "ci_high"):
        frame[column] = frame[column].astype("float64")
    frame["value"] = frame["value"].astype("float64")
    return frame


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
